"""`quantlab fit`: the artifact that fits a budget, from the measured sensitivity.

A `FitTarget` names the budget: bits per weight of the tensors the fit quantizes (``bpw``), the
artifact's size (``size``), or a GPU's memory (``vram``, with ``context`` and ``batch``: the
planner's KV-cache, compute-buffer and runtime model, `quantlab.workbench.plan`, takes its share
first). `plan_fit` turns it into a per-tensor choice (`quantlab.fit.allocate`) for a family of
settings - ``ggml`` (one ggml type per tensor, for GGUF files, embedding included) or ``int``
(GPTQ bits per module; the linears that read one input - q/k/v, gate/up - share a setting, as
GPTQ solves them together and vLLM fuses them) - and `build_fit` writes it:

- GGUF: llama.cpp's own quantization of the full-precision GGUF with one ``tt_overrides`` entry
  per tensor and the shared importance matrix; the types written are read back and must be the
  ones chosen;
- GPTQ: quantlab's GPTQ with per-module bits (`quantize_model`'s ``overrides``), written with
  GPTQModel's per-module ``dynamic`` config, which GPTQModel, vLLM and quantlab's loader read.

The artifact's manifest holds the target, the per-tensor settings, the predicted KLD and the
sensitivity file it came from; the harness then measures it like every other artifact.

Without weights (a config.json alone, ``--dry-run``) the sizes come from the real shapes and the
costs from a prior (every tensor equally sensitive, error ~ 2^(-2 x bits)): it shows the budget
and the kind of mix, not a measured optimum.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from quantlab.errors import ConfigError, QuantlabError
from quantlab.fit.allocate import Allocation, Option, allocate
from quantlab.fit.candidates import Setting, Unit, candidate_settings

BUDGETS = ("bpw", "size", "size_of", "vram")
FIT_GROUPS = (32, 64, 128)  # group sizes a GPTQ fit chooses among (GPTQModel's dynamic holds them)


@dataclass(frozen=True)
class FitTarget:
    """The budget a fit must meet: exactly one of ``bpw``, ``size``, ``size_of``, ``vram``."""

    bpw: float | None = None  # bits per weight of the tensors the fit quantizes
    size: str | None = None  # the artifact's size, e.g. 3GiB, 105MiB
    vram: str | None = None  # the GPU's memory, e.g. 8GiB (with context and batch)
    # the size of another artifact: a variant of the same run (its name) or a path
    size_of: str | None = None
    context: int = 4096
    batch: int = 1
    # GPTQ fits: one group size for every module, or None: each module's own among FIT_GROUPS
    group_size: int | None = None
    exclude: tuple[str, ...] = ()  # settings the fit may not choose (Q4_1, w2g128, ...)
    version: int = 1

    def __post_init__(self) -> None:
        from quantlab.workbench.plan import parse_size

        given = [k for k in BUDGETS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(
                f"fit: give exactly one of {', '.join(BUDGETS)} (got {given or 'none'})"
            )
        if self.bpw is not None and not 0 < float(self.bpw) <= 32:
            raise ConfigError(f"fit: bpw must be in (0, 32], got {self.bpw}")
        for key in ("size", "vram"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, str(getattr(self, key)))
                parse_size(getattr(self, key))  # a clear error for a bad size
        if self.context < 1 or self.batch < 1:
            raise ConfigError("fit: context and batch must be >= 1")
        if self.group_size is not None and self.group_size != -1 and self.group_size < 1:
            raise ConfigError(f"fit: group_size must be -1 or >= 1, got {self.group_size}")
        if isinstance(self.exclude, str) or not all(isinstance(k, str) for k in self.exclude):
            raise ConfigError("fit: exclude is a list of setting names (Q4_1, w2g128, ...)")
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def group_sizes(self) -> tuple[int, ...]:
        """The group sizes a GPTQ fit may give a module."""
        return FIT_GROUPS if self.group_size is None else (self.group_size,)

    def describe(self) -> str:
        if self.bpw is not None:
            return f"{self.bpw:g} bits/weight"
        if self.size is not None:
            return f"size {self.size}"
        if self.size_of is not None:
            return f"the size of {self.size_of}"
        return f"{self.vram} VRAM at context {self.context}, batch {self.batch}"

    def name(self) -> str:
        """``bpw4.5``, ``size105MiB``, ``vram8GiB-ctx8192``: a variant name's part (with
        ``-no-Q4_1`` for excluded settings)."""
        return self._budget_name() + "".join(f"-no-{k}" for k in self.exclude)

    def _budget_name(self) -> str:
        if self.bpw is not None:
            return f"bpw{self.bpw:g}"
        if self.size is not None:
            return "size" + self.size.replace(" ", "")
        if self.size_of is not None:
            return "like-" + Path(self.size_of).name.removesuffix(".gguf")
        return f"vram{self.vram.replace(' ', '')}-ctx{self.context}"


@dataclass
class FitPlan:
    """A fit's choice: a setting per allocated unit (a tensor, or an input group of linears)."""

    family: str  # gguf | int
    target: FitTarget
    units: list[Unit]
    members: dict[str, list[str]]  # allocated unit -> the tensors (HF names) it covers
    allocation: Allocation
    fixed_bytes: int  # what the artifact holds beyond the allocated tensors
    measured: bool  # costs from a measured sensitivity (else the prior)
    sensitivity: str | None = None  # the sensitivity file
    notes: list[str] = field(default_factory=list)

    def settings(self) -> dict[str, str]:
        """Tensor (HF name) -> setting key."""
        out = {}
        for key, names in self.members.items():
            for name in names:
                out[name] = self.allocation.choice[key].key
        return out

    def gguf_settings(self) -> dict[str, str]:
        """GGUF tensor name -> ggml type."""
        gguf = {u.name: u.gguf_name for u in self.units}
        return {gguf[name]: key for name, key in self.settings().items()}

    @property
    def predicted_kld(self) -> float:
        return self.allocation.predicted

    @property
    def nbytes(self) -> int:
        return self.allocation.nbytes + self.fixed_bytes

    @property
    def bits_per_weight(self) -> float:
        weights = sum(u.weights for u in self.units)
        return 8 * self.allocation.nbytes / weights

    def layer_bits(self) -> dict[int, float]:
        """Bits per weight of each block's allocated tensors (-1: embedding and head)."""
        by_name = {u.name: u for u in self.units}
        sizes: dict[int, list[float]] = {}
        for name, key in self.settings().items():
            unit = by_name[name]
            nbytes = Setting.from_key(key).nbytes(*unit.shape)
            acc = sizes.setdefault(unit.layer, [0.0, 0.0])
            acc[0] += 8 * nbytes
            acc[1] += unit.weights
        return {layer: b / w for layer, (b, w) in sorted(sizes.items())}

    def record(self) -> dict:
        """What the artifact's manifest says of the fit."""
        return {
            "target": dataclasses.asdict(self.target),
            "family": self.family,
            "predicted_kld": self.predicted_kld,
            "measured_sensitivity": self.measured,
            "sensitivity": self.sensitivity,
            "allocated_bytes": self.allocation.nbytes,
            "budget_bytes": self.allocation.budget,
            "bits_per_weight": round(self.bits_per_weight, 4),
            "counts": self.counts(),
            "layer_bits": {str(k): round(v, 4) for k, v in self.layer_bits().items()},
            "settings": self.settings(),
        }

    def counts(self) -> dict[str, int]:
        """How many tensors get each setting, most first."""
        out: dict[str, int] = {}
        for key in self.settings().values():
            out[key] = out.get(key, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def summary_lines(self) -> list[str]:
        counts = ", ".join(f"{n} {k}" for k, n in self.counts().items())
        lines = [
            f"target: {self.target.describe()} -> {self.allocation.budget / 2**20:.1f} MiB for "
            f"the {len(self.units)} quantized tensors (+ {self.fixed_bytes / 2**20:.1f} MiB of "
            "other tensors and metadata)",
            f"chosen: {self.allocation.nbytes / 2**20:.1f} MiB, {self.bits_per_weight:.3f} "
            f"bits/weight; {counts}",
            f"predicted KLD {self.predicted_kld:.5f} (measured sensitivity)"
            if self.measured
            else "no sensitivity measured: the prior's choice (every tensor equally sensitive, "
            "error ~ 2^(-2 x bits)), not a KLD prediction",
        ]
        return lines + [f"note: {n}" for n in self.notes]


def _group_units(units: list[Unit], arch) -> dict[str, list[Unit]]:
    """For integer checkpoints: the linears of each block that read one input, as one unit."""
    by_name = {u.name: u for u in units}
    groups: dict[str, list[Unit]] = {}
    layers = sorted({u.layer for u in units})
    for layer in layers:
        prefix = f"{arch.blocks}.{layer}"
        for group in arch.input_groups:
            members = [
                by_name[f"{prefix}.{n}"] for n in group.linears if f"{prefix}.{n}" in by_name
            ]
            if members:
                groups["+".join(u.name for u in members)] = members
    return groups


def _prior_cost(unit: Unit, s: Setting) -> float:
    return 4.0 ** (-8 * s.nbytes(*unit.shape) / unit.weights)


def plan_fit(
    units: list[Unit],
    family: str,
    target: FitTarget,
    *,
    arch,
    config: dict,
    fixed_bytes: int,
    sensitivity=None,
) -> FitPlan:
    """The allocation for ``target`` over ``units`` (see the module docstring); ``sensitivity``
    None uses the prior."""
    from quantlab.workbench.plan import RUNTIME_BYTES, Shapes, parse_size

    if family == "int":
        units = [u for u in units if u.layer >= 0]
        groups = _group_units(units, arch)
    else:
        groups = {u.name: [u] for u in units}
    curves: dict[str, list[Option]] = {}
    for key, members in groups.items():
        per = [
            {
                s.key: s
                for s in candidate_settings(u, family, group_sizes=target.group_sizes())
                if s.key not in target.exclude
            }
            for u in members
        ]
        common = [k for k in per[0] if all(k in p for p in per[1:])]
        options = []
        if sensitivity is not None:  # the settings it measured
            common = [
                k for k in common if all(k in sensitivity.units[u.name].errors for u in members)
            ]
            if not common:
                raise QuantlabError(
                    f"the sensitivity measured no {family} setting for {key}: measure them with "
                    f"quantlab sensitivity MODEL --families {family}"
                )
        for k in common:
            s = per[0][k]
            if sensitivity is not None:
                cost = sum(sensitivity.units[u.name].predicted(k) for u in members)
            else:
                cost = sum(_prior_cost(u, s) for u in members)
            options.append(Option(k, sum(s.nbytes(*u.shape) for u in members), cost))
        curves[key] = options
    weights = sum(u.weights for u in units)
    notes = []
    if target.bpw is not None:
        budget = int(target.bpw * weights / 8)
    elif target.size is not None:
        budget = parse_size(target.size) - fixed_bytes
    elif target.size_of is not None:
        raise QuantlabError("fit: resolve size_of to a size first (`resolve_size_of`)")
    else:
        shapes = Shapes.from_config(config)
        kv = shapes.kv_bytes(target.context, target.batch)
        compute = shapes.compute_bytes(target.context, target.batch)
        budget = parse_size(target.vram) - kv - compute - RUNTIME_BYTES - fixed_bytes
        notes.append(
            f"of {target.vram}: KV cache {kv / 2**30:.2f} GiB, compute buffer "
            f"{compute / 2**30:.2f} GiB, runtime {RUNTIME_BYTES / 2**30:.2f} GiB (the planner's "
            "model)"
        )
    if budget <= 0:
        raise QuantlabError(f"nothing fits {target.describe()}: no room left for the weights")
    allocation = allocate(curves, budget)
    members = {k: [u.name for u in v] for k, v in groups.items()}
    return FitPlan(
        family, target, units, members, allocation, fixed_bytes, sensitivity is not None,
        notes=notes,
    )  # fmt: skip


def units_for(model_ref, family: str) -> list[Unit]:
    from quantlab.fit.candidates import model_units
    from quantlab.models.info import linear_shapes

    return model_units(
        model_ref.folder.arch, linear_shapes(model_ref), model_ref.folder.config, family=family
    )


def fixed_bytes_of(model_ref, family: str, units: list[Unit], cache) -> int:
    """Bytes of the artifact beyond the allocated tensors: for GGUF the full-precision file less
    those tensors at 4 bytes (norms, metadata, tokenizer); for GPTQ every other tensor at 16 bits
    (as the writer stores them)."""
    if family == "ggml":
        from quantlab.formats.gguf_quant import full_precision_gguf

        src = full_precision_gguf(model_ref, cache)
        return src.stat().st_size - 4 * sum(u.weights for u in units)
    allocated = {u.name + ".weight" for u in units if u.layer >= 0}
    embed = model_ref.folder.arch.embed + ".weight"
    tied = bool(model_ref.folder.config.get("tie_word_embeddings", False))
    total = 0
    for t in model_ref.folder.tensors:
        if t.name in allocated or (tied and t.name == model_ref.folder.arch.lm_head + ".weight"):
            continue
        total += 2 * math.prod(int(d) for d in t.shape)
    if tied and not any(t.name == embed for t in model_ref.folder.tensors):
        raise QuantlabError(f"{model_ref.path}: no {embed} tensor")
    return total


def config_units(config: dict, family: str) -> tuple[list[Unit], object, int]:
    """Units, architecture and fixed bytes from a config.json alone (``--dry-run`` without
    weights), from the planner's shapes."""
    from quantlab.fit.candidates import model_units
    from quantlab.formats.gguf_quant import HF_TO_GGUF
    from quantlab.models.arch import arch_spec_for_config
    from quantlab.workbench.plan import GGUF_VOCAB_BYTES, Shapes

    arch = arch_spec_for_config(config)
    shapes = Shapes.from_config(config)
    local = {v: k for k, v in HF_TO_GGUF.items()}
    linears = {
        f"{arch.blocks}.{i}.{local[kind]}": (out, inp)
        for i in range(shapes.layers)
        for kind, out, inp in shapes.linears()
    }
    units = model_units(arch, linears, config, family=family)
    norms = (2 * shapes.layers + 1) * shapes.hidden
    if family == "ggml":
        fixed = 4 * norms + shapes.vocab * GGUF_VOCAB_BYTES
    else:
        fixed = 2 * (norms + shapes.vocab * shapes.hidden * (1 if shapes.tied else 2))
    return units, arch, fixed


def build_fit(plan: FitPlan, fmt, shared, out: Path, *, progress: bool = True):
    """Write ``plan`` as an artifact of format ``fmt`` at ``out``; returns ``(path, result)``
    (``result`` the method's `QuantizationResult`, None for GGUF)."""
    from quantlab.formats import WriteRequest

    model_ref = shared.model_ref
    extra = {"fit": plan.record()}
    if plan.family == "ggml":
        corpus, calibration = shared.calibration()
        request = WriteRequest(
            Path(out), model_ref, fmt.options(), imatrix=shared.imatrix(),
            calibration=calibration, corpus_label=corpus.label, cache=shared.cache,
            tensor_settings=plan.gguf_settings(), manifest_extra=extra,
        )  # fmt: skip
        return fmt.write(request), None
    from quantlab.methods import get_method
    from quantlab.methods.runner import quantize_model
    from quantlab.models import load_model

    spec = get_method(fmt.fit_method)
    settings = {name: Setting.from_key(key) for name, key in plan.settings().items()}
    counts: dict[Setting, int] = {}
    for s in settings.values():
        counts[s] = counts.get(s, 0) + 1
    base = max(counts, key=counts.get)

    def config_of(s: Setting):
        return spec.config_cls(bits=s.bits, group_size=s.group_size)

    config = config_of(base)
    overrides = {name: config_of(s) for name, s in settings.items() if s != base}
    _, calibration = shared.calibration()
    model = load_model(model_ref)
    result = quantize_model(
        model, model_ref.folder.arch, spec.name, config, calibration,
        calib_dtype=shared.calibration_config.dtype, progress=progress, overrides=overrides,
        device=shared.device, offload=shared.offload,
    )  # fmt: skip
    options = fmt.options(**fmt.options_for(config))
    request = WriteRequest(
        Path(out), model_ref, options, result=result, model=model, cache=shared.cache,
        manifest_extra=extra,
    )  # fmt: skip
    return fmt.write(request), result


def resolve_size_of(target: FitTarget, out: Path) -> FitTarget:
    """``target`` with ``size_of`` replaced by that artifact's size: a variant of the same run
    (an artifact beside ``out`` with that name) or a path."""
    from quantlab.formats import detect, formats

    if target.size_of is None:
        return target
    name = target.size_of
    # a path, or where the sweep puts a variant's artifact: <folder>/<name><format suffix>
    suffixes = dict.fromkeys(f.suffix for f in formats() if f.writable)
    candidates = [Path(name), *(Path(out).parent / f"{name}{suffix}" for suffix in suffixes)]
    for path in candidates:
        found = detect(path) if path.exists() else None
        if found is not None:  # a file's own size (GGUF: with its metadata), a folder's tensors
            nbytes = path.stat().st_size if path.is_file() else found[0].size(path).tensor_bytes
            return dataclasses.replace(target, size=f"{nbytes}B", size_of=None)
    raise QuantlabError(
        f"fit size_of {name!r}: no artifact of that name beside {out} (a variant of the run "
        "made before this one) and no such path"
    )


def make_fit(target: FitTarget, fmt, shared, out: Path, *, progress: bool = True):
    """The whole fit of a run's variant: the sensitivity (measured once per model and
    calibration set, then read from the cache), the allocation, the artifact. Returns
    ``(path, plan, result)``."""
    from quantlab import settings
    from quantlab.fingerprint import content_sha256
    from quantlab.fit.sensitivity import (
        SensitivityConfig,
        measure_sensitivity,
        sensitivity_path,
        stored_sensitivity,
    )

    family = fmt.fit_family
    if family is None:
        raise QuantlabError(f"format {fmt.name} cannot hold a fit")
    target = resolve_size_of(target, out)
    model_ref = shared.model_ref
    cache = settings.cache_dir(shared.cache)
    _, calibration = shared.calibration()
    values, _rows = shared.imatrix()
    groups = target.group_sizes() if family == "int" else SensitivityConfig().group_sizes
    config = SensitivityConfig(families=(family,), group_sizes=groups)
    stored = stored_sensitivity(cache, content_sha256(model_ref.path), calibration.sha256)
    if stored is not None:  # reuse what was measured (extended to this fit's settings)
        c = stored.config
        config = dataclasses.replace(config, tokens=c.tokens, swaps=c.swaps, seed=c.seed)
    sens = measure_sensitivity(
        model_ref, calibration, values, config, cache=cache, progress=progress, log=shared.log
    )
    units = units_for(model_ref, family)
    plan = plan_fit(
        units,
        family,
        target,
        arch=model_ref.folder.arch,
        config=model_ref.folder.config,
        fixed_bytes=fixed_bytes_of(model_ref, family, units, cache),
        sensitivity=sens,
    )
    plan.sensitivity = str(
        sensitivity_path(cache, sens.model_sha256, calibration.sha256, sens.config)
    )
    path, result = build_fit(plan, fmt, shared, out, progress=progress)
    return path, plan, result


def fit_record(artifact: str | Path) -> dict | None:
    """The ``fit`` section of an artifact's manifest (what `build_fit` wrote: target, settings,
    predicted KLD), or None (not a fit, or the artifact is gone)."""
    import json

    from quantlab.formats.manifest import read_manifest

    path = Path(artifact)
    try:
        if path.is_dir():
            manifest = read_manifest(path) or {}
        else:
            side = path.with_name(path.name + ".manifest.json")
            manifest = json.loads(side.read_text()) if side.is_file() else {}
    except (OSError, ValueError, QuantlabError):
        return None
    fit = manifest.get("fit") if isinstance(manifest, dict) else None
    return fit if isinstance(fit, dict) else None
