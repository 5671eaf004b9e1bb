"""Hugging Face checkpoint writers: GPTQ (v1 / v2) and AWQ (GEMM) folders that other tools load.

``write_checkpoint(fmt, result, model, source, out_dir)`` takes what a method produced (a
`QuantizationResult`), the model it was produced on (whose non-quantized parameters, AWQ's scaled
norms included, are written as they are) and the source `ResolvedModel`, and writes, atomically
(temporary folder renamed into place, manifest last):

- ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
  above ``max_shard_bytes``): each quantized linear as its packed tensors (layouts in
  `quantlab.formats.layouts`), every other tensor under its usual name and dtype (tied weights
  once);
- ``config.json`` = the source config + ``quantization_config``; ``quantize_config.json`` (GPTQ,
  for older loaders); the tokenizer, chat template and generation config copied from the source;
- ``imatrix.safetensors``: the importance matrix of the calibration pass (GGUF quantization reuses
  it);
- ``quantlab_manifest.json``: format, quantlab version, method and config, calibration hash, the
  source model's content hash, per-linear shapes, loader notes and every file's sha256.

What a layout cannot hold exactly (a zero point of 0 in GPTQ v1, 3-bit widths that are not whole
words, AWQ groups that do not divide ``in_features``) is refused before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from quantlab import __version__
from quantlab.atomic import atomic_directory
from quantlab.errors import ConfigError, FormatError
from quantlab.fingerprint import content_sha256
from quantlab.formats import layouts
from quantlab.formats.native import source_record

MANIFEST = "quantlab_manifest.json"
_DTYPES = ("float32", "float16", "bfloat16")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
SKIP_FILES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


@dataclass(frozen=True)
class CheckpointFormat:
    name: str
    pack: Callable  # (linear name, QuantizedWeight) -> {part: tensor}
    quantization_config: Callable  # (result, weights) -> dict for config.json
    notes: Callable  # (weights) -> list of loader-compatibility notes


def _first(weights):
    return next(iter(weights.values()))


def _gptq_format(checkpoint_format: str) -> CheckpointFormat:
    def qconfig(result, weights) -> dict:
        qw = _first(weights)
        cfg = result.config
        return {
            "quant_method": "gptq",
            "bits": qw.bits,
            "group_size": qw.group_size,
            "desc_act": bool(getattr(cfg, "act_order", False)),
            "static_groups": bool(getattr(cfg, "static_groups", False)),
            "sym": qw.sym,
            "true_sequential": bool(getattr(cfg, "true_sequential", True)),
            "damp_percent": getattr(cfg, "damp_percent", 0.01),  # RTN: a placeholder loaders need
            "lm_head": False,
            "checkpoint_format": checkpoint_format,
            "format": checkpoint_format,
            "pack_dtype": "int32",
            "meta": {"quantizer": [f"quantlab:{__version__}"], "method": result.method},
        }

    def notes(weights) -> list[str]:
        out = []
        partial = sorted(
            {q.shape[1] for q in weights.values() if q.group_size > 0 and q.shape[1] % q.group_size}
        )
        if partial:
            out.append(
                f"in_features {partial} are not multiples of group size "
                f"{_first(weights).group_size}: the last group is shorter. GPTQModel's torch "
                "kernel and quantlab read it; Marlin/ExLlama/vLLM kernels refuse such shapes."
            )
        if any(q.act_order for q in weights.values()):
            out.append("act-order (desc_act) g_idx: kernels without g_idx support cannot run it")
        if checkpoint_format == "gptq_v2":
            out.append("checkpoint_format gptq_v2: read by GPTQModel; most other loaders read v1")
        return out

    return CheckpointFormat(
        checkpoint_format,
        lambda name, qw: layouts.pack_gptq(name, qw, checkpoint_format),
        qconfig,
        notes,
    )


def _awq_qconfig(result, weights) -> dict:
    qw = _first(weights)
    return {
        "quant_method": "awq",
        "bits": 4,
        "group_size": qw.group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }


FORMATS: dict[str, CheckpointFormat] = {
    "gptq": _gptq_format("gptq"),
    "gptq_v2": _gptq_format("gptq_v2"),
    "awq": CheckpointFormat("awq", layouts.pack_awq, _awq_qconfig, lambda weights: []),
}


def format_names() -> list[str]:
    return sorted(FORMATS)


def _state_tensors(
    model, quantized: set[str], dtype: torch.dtype | None, keep: set[str]
) -> dict[str, torch.Tensor]:
    """The model's tensors minus the quantized linears' weights; tied tensors once; floating
    tensors in the source checkpoint's ``dtype`` except those in ``keep`` (changed by the method,
    e.g. AWQ's scaled norms, which stay float32 so that nothing is rounded again)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module in quantized and name.endswith(".weight"):
            continue
        if tensor.data_ptr() in seen:
            continue  # tied (lm_head = embed_tokens): the loader re-ties
        seen.add(tensor.data_ptr())
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point() and name not in keep:
            tensor = tensor.to(dtype)
        out[name] = tensor.contiguous()
    return out


