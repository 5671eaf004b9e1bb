"""Run configs: YAML that maps one to one onto the library's own frozen, validated dataclasses.

A run names a model, one calibration set (a `CalibrationConfig`, shared by every variant), a list
of variants and one evaluation (an `EvalConfig`, applied to every variant the same way). Unknown
keys and bad values fail in `load_run_config`, before any work starts, naming the key (with its
place in the file) and what is allowed. Example (configs/demo.yaml)::

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

A variant is ``{method: NAME, <that method's config fields>, format: NAME, <that format's
options>}`` plus ``name``, ``imatrix`` (give the variant the importance matrix of the calibration
set), ``streaming`` (quantize block by block from the shards), ``rotate`` (quantize the model after
a function-preserving Hadamard rotation, `quantlab.models.rotation`) and ``impl`` (run a reference
toolkit's implementation of the method instead of quantlab's). The method's fields are its config
dataclass's (`quantlab.methods.get_method(NAME).config_cls`), validated by its ``__post_init__``;
the format's options are its options dataclass's, and the format's ``accepts`` says whether it can
hold the method's result. Without ``format``, a variant whose keys are one format's options gets
that format (``{gguf_type: Q8_0}`` is llama.cpp's Q8_0), else a method variant is written in the
default format (``native``). A variant with neither method nor format is the unquantized model
itself.

Defaults: the library's own, except that an evaluation section that leaves them out measures
``perplexity`` on WikiText-2 (gptq protocol), ``kld`` and ``speed`` (`EVALUATION_DEFAULTS`), and
a calibration section draws 32 x 512 tokens (`CALIBRATION_DEFAULTS`; the CLI's default is the
papers' 128 x 2048).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from quantlab.data.calibration import CalibrationConfig
from quantlab.errors import ConfigError
from quantlab.eval.harness import EvalConfig
from quantlab.eval.perplexity import PerplexityConfig

# run and variant names become file and folder names: no separators, no leading dot
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
VARIANT_KEYS = ("name", "method", "format", "impl", "imatrix", "streaming", "rotate", "fit")
IMPL = "quantlab"  # quantlab's own implementation of a method (else a reference toolkit's)
EVALUATION_DEFAULTS = {"perplexity": (PerplexityConfig(),), "kld": True, "speed": True}
# a sweep's calibration when the section leaves them out: small enough for a laptop's sweep
CALIBRATION_DEFAULTS = {"n_samples": 32, "seq_len": 512}
# how the default variant name spells a method setting
_SHORT = {"act_order": "act", "static_groups": "static"}


def _check_name(what: str, name: str) -> None:
    if not NAME.fullmatch(name):
        raise ConfigError(
            f"{what} {name!r}: use letters, digits, '.', '_' and '-' (not first), at most 100"
        )


@dataclass(frozen=True)
class Variant:
    """One output of the sweep: a method (its config) written in a format (its options), or
    llama.cpp's quantization (format gguf, no method), or the unquantized model."""

    name: str
    method: str | None = None
    config: object | None = None  # the method's frozen config dataclass
    format: str | None = None
    options: object | None = None  # the format's frozen options dataclass
    impl: str = IMPL  # or a reference toolkit (gptqmodel, llmcompressor): its own checkpoint
    imatrix: bool = False  # measure the importance matrix on the calibration set for it
    streaming: bool = False  # quantize block by block from the shards (identical result)
    fit: object | None = None  # a `quantlab.fit.FitTarget`: the format's best mix for a budget
    rotate: bool = False  # quantize the rotated model (`quantlab.models.rotation`): same function

    @property
    def is_reference(self) -> bool:
        return self.method is None and self.format is None

    @property
    def needs_calibration(self) -> bool:
        from quantlab.methods import get_method

        if self.fit is not None:
            return True  # the sensitivity and the importance matrix are measured on it
        if self.method is None:
            return self.imatrix
        return self.impl != IMPL or get_method(self.method).needs_calibration or self.imatrix

    def to_dict(self) -> dict:
        """The variant as a run config writes it (flat: method fields and format options beside
        the variant's own keys)."""
        if self.fit is not None:  # {name, format, fit}: the rest follows from the fit
            fit = {k: v for k, v in dataclasses.asdict(self.fit).items() if k != "version"}
            return {"name": self.name, "format": self.format, "fit": fit}
        out = {k: getattr(self, k) for k in VARIANT_KEYS if k != "fit"}
        for part in (self.config, self.options):
            if part is not None:
                out.update({k: v for k, v in dataclasses.asdict(part).items() if k != "version"})
        return out

    def settings_key(self) -> str:
        """The variant's settings without its name (what its result depends on; streaming
        writes the same tensors as the in-memory path, so it is left out)."""
        fields = {
            "method": self.method,
            "config": None if self.config is None else dataclasses.asdict(self.config),
            "format": self.format,
            "options": None if self.options is None else dataclasses.asdict(self.options),
            "impl": self.impl,
            "imatrix": self.imatrix,
        }
        if self.rotate:
            fields["rotate"] = True
        if self.fit is not None:
            fields["fit"] = dataclasses.asdict(self.fit)
        return json.dumps(fields, sort_keys=True)


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.name != "version"}


