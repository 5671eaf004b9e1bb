"""The format registry: a format is one registered object (a `Format` subclass instance).

A format says what it can hold (`Format.accepts`: a method's config and the format's own options
-> None or the reason it cannot), recognises its artifacts on disk (`Format.detect`), writes them
(`Format.write` from a `WriteRequest`; `Format.stream` block by block for streaming),
opens them for evaluation (`Format.load`: a transformers model), measures them
(`Format.size`) and checks them (`Format.verify`). The loader, the CLI, the sweep, the app, the
evaluation harness, `measure` and `verify` ask the registry; none of them knows a format by name.
Adding a format is one file with one `register_format(MyFormat())` (see docs/ARCHITECTURE.md);
registering a name twice is an error, and an unknown name fails listing the known ones.

A format's options are a frozen dataclass (`Format.options`, validated in ``__post_init__``); a
run config variant names them next to the format (``{format: gptq, gptq_format: v2}``) and the CLI
offers a flag for each field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from quantlab.errors import ConfigError, QuantlabError


def gathers_columns(config) -> bool:
    """Whether a method's result under ``config`` maps columns to groups out of order (a
    ``g_idx``): act-order without static groups. Layouts with consecutive groups (AWQ, GGUF
    blocks, compressed-tensors 0.19) cannot hold it; act-order with static groups they can."""
    return bool(getattr(config, "act_order", False)) and not getattr(config, "static_groups", False)


@dataclass(frozen=True)
class NoOptions:
    """The options of a format that has none."""

    version: int = 1


@dataclass(frozen=True)
class ArtifactSize:
    """What an artifact stores: tensor bytes and the number of weights they encode (so that
    ``8 * tensor_bytes / weights`` is its bits per weight), for the whole file and for the
    quantized linears alone (codes with their scales, zero points and indices)."""

    tensor_bytes: int
    weights: int
    linear_bytes: int | None = None
    linear_weights: int | None = None


@dataclass
class LoadedCheckpoint:
    """What `Format.load` found: the format label, its settings, and each quantized linear."""

    path: Path
    format: str  # the format's label (e.g. gptq, gptq_v2, awq, compressed-tensors, native)
    quantization_config: dict
    weights: dict = field(default_factory=dict)  # linear name -> QuantizedWeight
    manifest: dict | None = None
    activations: str = ""  # how linears round their inputs at run time ("": not, weight-only)
    dense: list = field(default_factory=list)  # quantized linears loaded dequantized (FP8)


@dataclass(frozen=True)
class WriteRequest:
    """Everything a format may need to write one artifact.

    - ``out``: the artifact path (a folder, or a file with the format's ``suffix``);
    - ``source``: the `ResolvedModel` it was made from; ``options``: the format's options;
    - ``result`` / ``model``: the method's `QuantizationResult` and the model it was produced on
      (holding the dequantized weights and any parameter the method changed); both None for a
      format that quantizes the unquantized model itself (GGUF through llama.cpp);
    - ``imatrix``: ``(values, rows)``, the importance matrix of the unquantized model on the
      calibration set, when the variant asks for it; ``calibration`` the `CalibrationSet` it was
      measured on; ``corpus_label`` its corpus;
    - ``cache``: quantlab's cache folder (full-precision GGUF files, converters);
    - ``max_shard_bytes``: the largest weight shard a folder format writes;
    - ``tensor_settings``: a fit's setting per tensor, for a format that quantizes the model
      itself (``fit_family`` ggml: GGUF tensor name -> ggml type, e.g. ``Q4_K``);
    - ``manifest_extra``: more fields for the artifact's manifest (a fit's record).
    """

    out: Path
    source: object
    options: object
    result: object | None = None
    model: object | None = None
    imatrix: tuple | None = None
    calibration: object | None = None
    corpus_label: str = ""
    cache: Path | None = None
    max_shard_bytes: int = 2 * 1024**3
    tensor_settings: dict | None = None
    manifest_extra: dict | None = None


class Format:
    """Base class of a registered format; subclasses set the class attributes and override what
    they support. Methods that a format does not support raise a `QuantlabError` saying so."""

    name: str = ""  # the name users type: --format NAME, {format: NAME}
    description: str = ""
    options: type = NoOptions  # frozen dataclass of the format's own options
    suffix: str = ""  # "" = the artifact is a folder; else a single file with this suffix
    writable: bool = True  # False: read (load, evaluate, verify) only
    streams: bool = False  # can be written block by block (`stream`, --streaming)
    needs_method: bool = True  # False: can also be made from the unquantized model itself
    runtime: str = "transformers"  # the artifact's own runtime (GGUF: llama.cpp)
    standalone: bool = True  # False: loading needs the source model (a delta artifact)
    default: bool = False  # the format a method's result gets when none is named (one format)
    note: str = ""  # said wherever the format's rows are reported
    # which settings a fit may choose per tensor (`quantlab.fit`): "ggml" (ggml types, the format
    # quantizes the model itself from ``WriteRequest.tensor_settings``), "int" (integer bits per
    # module: a per-module method result), None: the format cannot hold a fit
    fit_family: str | None = None
    fit_method: str | None = None  # the method an "int" fit runs
    run_snippet: str = (
        "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained('{path}')"
    )

    # --- what it holds ----------------------------------------------------------------------
    def label(self, options) -> str:
        """What results and loaded checkpoints call an artifact written with ``options``."""
        return self.name

    def labels(self) -> tuple[str, ...]:
        """Every label this format's artifacts carry."""
        return (self.name,)

    def label_options(self, label: str) -> dict:
        """The option values an artifact labelled ``label`` was written with."""
        return {}

    def accepts(self, method: str | None, config, options, *, imatrix: bool = False) -> str | None:
        """None if an artifact of ``method``'s result under ``config`` (None: no method) and
        ``options`` can be written exactly, else the reason (one line). ``imatrix``: the variant
        gets the importance matrix of the calibration set."""
        if not self.writable:
            return f"format {self.name} is read-only in quantlab"
        if method is None and self.needs_method:
            return f"format {self.name} stores a method's result: give a method"
        return None

    def options_for(self, config) -> dict:
        """Option values that best hold a method's result under ``config`` (what a front end
        picks when the user only chose the format); empty: the defaults."""
        return {}

    def preflight(self, config, options, linears: dict[str, tuple[int, int]]) -> str | None:
        """None if every linear (full name -> (out, in)) of the model fits, else the reason;
        checked before any work starts."""
        return None

    # --- on disk ----------------------------------------------------------------------------
    def detect(self, path: Path):
        """This format's options if ``path`` holds one of its artifacts, else None."""
        return None

    def write(self, request: WriteRequest) -> Path:
        raise QuantlabError(f"format {self.name} cannot be written")

    def side_files(self, path: Path) -> list[Path]:
        """Files a single-file artifact has beside it (its manifest, its card, ...)."""
        return [self.card_path(path)] if self.suffix else []

    def card_path(self, path: Path) -> Path:
        """Where the artifact's model card is: ``README.md`` in a folder, ``<stem>.md`` beside
        a file (`quantlab.formats.card`)."""
        path = Path(path)
        return path.with_name(path.stem + ".md") if self.suffix else path / "README.md"

    def stream(self, request: WriteRequest, run):
        """Write the artifact block by block (formats that stream): ``run(sink)`` performs the
        block walk, handing each finished block to ``sink``, and returns the run's result.
        Returns ``(path, result)``."""
        raise QuantlabError(f"format {self.name} cannot be written block by block")

    def load(self, path: Path, *, dtype: str = "float32", verify: bool = True, cache=None):
        """``(transformers model, LoadedCheckpoint)`` of the artifact at ``path``."""
        raise QuantlabError(f"format {self.name} cannot be loaded into transformers")

    def tokenizer(self, path: Path, cache=None):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)

    def check(self, path: Path, runtime: str) -> None:
        """Refuse (cleanly) an artifact ``runtime`` cannot run, before anything opens it."""

    def check_config(self, path: Path) -> None:
        """Parse the settings the artifact declares (e.g. ``quantization_config``), refusing
        malformed ones with a clean error; nothing is loaded."""

    def size(self, path: Path) -> ArtifactSize:
        raise QuantlabError(f"format {self.name} cannot report its size")

    def verify(self, path: Path, check) -> None:
        """Check the artifact; ``check(name, outcome)`` reports each passed check; a failure
        raises a `QuantlabError` naming it."""
        raise QuantlabError(f"format {self.name} has no verification")

    def notes(self, path: Path) -> list[str]:
        """What a user should know about this artifact (loader compatibility, fallbacks)."""
        return []


_FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Add a format; a second format of the same name (or label) is a programming error."""
    if not fmt.name:
        raise ValueError(f"{type(fmt).__name__} has no name")
    taken = {label for f in _FORMATS.values() for label in f.labels()}
    clash = sorted((set(fmt.labels()) | {fmt.name}) & (taken | set(_FORMATS)))
    if clash:
        raise ValueError(f"format {clash[0]!r} is already registered")
    if not dataclasses.is_dataclass(fmt.options):
        raise TypeError(f"format {fmt.name!r}: options must be a dataclass")
    if fmt.default and any(f.default for f in _FORMATS.values()):
        raise ValueError(f"format {fmt.name!r}: there is already a default format")
    _FORMATS[fmt.name] = fmt
    return fmt


def unregister_format(name: str) -> None:
    """Remove a format (plugins and tests that register their own)."""
    _FORMATS.pop(name, None)


def format_names(*, writable: bool | None = None) -> list[str]:
    return sorted(n for n, f in _FORMATS.items() if writable is None or f.writable == writable)


def formats() -> list[Format]:
    return [_FORMATS[n] for n in sorted(_FORMATS)]


def get_format(name: str) -> Format:
    try:
        return _FORMATS[name]
    except KeyError:
        raise ConfigError(
            f"format must be one of {', '.join(format_names(writable=True))}, got {name!r}"
        ) from None


def default_format() -> Format:
    """The format a method's result is written in when the variant names none."""
    return next(f for f in _FORMATS.values() if f.default)


def format_of_label(label: str) -> Format | None:
    """The format whose artifacts carry ``label`` (as stored in results), or None."""
    return next((f for f in _FORMATS.values() if label in f.labels()), None)


def option_fields(fmt: Format) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(fmt.options) if f.name != "version"]


def detect(path) -> tuple[Format, object] | None:
    """``(format, options)`` of the artifact at ``path``, or None when it is none of the
    registered formats (an unquantized model, say). Corrupt files fail here with a clean error."""
    path = Path(path)
    for fmt in formats():
        options = fmt.detect(path)
        if options is not None:
            return fmt, options
    return None


def detect_format(path) -> str | None:
    """The label of the artifact at ``path`` (``gptq_v2``, ``awq``, ...), or None."""
    found = detect(path)
    return None if found is None else found[0].label(found[1])
