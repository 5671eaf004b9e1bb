"""Run configs: YAML that maps one to one onto frozen, validated dataclasses.

A run names a model, one calibration set (shared by every variant), a list of variants and one
evaluation (applied to every variant the same way). Unknown keys and bad values fail in
`load_run_config`, before any work starts, naming the key (with its place in the file) and what
is allowed. Example (configs/demo.yaml)::

    name: demo
    model: smollm2-135m
    calibration: {corpus: c4, n_samples: 16, seq_len: 512}
    variants:
      - {}                                    # the unquantized model (the reference)
      - {method: gptq, bits: 4, group_size: 128, format: gptq}
      - {format: gguf, gguf_type: Q4_K_M, imatrix: true}
      - {method: gptq, impl: gptqmodel, bits: 4, group_size: 128}
    evaluation:
      perplexity: [{corpus: wikitext2, context: 512, max_tokens: 8192}]
      kld: true
      tasks: [piqa]
      limit: 50
      speed: true

A variant with neither ``method`` nor ``gguf_type`` is the unquantized model itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from quantlab.errors import ConfigError

METHODS = ("rtn", "gptq", "awq")
IMPLS = ("quantlab", "gptqmodel", "llmcompressor")
FORMATS = ("native", "gptq", "awq", "gguf")
PROTOCOLS = ("gptq", "llamacpp")
# run and variant names become file and folder names: no separators, no leading dot
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _check_name(what: str, name: str) -> None:
    if not NAME.fullmatch(name):
        raise ConfigError(
            f"{what} {name!r}: use letters, digits, '.', '_' and '-' (not first), at most 100"
        )


@dataclass(frozen=True)
class CalibrationSpec:
    corpus: str = "c4"
    split: str | None = None
    n_samples: int = 32
    seq_len: int = 512
    seed: int = 0
    dtype: str = "float32"  # dtype of the calibration forward passes (bfloat16 is ~2x faster)
    allow_fallback: bool = False  # use the embedded pydoc corpus when the corpus is unavailable

    def __post_init__(self) -> None:
        if self.n_samples < 1 or self.seq_len < 8:
            raise ConfigError("calibration: n_samples must be >= 1 and seq_len >= 8")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"calibration.dtype must be float32 or bfloat16, got {self.dtype!r}")


@dataclass(frozen=True)
class Variant:
    """One output of the sweep. Defaults follow `quantlab quantize`."""

    name: str = ""  # default: made from the fields below
    method: str | None = None  # rtn, gptq, awq; None: unquantized or llama.cpp's own quantization
    impl: str = "quantlab"  # or a reference toolkit: gptqmodel, llmcompressor (their own format)
    bits: int = 4
    group_size: int = 128
    sym: bool | None = None  # None: the method's default
    act_order: bool = False
    damp_percent: float = 0.01
    format: str | None = None  # native, gptq, awq, gguf; None: gguf if gguf_type, else native
    gptq_format: str = "v1"
    gguf_type: str | None = None  # llama.cpp quantization type (format gguf, no method)
    imatrix: bool = False  # feed llama.cpp the importance matrix of the calibration set
    streaming: bool = False  # quantize block by block from the shards (identical result)

    def __post_init__(self) -> None:
        from quantlab.formats.gguf_quant import GGUF_TYPES, NEEDS_IMATRIX

        fmt = self.format or ("gguf" if self.gguf_type else "native")
        object.__setattr__(self, "format", fmt)
        if self.gguf_type:
            object.__setattr__(self, "gguf_type", self.gguf_type.upper())
        if self.method is not None and self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.impl not in IMPLS:
            raise ConfigError(f"impl must be one of {', '.join(IMPLS)}, got {self.impl!r}")
        if fmt not in FORMATS:
            raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        if self.gptq_format not in ("v1", "v2"):
            raise ConfigError(f"gptq_format must be v1 or v2, got {self.gptq_format!r}")
        toolkit = self.impl != "quantlab"
        if toolkit and (self.method not in ("gptq", "awq") or fmt != "native" or self.gguf_type):
            raise ConfigError(
                f"impl {self.impl} runs that toolkit's gptq or awq and writes its own "
                "checkpoint: give method gptq or awq and no format / gguf_type"
            )
        if self.gguf_type:
            if self.method or fmt != "gguf":
                raise ConfigError("gguf_type is llama.cpp's quantization: no method, format gguf")
            if self.gguf_type not in GGUF_TYPES:
                raise ConfigError(f"gguf_type must be one of {', '.join(GGUF_TYPES)}")
            if self.gguf_type in NEEDS_IMATRIX and not self.imatrix:
                raise ConfigError(f"gguf_type {self.gguf_type} needs imatrix: true")
        elif fmt == "gguf":
            if not self.method:
                raise ConfigError("format gguf needs gguf_type (llama.cpp) or a method")
            if self.group_size != 32 or self.act_order:
                raise ConfigError("format gguf with a method needs group_size 32, no act_order")
        if self.imatrix and fmt != "gguf":
            raise ConfigError("imatrix applies to format gguf (llama.cpp's quantization)")
        if self.method is None and not self.gguf_type and fmt != "native":
            raise ConfigError("the unquantized variant (no method, no gguf_type) has no format")
        if fmt == "awq" and (self.bits != 4 or self.act_order):
            raise ConfigError("format awq (GEMM) holds 4-bit weights without act-order")
        if self.method and self.bits not in (2, 3, 4, 8):
            raise ConfigError(f"bits must be 2, 3, 4 or 8, got {self.bits}")
        if self.streaming and (toolkit or not self.method or fmt not in ("gptq", "awq")):
            raise ConfigError("streaming applies to quantlab's methods with format gptq or awq")
        if self.act_order and self.method != "gptq":
            raise ConfigError("act_order applies to method gptq only")
        if self.method and self.group_size != -1 and self.group_size < 1:
            raise ConfigError(f"group_size must be -1 (per channel) or >= 1, got {self.group_size}")
        if not self.name:
            object.__setattr__(self, "name", self.default_name())
        _check_name("variant name", self.name)

    @property
    def is_reference(self) -> bool:
        return self.method is None and self.gguf_type is None

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("gptq", "awq") or self.imatrix

    def default_name(self) -> str:
        if self.is_reference:
            return "unquantized"
        if self.gguf_type:
            return f"gguf-{self.gguf_type}" + ("-imatrix" if self.imatrix else "")
        group = "pc" if self.group_size == -1 else f"g{self.group_size}"
        parts = [self.method, f"w{self.bits}", group]
        if self.sym is not None:
            parts.append("sym" if self.sym else "asym")
        if self.act_order:
            parts.append("act")
        if self.impl != "quantlab":
            parts.insert(0, self.impl)
        return "-".join(parts) + ("" if self.format == "native" else f"-{self.format}")

    def settings_key(self) -> str:
        """The variant's settings without its name (what its result depends on; streaming
        writes the same tensors as the in-memory path, so it is left out)."""
        fields = {
            k: v for k, v in dataclasses.asdict(self).items() if k not in ("name", "streaming")
        }
        return json.dumps(fields, sort_keys=True)

    def method_options(self) -> dict:
        """The keyword arguments of the method's config class."""
        options = {"bits": self.bits, "group_size": self.group_size}
        if self.sym is not None:
            options["sym"] = self.sym
        if self.method == "gptq":
            options.update(act_order=self.act_order, damp_percent=self.damp_percent)
        return options