def _type_name(tp) -> str:
    import types
    import typing

    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def field_types(cls) -> dict[str, str]:
    """Each settable field's type as written (``int``, ``str | None``), whether or not the
    dataclass's module postpones its annotations."""
    import typing

    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation that does not resolve: use it as written
        hints = {}
    return {
        name: _type_name(hints[name]) if name in hints else str(f.type)
        for name, f in _fields(cls).items()
    }


def _default_name(method, config, given: set, fmt, options, impl, imatrix, rotate=False) -> str:
    """``gptq-w4-g128-asym-act-gptq``, ``gguf-Q4_K_M-imatrix``, ``unquantized``: bits and group
    size always, ``sym``/``asym`` when given, other settings when given and not the default."""
    if method is None and fmt is None:
        return "unquantized"
    parts = [] if impl == IMPL else [impl]
    if method is None:  # the format quantizes: its options name it (gguf-Q4_K_M)
        parts.append(fmt.name)
        parts += [str(v) for k, v in dataclasses.asdict(options).items() if k in given]
    else:
        parts.append(method)
        for f in dataclasses.fields(config):
            key, value = f.name, getattr(config, f.name)
            if key == "bits":
                parts.append(f"w{value}")
            elif key == "group_size":
                parts.append("pc" if value == -1 else f"g{value}")
            elif key not in given:
                continue
            elif key == "sym":
                parts.append("sym" if value else "asym")
            elif value == f.default:
                continue
            elif isinstance(value, bool):
                short = _SHORT.get(key, key.replace("_", "-"))
                parts.append(short if value else f"no-{key.replace('_', '-')}")
            else:
                parts.append(f"{key.replace('_', '-')}{value}")
        if fmt is not None and not fmt.default:
            parts.append(fmt.name)
    if imatrix:
        parts.append("imatrix")
    if rotate:
        parts.append("rot")
    return "-".join(parts)


def parse_variant(data, where: str = "variant") -> Variant:
    """A `Variant` from its mapping (a run config entry, or the CLI's options): every key is
    checked against the variant's own keys, the method's config fields and the format's options;
    values are type-checked and validated by the dataclasses themselves; the format must accept
    the method's result."""
    from quantlab.formats import default_format, formats, get_format, option_fields
    from quantlab.methods import get_method, method_names

    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    data = dict(data)
    if "fit" in data:
        return _parse_fit_variant(data, where)
    own = {k: data.pop(k) for k in VARIANT_KEYS if k in data}
    _check_types(
        {"name": "str", "method": "str | None", "format": "str | None", "impl": "str",
         "imatrix": "bool", "streaming": "bool", "rotate": "bool"},
        own, where,
    )  # fmt: skip
    method, fmt_name = own.get("method"), own.get("format")
    impl, imatrix, streaming, rotate = (
        own.get("impl", IMPL),
        own.get("imatrix", False),
        own.get("streaming"),
        bool(own.get("rotate", False)),
    )
    for key in ("method", "format", "impl", "name"):
        if own.get(key) == "":
            raise ConfigError(f"{where}: {key} is empty (leave the key out instead)")
    try:
        spec = get_method(method) if method else None
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    method_fields = _fields(spec.config_cls) if spec else {}
    if fmt_name is None:  # the one format whose options the keys name, else native for a method
        theirs = set(data) - set(method_fields)  # a key the method owns names no format
        owners = [f.name for f in formats() if f.writable and theirs & _fields(f.options).keys()]
        if len(owners) == 1:
            fmt_name = owners[0]
        elif method and impl == IMPL:
            fmt_name = default_format().name
    try:
        fmt = get_format(fmt_name) if fmt_name else None
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    option_f = {f.name: f for f in option_fields(fmt)} if fmt else {}
    unknown = sorted(set(data) - set(method_fields) - set(option_f))
    if unknown:
        key = unknown[0]
        owners = [m for m in method_names() if key in _fields(get_method(m).config_cls)]
        if owners and not method:
            raise ConfigError(
                f"{where}: {key!r} is a method setting ({', '.join(owners)}): give a method"
            )
        allowed = [*VARIANT_KEYS, *method_fields, *option_f]
        raise ConfigError(f"{where}: unknown key {key!r}; allowed: {', '.join(allowed)}")
    both = sorted(set(data) & set(method_fields) & set(option_f))
    if both:
        raise ConfigError(
            f"{where}: {both[0]!r} is a setting of method {method} and of format {fmt_name}; "
            "one of them must rename it"
        )
    given_method = {k: data[k] for k in data if k in method_fields}
    given_options = {k: data[k] for k in data if k in option_f}
    if spec:
        _check_types(field_types(spec.config_cls), given_method, where)
    if fmt:
        _check_types(field_types(fmt.options), given_options, where)
    try:
        config = spec.config_cls(**given_method) if spec else None
        options = fmt.options(**given_options) if fmt else None
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    _check_variant(where, method, config, fmt, options, impl, imatrix, streaming, given_method)
    if rotate and method is None and fmt is None:
        raise ConfigError(f"{where}: rotate applies to quantized variants (a method or a format)")
    given = set(given_method) if method else set(given_options)
    name = own.get("name") or _default_name(
        method, config, given, fmt, options, impl, imatrix, rotate
    )
    _check_name("variant name", name)
    return Variant(
        name, method, config, fmt_name, options, impl, imatrix, bool(streaming), rotate=rotate
    )


