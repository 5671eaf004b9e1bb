"""Per-tensor sensitivity, measured once per model and calibration set, serving every format.

The question a fit asks is: if tensor ``t`` is stored in setting ``s`` (a ggml type, or integer
bits at a group size), how far does the model's output distribution move? quantlab answers it
with a measured model of the answer (the idea of ExLlamaV3's measurement):

    predicted KLD(t, s) = c_t * E(t, s)

- ``E(t, s)`` is the relative weight error of the setting on that tensor, weighted by the
  importance matrix (``d_j`` = mean of x_j^2 over the calibration set for input column ``j``):
  ``E = sum_ij d_j (W'_ij - W_ij)^2 / sum_ij d_j W_ij^2``, the expected relative output error
  when the inputs' columns are uncorrelated. GGUF settings are llama.cpp's own quantization (the
  whole model quantized to each type with the shared importance matrix, ``tt_overrides`` forcing
  the type, then dequantized with ``gguf``); integer settings are symmetric round-to-nearest
  (`quantlab.primitives.fake_quantize`), as a GPTQ fit writes them (v1 checkpoints, which every
  loader runs; GPTQ's own solve then lowers the error further). The embedding (also the output
  layer when tied) is weighted uniformly.
- ``c_t`` is measured: the tensor alone is quantized with a probe setting (RTN 3-bit, group 32),
  and the mean KL divergence of the final next-token distributions from the unquantized model's
  is computed over ``tokens`` calibration tokens, exact over the whole vocabulary; ``c_t = KLD /
  E(t, probe)``. KLD is quadratic in a small logit change, and the logit change linear in the
  weight error, hence linear in ``E``. Only the blocks from the tensor's block on are run (the
  block inputs of the unquantized model are cached), so a probe costs on average half a forward.
- The model is checked: ``swaps`` further (tensor, setting) pairs per family, drawn at random
  among the settings measured (a later extension draws its own), are measured the same way, and
  the Spearman rank correlation between predicted and measured KLD is stored with the result
  (ExLlamaV3 reports 0.84 for its model).

The result (`Sensitivity`) is a JSON file in the cache, keyed by the model's content hash, the
calibration set's hash and the settings measured; a run that is interrupted resumes from the
units and swaps already measured (``<file>.partial.json``). A fit sums the predictions over the
tensors (first order: the effects of small independent perturbations add).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from quantlab.errors import ConfigError, QuantlabError
from quantlab.fit.candidates import FAMILIES, Setting, Unit, candidate_settings, model_units

FORMAT_VERSION = 1
PROBE = Setting("int", bits=3, group_size=32)


@dataclass(frozen=True)
class SensitivityConfig:
    families: tuple[str, ...] = FAMILIES  # which settings' errors to measure
    group_sizes: tuple[int, ...] = (32, 64, 128)  # the integer family's group sizes
    tokens: int = 1024  # calibration tokens the KLDs are measured on (whole sequences)
    swaps: int = 40  # measured single-tensor swaps that check the prediction
    seed: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families:
            raise ConfigError(f"families must be some of {', '.join(FAMILIES)}, got {bad}")
        if self.tokens < 1 or self.swaps < 0:
            raise ConfigError("tokens must be >= 1 and swaps >= 0")
        object.__setattr__(self, "group_sizes", tuple(int(g) for g in self.group_sizes))
        if not self.group_sizes or any(g != -1 and g < 1 for g in self.group_sizes):
            raise ConfigError(f"group sizes must be -1 or >= 1, got {self.group_sizes}")

    def key(self) -> str:
        """What the measured KLDs depend on (not which settings' errors are there: a later
        request for more settings extends the same file)."""
        fields = {"tokens": self.tokens, "swaps": self.swaps, "seed": self.seed, "v": self.version}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]


@dataclass
class UnitSensitivity:
    unit: Unit
    probe_error: float  # E(t, probe)
    probe_kld: float  # measured mean KLD with the tensor alone at the probe setting
    errors: dict[str, float] = field(default_factory=dict)  # setting key -> E(t, s)

    @property
    def coefficient(self) -> float:
        return self.probe_kld / self.probe_error if self.probe_error > 0 else 0.0

    def predicted(self, key: str) -> float:
        return max(self.coefficient, 0.0) * self.errors[key]


@dataclass
class Sensitivity:
    """What `measure_sensitivity` found (see the module docstring)."""

    model: str
    model_sha256: str
    calibration: dict  # CalibrationSet.provenance()
    config: SensitivityConfig
    units: dict[str, UnitSensitivity]
    swaps: list[dict]  # {unit, setting, error, predicted, measured}
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    tokens: int = 0  # tokens the KLDs were measured on

    @property
    def spearman(self) -> float | None:
        if len(self.swaps) < 3:
            return None
        return spearman([s["predicted"] for s in self.swaps], [s["measured"] for s in self.swaps])

    def settings(self, unit: str, family: str) -> list[str]:
        """The setting keys measured for ``unit`` in ``family``."""
        keys = self.units[unit].errors
        return [k for k in keys if Setting.from_key(k).family == family]

    def to_json(self) -> str:
        units = {
            name: {
                **dataclasses.asdict(u.unit),
                "probe_error": u.probe_error,
                "probe_kld": u.probe_kld,
                "errors": u.errors,
            }
            for name, u in self.units.items()
        }
        data = {
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "model_sha256": self.model_sha256,
            "calibration": self.calibration,
            "config": dataclasses.asdict(self.config),
            "probe": PROBE.key,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 2),
            "stage_seconds": {k: round(v, 2) for k, v in self.stage_seconds.items()},
            "spearman": self.spearman,
            "swaps": self.swaps,
            "units": units,
        }
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Sensitivity:
        try:
            data = json.loads(text)
            if data.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {data.get('format_version')}")
            config = data["config"]
            config["families"] = tuple(config["families"])
            config["group_sizes"] = tuple(config["group_sizes"])
            units = {}
            for name, u in data["units"].items():
                unit = Unit(u["name"], u["kind"], u["layer"], tuple(u["shape"]), u["gguf_name"])
                units[name] = UnitSensitivity(unit, u["probe_error"], u["probe_kld"], u["errors"])
            return cls(
                data["model"],
                data["model_sha256"],
                data["calibration"],
                SensitivityConfig(**config),
                units,
                data["swaps"],
                data.get("seconds", 0.0),
                data.get("stage_seconds", {}),
                data.get("tokens", 0),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise QuantlabError(f"not a quantlab sensitivity file ({exc})") from None

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(self.to_json() + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Sensitivity:
        return cls.from_json(Path(path).read_text())


def spearman(a, b) -> float:
    """Spearman's rank correlation (ties get their average rank)."""

    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=np.float64)
        for value in np.unique(x):  # average rank of ties
            tied = x == value
            r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / denom) if denom else 0.0


