"""Hugging Face quantized checkpoint folders: what GPTQ, AWQ and compressed-tensors share.

`HFCheckpointFormat` is the base of every format whose artifact is a Hugging Face folder with a
``quantization_config`` (each subclass, in its own file, says how one linear is packed, what goes
into ``quantization_config`` and how to read it back). It writes, atomically (temporary folder
renamed into place, manifest last):

- ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
  above ``max_shard_bytes``): each quantized linear as its packed tensors (layouts in
  `quantlab.formats.layouts`), every other tensor under its usual name and dtype (tied weights
  once);
- ``config.json`` = the source config + ``quantization_config``, plus the format's extra files
  (GPTQ: ``quantize_config.json`` for older loaders); the tokenizer, chat template and
  generation config copied from the source;
- ``imatrix.safetensors``: the importance matrix of the calibration pass (GGUF quantization reuses
  it);
- ``quantlab_manifest.json``: format, quantlab version, method and config, calibration hash, the
  source model's content hash, per-linear shapes, loader notes and every file's sha256.

It writes either from a whole in-memory result (`write`) or block by block as the walk finishes
each block (`stream`: streaming quantization, tensor for tensor the same files). What a layout
cannot hold exactly is refused before anything is written. Reading goes through
`quantlab.formats.loader.load_quantized_folder` with the subclass's decoder.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from quantlab.atomic import atomic_directory
from quantlab.errors import CorruptFileError, FormatError, QuantlabError
from quantlab.fingerprint import content_sha256
from quantlab.formats.manifest import MANIFEST, read_manifest, source_record, verify_files
from quantlab.formats.registry import ArtifactSize, Format, WriteRequest
from quantlab.version import __version__

_DTYPES = ("float32", "float16", "bfloat16")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
# not copied from the source: rewritten here, or the source's own card (ours replaces it)
SKIP_FILES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
SKIP_FILES |= {"README.md"}


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


def source_config(source) -> tuple[dict, torch.dtype | None]:
    """The source's config.json and the dtype its weights are stored in (None if it says none)."""
    config = json.loads((Path(source.path) / "config.json").read_text())
    source_dtype = config.get("dtype") or config.get("torch_dtype")
    return config, (getattr(torch, source_dtype) if source_dtype in _DTYPES else None)


def written_dtype(stored: torch.dtype | None, keep: bool) -> torch.dtype | None:
    """The dtype a checkpoint stores its non-quantized tensors in (embeddings, head, norms):
    16-bit, as the toolkits write them - the source's own when it is 16-bit, else float16 -
    unless ``keep`` (``keep_dtype``) asks for the source's dtype (None: as loaded, float32)."""
    if keep:
        return stored
    return stored if stored in (torch.float16, torch.bfloat16) else torch.float16


def check_uniform(label: str, summaries: dict[str, WeightSummary]) -> None:
    """One bits/group_size/sym for every linear (what ``quantization_config`` can describe)."""
    if not summaries:
        raise FormatError("nothing was quantized: no linear to write")
    if len({(q.bits, q.group_size, q.sym) for q in summaries.values()}) != 1:
        raise FormatError(f"{label} checkpoints need one bits/group_size/sym for every linear")