def _parse_fit_variant(data: dict, where: str) -> Variant:
    """``{fit: {bpw: 4.5}, format: gguf}``: the format's best per-tensor mix for the budget
    (`quantlab.fit`), from the sensitivity measured on the run's calibration set."""
    from quantlab.fit import FitTarget
    from quantlab.formats import formats, get_format

    fit, fmt_name, name = data.pop("fit"), data.pop("format", None), data.pop("name", None)
    can = ", ".join(f.name for f in formats() if f.fit_family)
    if data:
        key = sorted(data)[0]
        raise ConfigError(
            f"{where}: {key!r} does not go with fit; a fit variant has fit, format ({can}) and name"
        )
    if not isinstance(fit, dict):
        raise ConfigError(f"{where}: fit: expected a mapping such as {{bpw: 4.5}}")
    allowed = _fields(FitTarget)
    unknown = sorted(set(fit) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{where}: fit: unknown key {unknown[0]!r}; allowed: {', '.join(allowed)}"
        )
    _check_types(field_types(FitTarget), fit, f"{where}: fit")
    if fmt_name is None:
        raise ConfigError(f"{where}: a fit needs a format ({can})")
    try:
        fmt = get_format(fmt_name)
        target = FitTarget(**fit)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not fmt.fit_family:
        raise ConfigError(f"{where}: format {fmt_name} cannot hold a fit; use one of {can}")
    name = name or f"fit-{fmt_name}-{target.name()}"
    _check_name("variant name", name)
    return Variant(name, None, None, fmt_name, fmt.options(), fit=target)


# what the reference toolkits are given of a method's config (`quantlab.reference.run_reference`)
TOOLKIT_SETTINGS = ("bits", "group_size", "sym", "act_order", "damp_percent")


def _check_variant(where, method, config, fmt, options, impl, imatrix, streaming, given) -> None:
    from quantlab.reference import IMPLS, METHODS

    if impl != IMPL:
        if impl not in IMPLS:
            known = ", ".join([IMPL, *IMPLS])
            raise ConfigError(f"{where}: impl must be one of {known}, got {impl!r}")
        if method not in METHODS or fmt is not None:
            raise ConfigError(
                f"{where}: impl {impl} runs that toolkit's {' or '.join(METHODS)} and writes its "
                f"own checkpoint: give method {' or '.join(METHODS)} and no format"
            )
        ignored = sorted(set(given) - set(TOOLKIT_SETTINGS))
        if ignored or imatrix:
            key = ignored[0] if ignored else "imatrix"
            raise ConfigError(
                f"{where}: {key!r} does not reach the {impl} toolkit (it is given "
                f"{', '.join(TOOLKIT_SETTINGS)})"
            )
    elif fmt is not None:
        reason = fmt.accepts(method, config, options, imatrix=imatrix)
        if reason:
            raise ConfigError(f"{where}: {reason}")
    elif imatrix:
        raise ConfigError(f"{where}: imatrix applies to quantized variants (a method or a format)")
    if streaming and (impl != IMPL or method is None or fmt is None or not fmt.streams):
        from quantlab.formats import formats

        can = ", ".join(f.name for f in formats() if f.streams)
        raise ConfigError(
            f"{where}: streaming applies to quantlab's methods with a format written block by "
            f"block ({can})"
        )


