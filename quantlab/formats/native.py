"""quantlab's own artifact: the integer tensors of a `QuantizationResult`, exactly, plus a manifest.

Layout of an artifact folder (written atomically; ``quantlab_manifest.json`` last):
- ``quantized.safetensors``: per quantized linear ``<name>.qweight`` (out, in) uint8 codes,
  ``<name>.scales`` (out, G) float32, ``<name>.zeros`` (out, G) uint8, ``<name>.g_idx`` (in,) int32;
  plus every other parameter the method changed, under its own name (AWQ's scaled norms);
- ``imatrix.safetensors``: ``<name>`` (in,) float32, mean of x^2 per input column;
- ``quantlab_manifest.json``: format, quantlab version, method and config, bits per linear,
  calibration provenance, the source model (spec, path, content sha256) and each file's sha256.

The unquantized rest of the model is not copied: loading applies the tensors to the source model.
GPTQ/AWQ/GGUF checkpoints that other tools read are the format writers' job (later issues).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from quantlab import __version__
from quantlab.atomic import atomic_directory
from quantlab.errors import CorruptFileError
from quantlab.fingerprint import content_sha256
from quantlab.types import QuantizedWeight

FORMAT = "quantlab-native"
VERSION = 1
MANIFEST = "quantlab_manifest.json"
_PARTS = ("qweight", "scales", "zeros", "g_idx")


def is_native(path: str | Path) -> bool:
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == FORMAT
    except ValueError:
        return False


def source_record(source) -> dict:
    """What every manifest says about the source model (a `ResolvedModel`)."""
    return {"spec": source.spec, "path": str(source.path), "sha256": content_sha256(source.path)}


def write_native(result, source, out_dir: str | Path) -> Path:
    """Write ``result`` (a `QuantizationResult`) of model ``source`` (a `ResolvedModel`)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, qw in result.weights.items():
        for part in _PARTS:
            tensors[f"{name}.{part}"] = getattr(qw, part).contiguous()
    for name, value in result.modified.items():
        tensors[name] = value.contiguous()
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, tmp / "quantized.safetensors")
        save_file(
            {k: v.contiguous() for k, v in result.imatrix.items()}, tmp / "imatrix.safetensors"
        )
        first = next(iter(result.weights.values()))
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "quantlab_version": __version__,
            "method": result.method,
            "config": dataclasses.asdict(result.config),
            "bits": first.bits,
            "group_size": first.group_size,
            "sym": first.sym,
            "linears": {
                n: {"shape": list(q.shape), "dtype": str(q.dtype).removeprefix("torch.")}
                for n, q in result.weights.items()
            },
            "modified": sorted(result.modified),
            "calibration": result.calibration,
            "imatrix_tokens": result.imatrix_tokens,
            "source": source_record(source),
            "quantize_seconds": round(result.seconds, 3),
            "files": {
                f: content_sha256(tmp / f) for f in ("quantized.safetensors", "imatrix.safetensors")
            },
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


@dataclass(frozen=True)
class NativeArtifact:
    path: Path
    manifest: dict
    weights: dict[str, QuantizedWeight]
    modified: dict[str, torch.Tensor]


def read_native(path: str | Path, verify: bool = True) -> NativeArtifact:
    """Read an artifact; with ``verify``, file checksums must match the manifest."""
    from safetensors.torch import load_file

    path = Path(path)
    if not is_native(path):
        raise CorruptFileError(f"{path} has no valid {MANIFEST}: not a complete quantlab artifact")
    manifest = json.loads((path / MANIFEST).read_text())
    if verify:
        for name, digest in manifest["files"].items():
            if not (path / name).is_file() or content_sha256(path / name) != digest:
                raise CorruptFileError(f"{path / name} does not match its checksum in {MANIFEST}")
    tensors = load_file(path / "quantized.safetensors")
    weights = {}
    for name, info in manifest["linears"].items():
        try:
            parts = {p: tensors[f"{name}.{p}"] for p in _PARTS}
        except KeyError as exc:
            raise CorruptFileError(f"{path}: tensor {exc.args[0]} is missing") from None
        if list(parts["qweight"].shape) != info["shape"]:
            raise CorruptFileError(
                f"{path}: {name}.qweight has shape "
                f"{list(parts['qweight'].shape)}, manifest says {info['shape']}"
            )
        weights[name] = QuantizedWeight(
            **parts,
            bits=manifest["bits"],
            group_size=manifest["group_size"],
            sym=manifest["sym"],
            dtype=getattr(torch, info["dtype"]),
        )
    modified = {name: tensors[name] for name in manifest["modified"]}
    return NativeArtifact(path, manifest, weights, modified)


def apply_native(model, artifact: NativeArtifact) -> None:
    """Put the artifact's dequantized weights and changed parameters into ``model`` (in place)."""
    with torch.no_grad():
        for name, qw in artifact.weights.items():
            param = model.get_parameter(f"{name}.weight")
            param.copy_(qw.dequantize().to(param.dtype))
        for name, value in artifact.modified.items():
            param = model.get_parameter(name)
            param.copy_(value.to(param.dtype))