def state_tensors(
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


def save_shards(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> list[str]:
    """``tensors`` as ``model.safetensors``, or shards of at most ``max_shard_bytes`` + index."""
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


def _with_dtype(config: dict, dtype: torch.dtype | None) -> dict:
    """``config`` saying the dtype its non-quantized tensors are written in."""
    if dtype is None:
        return config
    return {**config, "dtype": str(dtype).removeprefix("torch.")}


class HFCheckpointFormat(Format):
    """A Hugging Face folder with ``quantization_config``; subclasses fill in the layout."""

    streams = True
    parts: tuple[str, ...] = ()  # the tensors of one quantized linear, ``<linear>.<part>``
    marker: str = "qweight"  # the part every quantized linear has

    # --- what a subclass says -----------------------------------------------------------------
    def pack(self, name: str, qw, options) -> dict[str, torch.Tensor]:
        """One linear's tensors (``part -> tensor``); `FormatError` for what it cannot hold."""
        raise NotImplementedError

    def quantization_config(self, method: str, config, summaries: dict, options) -> dict:
        raise NotImplementedError

    def checkpoint_notes(self, summaries: dict, options) -> list[str]:
        return []

    def extra_files(self, qconfig: dict) -> dict[str, dict]:
        """Other JSON files the format's loaders expect (name -> content)."""
        return {}

    def read_options(self, qc: dict, path: Path):
        """This format's options if ``qc`` (a ``quantization_config``) is one of its own."""
        return None

    def decoder(self, qc: dict, options, dtype: torch.dtype) -> Callable:
        """``decode(name, parts, out, in) -> QuantizedWeight`` for this checkpoint."""
        raise NotImplementedError

    def code_bits(self, qc: dict, module: str | None = None) -> int:
        """Bits per code of ``module``'s packed weight (the checkpoint's, unless the format
        holds per-module settings)."""
        return int(qc.get("bits", 4))

    def check_summaries(self, summaries: dict, options) -> None:
        """Refuse linears the checkpoint's ``quantization_config`` cannot describe together
        (default: one bits/group_size/sym for all)."""
        check_uniform(self.label(options), summaries)

    def layout_of(self, options) -> tuple[tuple[str, ...], str, str]:
        """``(parts, marker, codes)`` of a quantized linear in an artifact written with
        ``options``: its tensors, the part only a quantized linear has, and the part holding
        its codes (the class's ``parts`` and ``marker``, unless the format has several
        layouts)."""
        return self.parts, self.marker, self.marker

    def keeps_dtype(self, options) -> bool:
        """Whether ``options`` ask for the source's dtype for non-quantized tensors."""
        return bool(getattr(options, "keep_dtype", False))

    # --- writing --------------------------------------------------------------------------------
    def pack_linears(self, weights: dict, options) -> dict[str, torch.Tensor]:
        """Every linear of ``weights`` packed into the format's tensors (refusals raise here)."""
        packed: dict[str, torch.Tensor] = {}
        for name, qw in weights.items():
            for part, tensor in self.pack(name, qw, options).items():
                packed[f"{name}.{part}"] = tensor
        return packed

    def write(self, request: WriteRequest) -> Path:
        result, model, options = request.result, request.model, request.options
        if result is None or model is None:
            raise QuantlabError(f"format {self.name} writes a method's result")
        summaries = {name: WeightSummary.of(qw) for name, qw in result.weights.items()}
        self.check_summaries(summaries, options)
        packed = self.pack_linears(result.weights, options)  # refuses before touching the disk
        return self.write_folder(request, result, model, summaries, packed)

    def write_folder(self, request: WriteRequest, result, model, summaries, packed) -> Path:
        """The folder (atomically): the quantized linears' ``packed`` tensors (``summaries``
        names them), the model's other tensors in the written dtype, config, files, manifest."""
        options = request.options
        config, stored = source_config(request.source)
        dtype = written_dtype(stored, self.keeps_dtype(options))
        tensors = state_tensors(model, set(summaries), dtype, set(result.modified))
        tensors.update(packed)
        out = Path(request.out)
        with atomic_directory(out) as tmp:
            files = save_shards(tensors, tmp, request.max_shard_bytes)
            self.finish_folder(
                tmp, result, summaries, _with_dtype(config, dtype), request.source, files, options,
                request.manifest_extra,
            )  # fmt: skip
        return out

    def stream(self, request: WriteRequest, run: Callable) -> tuple[Path, object]:
        """Write the artifact block by block: ``run(sink)`` performs the block walk, handing
        each finished block (a `BlockResult`) to ``sink``, and returns the run's result; the
        embedding, final norm and head are then copied from the source's shards as stored.
        Returns the path and the result."""
        from quantlab.formats.shards import ShardWriter
        from quantlab.models.shards import TensorSource

        source, options = request.source, request.options
        if not source.folder.tensors:
            raise QuantlabError(f"{source.path}: streaming reads safetensors shards; found none")
        config, stored = source_config(source)
        # what the in-memory writer does: the loaded (float32) model's tensors in the written
        # dtype (`written_dtype`), float32 when that is the source's and the config names none
        dtype = written_dtype(stored, self.keeps_dtype(options))
        out_dtype = dtype or torch.float32
        blocks = source.folder.arch.blocks
        tensors = TensorSource(source.folder)
        summaries: dict[str, WeightSummary] = {}

        def as_written(t: torch.Tensor) -> torch.Tensor:
            return t.to(out_dtype) if t.is_floating_point() else t

        out = Path(request.out)
        with (
            atomic_directory(out) as tmp,
            ShardWriter(tmp, request.max_shard_bytes) as writer,
        ):

            def sink(done) -> None:
                for name, qw in done.weights.items():
                    summaries[name] = WeightSummary.of(qw)
                self.check_summaries(summaries, options)
                packed = self.pack_linears(done.weights, options)  # refuses what it cannot hold
                linear_weights = {f"{name}.weight" for name in done.weights}
                for local, tensor in done.block.state_dict().items():
                    name = f"{done.prefix}.{local}"
                    if name in linear_weights:
                        continue
                    if name in done.modified:  # AWQ-scaled norms stay float32: no second rounding
                        writer.add(name, done.modified[name].float())
                    else:
                        writer.add(name, as_written(tensor))
                for name, tensor in packed.items():
                    writer.add(name, tensor)

            result = run(sink)
            outer = [n for n in tensors.names() if not n.startswith(blocks + ".")]
            for name in outer:  # embedding, final norm, head: as stored, one at a time
                for key, tensor in tensors.read([name]).items():
                    writer.add(key, as_written(tensor))
            files = writer.close()
            self.finish_folder(
                tmp, result, summaries, _with_dtype(config, dtype), source, files, options,
                request.manifest_extra,
            )  # fmt: skip
        return out, result

    def finish_folder(
        self, tmp: Path, result, summaries, config, source, files, options, extra=None
    ) -> None:
        """Write everything but the weights into ``tmp``: config.json with
        ``quantization_config``, the format's extra files, the source's tokenizer and other small
        files, the importance matrix, and the manifest last (with every file's sha256)."""
        from safetensors.torch import save_file

        config = dict(config)
        qconfig = self.quantization_config(result.method, result.config, summaries, options)
        config["quantization_config"] = qconfig
        for item in sorted(Path(source.path).iterdir()):
            skip = item.name in SKIP_FILES or item.name == MANIFEST
            if item.is_file() and not skip and item.suffix not in WEIGHT_SUFFIXES:
                shutil.copy2(item, tmp / item.name)
                files.append(item.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        files.append("config.json")
        for name, content in self.extra_files(qconfig).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
            files.append(name)
        if result.imatrix:
            imatrix = {k: v.contiguous() for k, v in result.imatrix.items()}
            save_file(imatrix, tmp / "imatrix.safetensors")
            files.append("imatrix.safetensors")
        manifest = {
            "format": self.label(options),
            "quantlab_version": __version__,
            "method": result.method,
            "config": dataclasses.asdict(result.config),
            "quantization_config": qconfig,
            "linears": {n: list(q.shape) for n, q in summaries.items()},
            "calibration": result.calibration,
            "imatrix_tokens": result.imatrix_tokens,
            "source": source_record(source),
            "quantize_seconds": round(result.seconds, 3),
            "notes": self.checkpoint_notes(summaries, options),
            **(
                {"overrides": {n: dataclasses.asdict(c) for n, c in result.overrides.items()}}
                if getattr(result, "overrides", None)
                else {}
            ),
            **(extra or {}),
            "files": {f: content_sha256(tmp / f) for f in sorted(files)},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    # --- reading --------------------------------------------------------------------------------
    def detect(self, path: Path):
        from quantlab.formats.loader import quantization_config

        qc = quantization_config(Path(path))
        return None if qc is None else self.read_options(qc, Path(path))

    def _decoder(self, qc: dict, options, dtype: torch.dtype) -> Callable:
        """`decoder`, with a ``quantization_config`` of the wrong shape or types refused as a
        `CorruptFileError`."""
        try:
            return self.decoder(qc, options, dtype)
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            detail = f"{type(exc).__name__}: {exc}"
            raise CorruptFileError(f"quantization_config is malformed ({detail})") from None

    def check_config(self, path: Path) -> None:
        from quantlab.formats.loader import quantization_config

        qc = quantization_config(Path(path))
        self._decoder(qc, self.read_options(qc, Path(path)), torch.float16)

    def load(self, path: Path, *, dtype: str = "float32", verify: bool = True, cache=None):
        from quantlab.formats.loader import load_quantized_folder, quantization_config

        path = Path(path)
        qc = quantization_config(path)
        options = self.read_options(qc, path)
        decode = self._decoder(qc, options, getattr(torch, dtype))
        parts, marker, _ = self.layout_of(options)
        return load_quantized_folder(
            path, self.label(options), decode, parts, marker, dtype=dtype, verify=verify
        )

    def size(self, path: Path) -> ArtifactSize:
        """Tensor bytes of the weight files, and the weights they encode (an element of the
        marker tensor holds its width / bits codes: a packed int32 word 32 / bits; scales,
        zeros and indices are overhead)."""
        from quantlab.formats.loader import quantization_config
        from quantlab.models.folder import SAFETENSORS_DTYPE_SIZES, read_safetensors_header

        qc = quantization_config(Path(path))
        files = sorted(
            p for p in Path(path).glob("*.safetensors") if p.name != "imatrix.safetensors"
        )
        infos = [t for f in files for t in read_safetensors_header(f)]
        tensor_bytes = sum(t.numel * SAFETENSORS_DTYPE_SIZES[t.dtype] for t in infos)
        parts, marker, codes = self.layout_of(self.read_options(qc, Path(path)))
        quantized = {t.name.rsplit(".", 1)[0] for t in infos if t.name.endswith("." + marker)}
        weights = linear_bytes = linear_weights = 0
        for t in infos:
            module, _, part = t.name.rpartition(".")
            if module in quantized and part in parts:
                linear_bytes += t.numel * SAFETENSORS_DTYPE_SIZES[t.dtype]
                if part == codes:  # elements of packed codes (int32 words, int8 codes, ...)
                    width = 8 * SAFETENSORS_DTYPE_SIZES[t.dtype]
                    linear_weights += t.numel * width // self.code_bits(qc, module)
            else:
                weights += t.numel
        return ArtifactSize(tensor_bytes, weights + linear_weights, linear_bytes, linear_weights)

    def verify(self, path: Path, check) -> None:
        path = Path(path)
        manifest = read_manifest(path)
        if manifest is None:
            if (path / MANIFEST).is_file():
                raise CorruptFileError(f"{path / MANIFEST} is not a valid JSON object")
            check("manifest", "none (not written by quantlab): checksums not checked")
        else:
            verify_files(path, manifest)
            check("checksums", f"{len(manifest.get('files', {}))} files match the manifest")
        self.load(path, verify=False)  # shapes against the config, dtypes, every tensor read
        check("loads", "tensors match the config; the model loads")

    def notes(self, path: Path) -> list[str]:
        manifest = read_manifest(path) or {}
        notes = manifest.get("notes", [])
        return notes if isinstance(notes, list) else []