def sensitivity_path(cache: Path, model_sha256: str, calibration_sha256: str, config) -> Path:
    name = f"{model_sha256[:16]}-{calibration_sha256[:16]}-{config.key()}.json"
    return Path(cache) / "sensitivity" / name


def stored_sensitivity(cache: Path, model_sha256: str, calibration_sha256: str):
    """The sensitivity already measured for this model and calibration set (any measurement
    settings; the one on the most tokens), or None."""
    folder = Path(cache) / "sensitivity"
    found = []
    for path in folder.glob(f"{model_sha256[:16]}-{calibration_sha256[:16]}-*.json"):
        if path.name.endswith(".partial.json"):
            continue
        try:
            found.append(Sensitivity.load(path))
        except (OSError, QuantlabError):
            continue  # unreadable: measured again
    return max(found, key=lambda s: s.config.tokens, default=None)


def weighted_error(w: torch.Tensor, wq: torch.Tensor, d: torch.Tensor | None) -> float:
    """``sum_ij d_j (wq - w)^2 / sum_ij d_j w^2`` (``d`` None: uniform)."""
    diff = (wq.float() - w.float()).square().sum(dim=0)
    ref = w.float().square().sum(dim=0)
    if d is not None:
        diff, ref = diff * d, ref * d
    total = float(ref.sum())
    return float(diff.sum()) / total if total > 0 else 0.0