@dataclass(frozen=True)
class RunConfig:
    name: str
    model: str
    variants: tuple[Variant, ...]
    calibration: CalibrationConfig = field(
        default_factory=lambda: CalibrationConfig(**CALIBRATION_DEFAULTS)
    )
    evaluation: EvalConfig = field(default_factory=lambda: EvalConfig(**EVALUATION_DEFAULTS))
    output: str = "out"  # artifacts go to <output>/<name>/<variant>
    store: str = "results/quantlab.db"
    # where quantlab's block walks and transformers evaluations run: cpu, cuda, cuda:N, auto
    device: str = "auto"
    offload: bool = False  # activations between blocks on the CPU (calibration sets > the GPU)
    version: int = 2

    def __post_init__(self) -> None:
        from quantlab.devices import check_device_spec

        _check_name("run name", self.name)
        check_device_spec(self.device)
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
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["variants"] = [v.to_dict() for v in self.variants]
        data["calibration"] = dataclasses.asdict(self.calibration)
        data["evaluation"] = dataclasses.asdict(self.evaluation)
        return data

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def _build(cls, data, where: str, defaults: dict | None = None):
    """``cls(**defaults, **data)``, refusing keys ``cls`` does not have (named, with the allowed
    ones) and values of the wrong type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = _fields(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(fields)}")
    _check_types(field_types(cls), data, where)
    try:
        return cls(**{**(defaults or {}), **data})
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


_KINDS = {"int": int, "bool": bool, "str": str, "float": (int, float)}


def _check_types(hints: dict[str, str], data: dict, where: str) -> None:
    """Refuse values of the wrong type (YAML gives strings, numbers, booleans, lists)."""
    for key, value in data.items():
        hint = hints.get(key, "")
        kind = _KINDS.get(hint.split(" ")[0])
        if kind is None or (value is None and "None" in hint):
            continue
        wrong_bool = isinstance(value, bool) and kind is not bool
        if wrong_bool or not isinstance(value, kind):
            raise ConfigError(f"{where}.{key}: {value!r} is not a valid {hint}")


def _evaluation(data, where: str = "evaluation") -> EvalConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping")
    data = dict(data)
    if "perplexity" in data:
        ppl = data["perplexity"]
        if not isinstance(ppl, list):
            raise ConfigError(f"{where}.perplexity: expected a list of mappings")
        data["perplexity"] = tuple(
            _build(PerplexityConfig, p, f"{where}.perplexity[{i}]") for i, p in enumerate(ppl)
        )
    if "tasks" in data:
        if not isinstance(data["tasks"], list):
            raise ConfigError(f"{where}.tasks: expected a list of task names")
        data["tasks"] = tuple(data["tasks"])
    return _build(EvalConfig, data, where, EVALUATION_DEFAULTS)


def parse_run_config(data) -> RunConfig:
    """A `RunConfig` from parsed YAML (a dict)."""
    if not isinstance(data, dict):
        raise ConfigError("a run config is a mapping with name, model, variants, ...")
    data = dict(data)
    allowed = list(_fields(RunConfig))
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"run config: unknown key {unknown[0]!r}; allowed: {', '.join(allowed)}")
    variants = data.get("variants")
    if not isinstance(variants, list):
        raise ConfigError("variants: expected a list of mappings")
    data["variants"] = tuple(parse_variant(v, f"variants[{i}]") for i, v in enumerate(variants))
    data["calibration"] = _build(
        CalibrationConfig, data.get("calibration"), "calibration", CALIBRATION_DEFAULTS
    )
    data["evaluation"] = _evaluation(data.get("evaluation"))
    for key in ("name", "model"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise ConfigError(f"{key}: required (a string)")
    paths = {k: data[k] for k in ("output", "store", "device", "offload") if k in data}
    kinds = {"output": "str", "store": "str", "device": "str", "offload": "bool"}
    _check_types(kinds, paths, "run config")
    try:
        return RunConfig(**data)
    except TypeError as exc:
        raise ConfigError(f"run config: {exc}") from None


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
