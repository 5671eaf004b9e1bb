"""quantlab's own artifact: the integer tensors of a `QuantizationResult`, exactly, plus a manifest.

Layout of an artifact folder (written atomically; ``quantlab_manifest.json`` last):
- ``quantized.safetensors``: per quantized linear ``<name>.qweight`` (out, in) uint8 codes,
  ``<name>.scales`` (out, G) float32, ``<name>.zeros`` (out, G) uint8, ``<name>.g_idx`` (in,) int32;
  plus every other parameter the method changed, under its own name (AWQ's scaled norms);
- ``imatrix.safetensors``: ``<name>`` (in,) float32, mean of x^2 per input column;
- ``quantlab_manifest.json``: format, quantlab version, method and config, bits per linear,
  calibration provenance, the source model (spec, path, content sha256) and each file's sha256.

The unquantized rest of the model is not copied: loading applies the tensors to the source model
(which must still be where the manifest says). Any method's result is held exactly, whatever its
bits, group size or act-order: this is the format for comparing methods like with like.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from quantlab.atomic import atomic_directory
from quantlab.errors import CorruptFileError, QuantlabError
from quantlab.fingerprint import content_sha256
from quantlab.formats.manifest import MANIFEST, source_record
from quantlab.formats.registry import (
    ArtifactSize,
    Format,
    LoadedCheckpoint,
    WriteRequest,
    register_format,
)
from quantlab.types import QuantizedWeight
from quantlab.version import __version__

FORMAT = "quantlab-native"  # the manifest's "format" (the registered format's name is "native")
VERSION = 1
_PARTS = ("qweight", "scales", "zeros", "g_idx")


def is_native(path: str | Path) -> bool:
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == FORMAT
    except ValueError:
        return False


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


class NativeFormat(Format):
    name = "native"
    description = "quantlab's exact integer tensors (+ imatrix); needs the source model to load"
    standalone = False
    default = True  # a method's result is written exactly, whatever its settings
    note = (
        "native artifacts hold only the quantized linears (one byte per code, the rest is read "
        "from the source model): their size is not comparable to a checkpoint's; their bits/w is "
        "that of the packed linears"
    )
    run_snippet = "import quantlab\nmodel, _ = quantlab.load('{path}')   # quantlab's exact tensors"

    def detect(self, path: Path):
        return self.options() if is_native(path) else None

    def write(self, request: WriteRequest) -> Path:
        if request.result is None:
            raise QuantlabError("format native writes a method's result")
        return write_native(request.result, request.source, request.out)

    def _source(self, manifest: dict, cache):
        from quantlab.models import resolve_model

        return resolve_model(manifest["source"]["path"], cache=cache)

    def load(self, path: Path, *, dtype: str = "float32", verify: bool = True, cache=None):
        from quantlab.models import load_model

        artifact = read_native(path, verify=verify)
        model = load_model(self._source(artifact.manifest, cache), dtype=dtype)
        apply_native(model, artifact)
        qc = {k: artifact.manifest[k] for k in ("method", "bits", "group_size", "sym")}
        checkpoint = LoadedCheckpoint(
            Path(path), self.name, qc, artifact.weights, artifact.manifest
        )
        return model, checkpoint

    def tokenizer(self, path: Path, cache=None):
        from quantlab.models import load_tokenizer

        return load_tokenizer(self._source(read_native(path, verify=False).manifest, cache))

    def size(self, path: Path) -> ArtifactSize:
        """Codes are stored one per byte; the size reported is the packed size a checkpoint
        would have (bits per code + an fp16 scale and a packed zero point per group)."""
        manifest = json.loads((Path(path) / MANIFEST).read_text())
        weights = sum(math.prod(info["shape"]) for info in manifest["linears"].values())
        gs = manifest["group_size"] if manifest["group_size"] > 0 else None
        bits = manifest["bits"]
        per_weight = bits + ((16 + bits) / gs if gs else 0.0)
        packed = int(weights * per_weight / 8)
        return ArtifactSize(packed, weights, packed, weights)

    def verify(self, path: Path, check) -> None:
        artifact = read_native(path, verify=True)
        check("checksums", f"{len(artifact.manifest['files'])} files match the manifest")
        self.load(path, verify=False)
        check("loads", "tensors match the source model; the model loads")


register_format(NativeFormat())
