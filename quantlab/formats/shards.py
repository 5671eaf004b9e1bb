"""Safetensors shards written as tensors arrive (`ShardWriter`), for writers that stream.

A checkpoint written block by block (streaming quantization) never holds the model: each
tensor's bytes go to disk as soon as it is added, and a shard's header is written once the shard
is full. The layout is the safetensors one (`quantlab.models.folder` documents it): an 8-byte
little-endian header length, the JSON header, then the data, 8-byte aligned.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quantlab.errors import QuantlabError

MiB = 1024**2

_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class ShardWriter:
    """Safetensors shards written as tensors arrive, holding no tensor after `add` returns.

    A shard's tensor bytes are appended to a data file as they come; when the shard reaches
    ``max_shard_bytes`` (or at `close`) its header is written and the data copied behind it in
    chunks, so memory stays bounded whatever the shard size."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder, self.max_shard_bytes = folder, max_shard_bytes
        self.shards: list[tuple[str, list[str]]] = []  # temporary file name, tensor names
        self.total_bytes = 0
        self._header: dict[str, dict] = {}
        self._data = None  # the open data file of the shard being filled
        self._offset = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self._data is not None:  # a failure mid-shard: the folder is discarded anyway
            self._data.close()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().cpu().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if self._header and self._offset + nbytes > self.max_shard_bytes:
            self.flush()
        if self._data is None:
            self._data = open(self.folder / ".shard-data", "wb")  # noqa: SIM115 (closed in flush)
        if tensor.dtype not in _ST_DTYPES:
            raise QuantlabError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
        # the tensor's own bytes, through the buffer protocol (no copy: an 8B model's embedding
        # is 1 GB, and a bytes copy of it doubled the writer's peak memory)
        self._data.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        self._header[name] = {
            "dtype": _ST_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._offset, self._offset + nbytes],
        }
        self._offset += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        """Finish the shard being filled: header, then its data."""
        import shutil

        if self._data is None:
            return
        self._data.close()
        header = {"__metadata__": {"format": "pt"}, **self._header}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        fname = f".shard-{len(self.shards):05d}.safetensors"
        data_path = self.folder / ".shard-data"
        with open(self.folder / fname, "wb") as out, open(data_path, "rb") as data:
            out.write(len(raw).to_bytes(8, "little"))
            out.write(raw)
            shutil.copyfileobj(data, out, 16 * MiB)
        data_path.unlink()
        self.shards.append((fname, list(self._header)))
        self._header, self._data, self._offset = {}, None, 0

    def close(self) -> list[str]:
        """Flush, give the shards their final names (and an index when there are several)."""
        self.flush()
        if len(self.shards) == 1:
            (self.folder / self.shards[0][0]).rename(self.folder / "model.safetensors")
            return ["model.safetensors"]
        n = len(self.shards)
        weight_map, files = {}, []
        for i, (tmp_name, names) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / tmp_name).rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
            files.append(final)
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.folder / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2) + "\n"
        )
        return [*files, "model.safetensors.index.json"]