def _save_shards(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> list[str]:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata=meta)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards, strict=True):
        save_file(shard, folder / fname, metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [*names, "model.safetensors.index.json"]


@dataclass(frozen=True)
class WeightSummary:
    """What the folder-level files (config, notes, manifest) need to know of one quantized linear;
    the streaming writer keeps these instead of the tensors."""

    shape: tuple[int, int]
    bits: int
    group_size: int
    sym: bool
    act_order: bool

    @classmethod
    def of(cls, qw) -> WeightSummary:
        return cls(tuple(qw.shape), qw.bits, qw.group_size, qw.sym, qw.act_order)


def checkpoint_spec(fmt: str) -> CheckpointFormat:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown checkpoint format {fmt!r}; known: {', '.join(FORMATS)}")
    return FORMATS[fmt]


def check_uniform(fmt: str, summaries: dict[str, WeightSummary]) -> None:
    """One bits/group_size/sym for every linear (what ``quantization_config`` can describe)."""
    if not summaries:
        raise FormatError("nothing was quantized: no linear to write")
    if len({(q.bits, q.group_size, q.sym) for q in summaries.values()}) != 1:
        raise FormatError(f"{fmt} checkpoints need one bits/group_size/sym for every linear")


def pack_linears(spec: CheckpointFormat, weights: dict) -> dict[str, torch.Tensor]:
    """Every linear of ``weights`` packed into the format's tensors (refusals raise here)."""
    packed: dict[str, torch.Tensor] = {}
    for name, qw in weights.items():
        for part, tensor in spec.pack(name, qw).items():
            packed[f"{name}.{part}"] = tensor
    return packed


def source_config(source) -> tuple[dict, torch.dtype | None]:
    """The source's config.json and the dtype its weights are stored in (None if it says none)."""
    config = json.loads((Path(source.path) / "config.json").read_text())
    source_dtype = config.get("dtype") or config.get("torch_dtype")
    return config, (getattr(torch, source_dtype) if source_dtype in _DTYPES else None)


def finish_folder(
    tmp: Path,
    fmt: str,
    result,
    summaries: dict[str, WeightSummary],
    config: dict,
    source,
    files: list[str],
) -> None:
    """Write everything but the weights into ``tmp``: config.json with ``quantization_config``,
    quantize_config.json (GPTQ), the source's tokenizer and other small files, the importance
    matrix, and the manifest last (with every file's sha256, ``files`` included)."""
    from safetensors.torch import save_file

    spec = FORMATS[fmt]
    config = dict(config)
    config["quantization_config"] = spec.quantization_config(result, summaries)
    for item in sorted(Path(source.path).iterdir()):
        skip = item.name in SKIP_FILES or item.name == MANIFEST
        if item.is_file() and not skip and item.suffix not in WEIGHT_SUFFIXES:
            shutil.copy2(item, tmp / item.name)
            files.append(item.name)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    files.append("config.json")
    if fmt.startswith("gptq"):
        (tmp / "quantize_config.json").write_text(
            json.dumps(config["quantization_config"], indent=2) + "\n"
        )
        files.append("quantize_config.json")
    if result.imatrix:
        imatrix = {k: v.contiguous() for k, v in result.imatrix.items()}
        save_file(imatrix, tmp / "imatrix.safetensors")
        files.append("imatrix.safetensors")
    manifest = {
        "format": fmt,
        "quantlab_version": __version__,
        "method": result.method,
        "config": dataclasses.asdict(result.config),
        "quantization_config": config["quantization_config"],
        "linears": {n: list(q.shape) for n, q in summaries.items()},
        "calibration": result.calibration,
        "imatrix_tokens": result.imatrix_tokens,
        "source": source_record(source),
        "quantize_seconds": round(result.seconds, 3),
        "notes": spec.notes(summaries),
        "files": {f: content_sha256(tmp / f) for f in sorted(files)},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def write_checkpoint(
    fmt: str,
    result,
    model,
    source,
    out_dir: str | Path,
    *,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write ``result`` (of ``model``, quantized from ``source``) as a ``fmt`` checkpoint."""
    spec = checkpoint_spec(fmt)
    weights = result.weights
    summaries = {name: WeightSummary.of(qw) for name, qw in weights.items()}
    check_uniform(fmt, summaries)
    packed = pack_linears(spec, weights)  # packs (and refuses) before anything touches the disk
    config, dtype = source_config(source)
    tensors = _state_tensors(model, set(weights), dtype, set(result.modified))
    tensors.update(packed)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        files = _save_shards(tensors, tmp, max_shard_bytes)
        finish_folder(tmp, fmt, result, summaries, config, source, files)
    return out_dir


def read_manifest(path: str | Path) -> dict | None:
    """The quantlab manifest of a checkpoint folder, or None when there is none."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text())
    except ValueError:
        return None