@dataclass(frozen=True)
class PerplexitySpec:
    corpus: str = "wikitext2"
    split: str | None = "test"
    protocol: str = "gptq"
    context: int | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}")
        if self.context is not None and self.context < 4:
            raise ConfigError(f"context must be >= 4, got {self.context}")
        if self.max_tokens is not None and self.max_tokens < 8:
            raise ConfigError(f"max_tokens must be >= 8, got {self.max_tokens}")


@dataclass(frozen=True)
class EvaluationSpec:
    perplexity: tuple[PerplexitySpec, ...] = (PerplexitySpec(),)
    kld: bool = True
    tasks: tuple[str, ...] = ()
    limit: int | None = None
    speed: bool = True
    allow_fallback: bool = False  # unavailable corpora -> pydoc; unavailable tasks are skipped

    def __post_init__(self) -> None:
        if self.kld and not self.perplexity:
            raise ConfigError("evaluation.kld needs a perplexity corpus (its tokens are shared)")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("evaluation.limit must be >= 1")


@dataclass(frozen=True)
class RunConfig:
    name: str
    model: str
    variants: tuple[Variant, ...]
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    output: str = "out"  # artifacts go to <output>/<name>/<variant>
    store: str = "results/quantlab.db"
    version: int = 1

    def __post_init__(self) -> None:
        _check_name("run name", self.name)
        if not self.variants:
            raise ConfigError("variants: give at least one")
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"variants: names must be unique, repeated: {', '.join(dupes)}")
        settings = {}
        for v in self.variants:
            same = settings.setdefault(v.settings_key(), v.name)
            if same != v.name:
                raise ConfigError(f"variants {same} and {v.name} have the same settings")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def _build(cls, data, where: str):
    """``cls(**data)``, refusing keys ``cls`` does not have (named, with the allowed ones)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    allowed = [f.name for f in dataclasses.fields(cls) if f.name != "version"]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(allowed)}")
    try:
        return cls(**data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


_KINDS = {"int": int, "bool": bool, "str": str, "float": (int, float)}


def _types(cls, data: dict, where: str) -> None:
    """Refuse values of the wrong type (YAML gives strings, numbers, booleans, lists)."""
    hints = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for key, value in data.items():
        hint = hints.get(key, "")
        kind = _KINDS.get(hint.split(" ")[0])
        if kind is None or (value is None and "None" in hint):
            continue
        wrong_bool = isinstance(value, bool) and kind is not bool
        if wrong_bool or not isinstance(value, kind):
            raise ConfigError(f"{where}.{key}: {value!r} is not a valid {hint}")


def parse_run_config(data) -> RunConfig:
    """A `RunConfig` from parsed YAML (a dict)."""
    if not isinstance(data, dict):
        raise ConfigError("a run config is a mapping with name, model, variants, ...")
    data = dict(data)
    variants = data.get("variants")
    if not isinstance(variants, list):
        raise ConfigError("variants: expected a list of mappings")
    parsed = []
    for i, item in enumerate(variants):
        item = item or {}
        _types(Variant, item if isinstance(item, dict) else {}, f"variants[{i}]")
        parsed.append(_build(Variant, item, f"variants[{i}]"))
    data["variants"] = tuple(parsed)
    calib = data.get("calibration") or {}
    _types(CalibrationSpec, calib if isinstance(calib, dict) else {}, "calibration")
    data["calibration"] = _build(CalibrationSpec, calib, "calibration")
    evaluation = data.get("evaluation") or {}
    if not isinstance(evaluation, dict):
        raise ConfigError("evaluation: expected a mapping")
    evaluation = dict(evaluation)
    if "perplexity" in evaluation:
        ppl = evaluation["perplexity"]
        if not isinstance(ppl, list):
            raise ConfigError("evaluation.perplexity: expected a list of mappings")
        for i, p in enumerate(ppl):
            _types(PerplexitySpec, p if isinstance(p, dict) else {}, f"evaluation.perplexity[{i}]")
        evaluation["perplexity"] = tuple(
            _build(PerplexitySpec, p, f"evaluation.perplexity[{i}]") for i, p in enumerate(ppl)
        )
    if "tasks" in evaluation:
        if not isinstance(evaluation["tasks"], list):
            raise ConfigError("evaluation.tasks: expected a list of task names")
        evaluation["tasks"] = tuple(evaluation["tasks"])
    _types(EvaluationSpec, evaluation, "evaluation")
    data["evaluation"] = _build(EvaluationSpec, evaluation, "evaluation")
    _types(RunConfig, {k: v for k, v in data.items() if k in ("output", "store")}, "run config")
    for key in ("name", "model"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise ConfigError(f"{key}: required (a string)")
    return _build(RunConfig, data, "run config")


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML run config."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"run config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    try:
        return parse_run_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