class OutputProbe:
    """The unquantized model on ``ids``, with its block inputs and output distribution cached,
    and the KLD of the model with one tensor replaced (`kld`).

    Per position, with ``z`` the model's logits and ``P`` the reference distribution,
    ``KLD = sum_v P_v (log P_v - log Q_v) = [P.z_ref - lse(z_ref)] - [P.z - lse(z)]`` (the
    log-probs are logits less their log-sum-exp, and ``P`` sums to 1). The first bracket is
    cached; for a tensor that is not the output layer, ``P.z = (P W) . norm(h) + P.b`` with
    ``P W`` cached too, so a probe costs the blocks it runs, one output matmul and one
    log-sum-exp, never a (tokens x vocabulary) log-softmax."""

    def __init__(self, model, arch, ids: torch.Tensor):
        from quantlab.methods.runner import capture_block_inputs, forward_block

        self.model, self.arch, self.ids = model, arch, ids
        self.blocks = model.get_submodule(arch.blocks)
        self.norm = model.get_submodule(arch.final_norm)
        self.head = model.get_submodule(arch.lm_head)
        hidden, self.kwargs = capture_block_inputs(model, arch, ids, torch.float32, "cpu")
        self.inputs = []
        with torch.inference_mode():
            for block in self.blocks:
                self.inputs.append(hidden)
                hidden = forward_block(block, hidden, self.kwargs)
            self.final = hidden  # the last block's output
            normed = self._normed(hidden)
            logits = self.head(normed).float()
            self.p = torch.softmax(logits, dim=-1)  # (N, V)
            self.pW = self.p @ self.head.weight.float()  # (N, H)
            bias = getattr(self.head, "bias", None)
            self.pb = None if bias is None else self.p @ bias.float()
            self.base = self._p_dot(normed) - torch.logsumexp(logits, dim=-1).double()

    def _normed(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden).float().reshape(-1, hidden.shape[-1])

    def _p_dot(self, normed: torch.Tensor) -> torch.Tensor:
        """``P . z`` per position for logits ``z = head(normed)`` with the cached head."""
        out = (self.pW.double() * normed.double()).sum(dim=-1)
        return out if self.pb is None else out + self.pb.double()

    def _run_from(self, layer: int) -> torch.Tensor:
        from quantlab.methods.runner import capture_block_inputs, forward_block

        if layer == len(self.blocks):  # only the head changed
            return self.final
        if layer < 0:  # the embedding changed: the first block's input too
            hidden, _ = capture_block_inputs(self.model, self.arch, self.ids, torch.float32, "cpu")
            layer = 0
        else:
            hidden = self.inputs[layer]
        for block in list(self.blocks)[layer:]:
            hidden = forward_block(block, hidden, self.kwargs)
        return hidden

    def kld(self, unit: Unit, weight: torch.Tensor) -> float:
        """Mean KL divergence (reference || model) with ``unit``'s weight replaced by
        ``weight``."""
        param = self.model.get_submodule(unit.name).weight
        saved = param.detach().clone()
        start = len(self.blocks) if unit.kind == "output" else unit.layer
        head_changed = param is self.head.weight
        try:
            with torch.no_grad():
                param.copy_(weight.to(param.dtype))
            with torch.inference_mode():
                normed = self._normed(self._run_from(start))
                logits = self.head(normed).float()
                lse = torch.logsumexp(logits, dim=-1).double()
                if head_changed:
                    p_dot = (self.p * logits).sum(dim=-1, dtype=torch.float64)
                else:
                    p_dot = self._p_dot(normed)
                kl = self.base - (p_dot - lse)
        finally:
            with torch.no_grad():
                param.copy_(saved)
        return float(kl.mean())

    def weight(self, unit: Unit) -> torch.Tensor:
        """The unquantized float32 weight of ``unit`` (a copy)."""
        return self.model.get_submodule(unit.name).weight.detach().float().clone()


def _imatrix_of(unit: Unit, imatrix: dict) -> torch.Tensor | None:
    values = imatrix.get(unit.name)
    return None if values is None else torch.as_tensor(np.asarray(values), dtype=torch.float32)


def _hf_rows(values: np.ndarray, unit: Unit, n_head: int, n_kv: int, permuted: bool):
    """A GGUF tensor's rows in the Hugging Face order (llama.cpp's converter interleaves the
    rotary halves of q/k rows for llama)."""
    from quantlab.formats.gguf_lossless import rotary_permute

    t = torch.from_numpy(np.ascontiguousarray(values)).float()
    if permuted and unit.kind in ("attn_q", "attn_k"):
        heads = n_head if unit.kind == "attn_q" else n_kv
        order = rotary_permute(torch.arange(t.shape[0]), heads)
        t = t[torch.argsort(order)]
    return t


