"""Checks a local Hugging Face model folder before anything loads it.

A folder is usable when it has a parseable ``config.json`` naming a supported architecture, and
weights in safetensors files whose headers are consistent with their size. Pickle weights
(``*.bin``, ``*.pt``) and configs that ask for custom code (``auto_map``) are refused unless the
caller opts in, because loading them can execute code from the files.

The safetensors layout checked here (https://github.com/huggingface/safetensors): an 8-byte
little-endian header length N, N bytes of JSON ``{name: {dtype, shape, data_offsets: [b, e]}}``
(plus an optional ``__metadata__``), then the data; offsets are relative to the end of the
header and the data must be exactly as long as the largest end offset.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from quantlab.errors import CorruptFileError, InvalidModelError, UnsafeModelError
from quantlab.models.arch import ArchSpec, arch_spec_for_config

# bytes per element of each safetensors dtype
SAFETENSORS_DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library refuses larger headers too
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as described by a safetensors header (nothing is read but the header)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelFolder:
    """A validated local model folder."""

    path: Path
    config: dict
    arch: ArchSpec
    weight_files: tuple[Path, ...]
    tensors: tuple[TensorInfo, ...]

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def read_safetensors_header(path: Path) -> list[TensorInfo]:
    """Parse and check one safetensors header; raise `CorruptFileError` naming the problem."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CorruptFileError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CorruptFileError(
                f"{path}: corrupt safetensors header (claims {n} header bytes, file has {size})"
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_len = size - 8 - n
    tensors, end_max = [], 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
            itemsize = SAFETENSORS_DTYPE_SIZES[dtype]
            ok = all(isinstance(d, int) and d >= 0 for d in (*shape, begin, end))
        except (KeyError, TypeError, ValueError):
            msg = f"{path}: tensor {name!r} has a malformed header entry"
            raise CorruptFileError(msg) from None
        if not ok or end < begin or end - begin != math.prod(shape) * itemsize:
            raise CorruptFileError(f"{path}: tensor {name!r} has inconsistent shape/offsets")
        if end > data_len:
            raise CorruptFileError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} of {data_len} data bytes"
            )
        end_max = max(end_max, end)
        tensors.append(TensorInfo(name, dtype, shape, path.name))
    if end_max != data_len:
        raise CorruptFileError(
            f"{path}: data section is {data_len} bytes but tensors cover {end_max}"
        )
    return tensors


def read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise InvalidModelError(f"{path} has no config.json: not a Hugging Face model folder")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidModelError(f"{cfg_path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidModelError(f"{cfg_path} is not a JSON object")
    return config


def inspect_folder(
    path: str | Path, *, allow_pickle: bool = False, trust_remote_code: bool = False
) -> ModelFolder:
    """Validate a model folder; every failure is one `QuantlabError` line naming the problem."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InvalidModelError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise InvalidModelError(f"{path} is not a folder")
    config = read_config(path)
    if config.get("auto_map") and not trust_remote_code:
        raise UnsafeModelError(
            f"{path}/config.json asks for custom model code (auto_map); quantlab does not run "
            "code from model files unless you pass --trust-remote-code"
        )
    arch = arch_spec_for_config(config)
    weight_files = tuple(sorted(path.glob("*.safetensors")))
    if not weight_files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if not pickles:
            raise InvalidModelError(f"{path} has no weights (*.safetensors)")
        if not allow_pickle:
            raise UnsafeModelError(
                f"{path} has only pickle weights ({', '.join(pickles)}); unpickling can execute "
                "code, so quantlab refuses them unless you pass --allow-pickle"
            )
        return ModelFolder(path, config, arch, tuple(path / p for p in pickles), ())
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CorruptFileError(f"{index} is not a valid safetensors index") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise CorruptFileError(f"{path} is missing weight shard(s): {', '.join(missing)}")
    tensors = tuple(t for f in weight_files for t in read_safetensors_header(f))
    return ModelFolder(path, config, arch, weight_files, tensors)