def measure_sensitivity(
    model_ref,
    calibration,
    imatrix: dict,
    config: SensitivityConfig = SensitivityConfig(),
    *,
    cache: Path,
    progress: bool = True,
    log=None,
) -> Sensitivity:
    """The sensitivity of ``model_ref``'s tensors on ``calibration`` (a `CalibrationSet`), with
    ``imatrix`` (HF linear name -> mean x^2) that calibration set's importance matrix: read from
    the cache, and measured for whatever ``config`` asks that the cached file lacks (tensors,
    settings of a family or group size); see the module docstring."""
    from quantlab.console import bar_stream
    from quantlab.fingerprint import content_sha256
    from quantlab.models import load_model
    from quantlab.models.info import linear_shapes
    from quantlab.primitives import fake_quantize

    log = log or (lambda _m: None)
    model_sha = content_sha256(model_ref.path)
    path = sensitivity_path(cache, model_sha, calibration.sha256, config)
    partial = path.with_name(path.name.removesuffix(".json") + ".partial.json")
    arch, cfg = model_ref.folder.arch, model_ref.folder.config
    family = "ggml" if "ggml" in config.families else "int"  # ggml units include the embedding
    units = model_units(arch, linear_shapes(model_ref), cfg, family=family)
    by_name = {u.name: u for u in units}
    pairs = []  # (unit, setting key): every candidate the request covers
    for unit in units:
        for fam in config.families:
            if fam == "int" and unit.layer < 0:
                continue  # integer checkpoints keep the embedding and head in 16 bits
            for group in config.group_sizes if fam == "int" else (0,):
                for s in candidate_settings(unit, fam, group_sizes=(group,)):
                    pairs.append((unit.name, s.key))
    found = path if path.is_file() else partial if partial.is_file() else None
    if found is not None:
        result = Sensitivity.load(found)
    else:
        result = Sensitivity(
            model_ref.spec, model_sha, calibration.provenance(), config, {}, [], 0.0, {}, 0
        )
    todo_units = [u for u in units if u.name not in result.units]
    todo_pairs = [
        (n, k) for n, k in pairs if n not in result.units or k not in result.units[n].errors
    ]
    if not todo_units and not todo_pairs:
        return result
    if found is not None:
        log(f"sensitivity: extending {found.name} ({len(todo_pairs)} settings to measure)")
    start = time.perf_counter()
    stages = result.stage_seconds

    def add(stage: str, since: float) -> None:
        stages[stage] = stages.get(stage, 0.0) + time.perf_counter() - since

    ids = torch.as_tensor(np.array(calibration.input_ids))
    ids = ids[: max(1, config.tokens // ids.shape[1])]
    result.tokens = int(ids.numel())
    model = load_model(model_ref)
    model.eval()
    t0 = time.perf_counter()
    probe = OutputProbe(model, arch, ids)
    add("reference", t0)

    from tqdm import tqdm

    def bar(total, desc, unit="tensor"):
        return tqdm(total=total, desc=desc, unit=unit, file=bar_stream(), disable=not progress)

    # 1. the measured coefficient of each tensor (the probe), saved as it goes (resumable)
    t0 = time.perf_counter()
    with bar(len(todo_units), "sensitivity probes") as b:
        for i, unit in enumerate(todo_units):
            w = probe.weight(unit)
            wq = fake_quantize(w, PROBE.bits, PROBE.group_size, False)
            d = _imatrix_of(unit, imatrix)
            result.units[unit.name] = UnitSensitivity(
                unit, weighted_error(w, wq, d), probe.kld(unit, wq)
            )
            b.update(1)
            if i % 10 == 9:
                add("probes", t0)
                t0 = time.perf_counter()
                result.save(partial)
    add("probes", t0)
    result.save(partial)

    # 2. the errors of the settings asked for; the swaps that check the model
    t0 = time.perf_counter()
    # the check swaps: per family, drawn among the settings measured now (an extension that
    # measures more settings adds its own)
    rng = random.Random(f"{config.seed}-{len(result.swaps)}")
    chosen = set()
    for fam in FAMILIES:
        among = [p for p in todo_pairs if Setting.from_key(p[1]).family == fam]
        chosen |= set(rng.sample(among, min(config.swaps, len(among))))
    measured = {(s["unit"], s["setting"]) for s in result.swaps}

    def swap(unit: Unit, key: str, wq: torch.Tensor) -> None:
        if (unit.name, key) in chosen and (unit.name, key) not in measured:
            result.swaps.append(
                {
                    "unit": unit.name,
                    "setting": key,
                    "error": result.units[unit.name].errors[key],
                    "predicted": 0.0,  # filled in below
                    "measured": probe.kld(unit, wq),
                }
            )
            measured.add((unit.name, key))

    int_pairs = [(n, k) for n, k in todo_pairs if Setting.from_key(k).family == "int"]
    with bar(len(int_pairs), "integer settings", unit="setting") as b:
        for name, key in int_pairs:
            unit, s = by_name[name], Setting.from_key(key)
            w = probe.weight(unit)
            wq = fake_quantize(w, s.bits, s.group_size, True)
            result.units[name].errors[key] = weighted_error(w, wq, _imatrix_of(unit, imatrix))
            swap(unit, key, wq)
            b.update(1)
    gguf_pairs = [(n, k) for n, k in todo_pairs if Setting.from_key(k).family == "ggml"]
    if gguf_pairs:
        _gguf_errors(model_ref, units, result, imatrix, cache, swap, bar, gguf_pairs)
    add("settings", t0)
    for s in result.swaps:
        s["predicted"] = result.units[s["unit"]].predicted(s["setting"])
    families = tuple(f for f in FAMILIES if f in config.families or f in result.config.families)
    groups = tuple(sorted(set(config.group_sizes) | set(result.config.group_sizes)))
    result.config = dataclasses.replace(config, families=families, group_sizes=groups)
    result.seconds = sum(stages.values())
    result.save(path)
    partial.unlink(missing_ok=True)
    rho = result.spearman
    log(
        f"sensitivity: {len(todo_units)} tensors probed, {len(todo_pairs)} settings measured in "
        f"{time.perf_counter() - start:.0f} s"
        + (f"; prediction vs {len(result.swaps)} measured swaps: Spearman {rho:.3f}" if rho else "")
    )
    return result


def _gguf_errors(model_ref, units, result, imatrix, cache, swap, bar, pairs):
    """E(t, type) for every ggml candidate type: llama.cpp quantizes the whole model to each type
    (with the importance matrix, ``tt_overrides`` forcing the type on every tensor that can hold
    it), and every tensor is dequantized and compared with the full-precision one."""
    import tempfile

    from gguf import GGUFReader
    from gguf.quants import dequantize

    from quantlab.formats.gguf_file import read_header
    from quantlab.formats.gguf_quant import full_precision_gguf, quantize_gguf

    src = full_precision_gguf(model_ref, cache)
    cfg = model_ref.folder.config.get("text_config", model_ref.folder.config)
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    permuted = read_header(src).metadata.get("general.architecture") == "llama"
    source = {t.name: t for t in GGUFReader(src).tensors}
    by_gguf = {u.gguf_name: u for u in units}
    by_name = {u.name: u for u in units}
    types: dict[str, list[Unit]] = {}
    for name, key in pairs:
        types.setdefault(key, []).append(by_name[name])
    with bar(len(types), "llama.cpp types", unit="type") as b, tempfile.TemporaryDirectory() as tmp:
        for type_name, members in types.items():
            b.set_postfix_str(type_name)
            out = Path(tmp) / f"{type_name}.gguf"
            quantize_gguf(
                src,
                out,
                "Q8_0",
                imatrix=imatrix or None,
                tensor_types={u.gguf_name: type_name for u in members},
            )
            for t in GGUFReader(out).tensors:
                unit = by_gguf.get(t.name)
                if unit is None or t.tensor_type.name != type_name:
                    continue
                wq = dequantize(t.data, t.tensor_type).reshape(unit.shape[0], -1)
                w = np.asarray(source[t.name].data, dtype=np.float32).reshape(unit.shape[0], -1)
                d = _imatrix_of(unit, imatrix)
                w_t, wq_t = torch.from_numpy(w.copy()), torch.from_numpy(wq.copy())
                result.units[unit.name].errors[type_name] = weighted_error(w_t, wq_t, d)
                swap(unit, type_name, _hf_rows(wq, unit, n_head, n_kv, permuted))
            out.unlink()
            b.update(1)
