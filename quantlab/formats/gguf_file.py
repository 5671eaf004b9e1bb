"""GGUF files through the ``gguf`` package: inspect them, and re-type every tensor to F16/F32.

`retype_gguf` writes a copy of a GGUF file in which every quantized tensor is dequantized by
``gguf`` (numpy, exact to the block formulas) and stored as F16 or F32, with all metadata copied
and ``general.file_type`` updated. As llama.cpp's own converter does, 1-D tensors (norms, biases)
stay F32 in an F16 file. This gives llama.cpp a full-precision reference of a model that only
exists as a quantized GGUF (the embedded default model), computing the same function as the
dequantized Hugging Face folder.

GGUF stores a 2-D tensor as ``ne = [cols, rows]``; ``gguf``'s reader hands back numpy arrays in the
usual ``(rows, cols)`` order, and its writer takes them that way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantlab.errors import CorruptFileError, QuantlabError

# llama.cpp's LLAMA_FTYPE values for the two full-precision outputs
FILE_TYPES = {"F32": 0, "F16": 1}
_SKIP_KEYS = ("GGUF.", "general.file_type")


def open_gguf(path: str | os.PathLike):
    """A `gguf.GGUFReader`, or a `CorruptFileError` naming the file."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise QuantlabError(f"GGUF file {path} does not exist")
    try:
        return GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, IndexError, ... on bad bytes
        raise CorruptFileError(
            f"{path}: not a readable GGUF file, truncated or corrupt ({exc})"
        ) from None


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type_name: str  # GGML type, e.g. "Q4_K"
    shape: tuple[int, ...]  # as GGUF stores it: ne[0] (the row length) first
    offset: int  # from the start of the data section
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file's header says (`read_header`): the metadata's scalar and string values
    (arrays are skipped, their lengths checked) and every tensor's type, shape and extent."""

    version: int
    metadata: dict[str, object]
    tensors: tuple[GGUFTensor, ...]
    data_offset: int  # where the tensor data section starts


_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}  # fmt: skip  GGUFValueType -> struct format
_STRING, _ARRAY = 8, 9
MAX_KEY_BYTES = 64 * 1024  # keys and tensor names (llama.cpp's are under 100 bytes)
MAX_VALUE_BYTES = 16 * 1024 * 1024  # a single string value (chat templates are a few KiB)


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse a GGUF file's header (spec: ggml's docs/gguf.md, versions 2 and 3) without loading
    tensor data or building per-element views of its arrays, checking every length against the
    file, so that truncated or hostile files fail cleanly (`CorruptFileError`). Milliseconds where
    `gguf.GGUFReader` takes seconds on a 49k-token vocabulary."""
    import mmap
    import struct

    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    if not path.is_file():
        raise QuantlabError(f"GGUF file {path} does not exist")

    def bad(why: str) -> CorruptFileError:
        return CorruptFileError(f"{path}: not a readable GGUF file, truncated or corrupt ({why})")

    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 24:
                raise bad("shorter than a GGUF header")
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise QuantlabError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        pos = 0

        def take(fmt: str):
            nonlocal pos
            n = struct.calcsize(fmt)
            if pos + n > size:
                raise bad(f"ends inside the header at byte {pos}")
            value = struct.unpack_from(fmt, buf, pos)[0]
            pos += n
            return value

        def skip_string() -> int:
            """Step over a string (length-checked, nothing copied); returns its start."""
            nonlocal pos
            n = take("<Q")
            if n > size - pos:
                raise bad(f"a string of {n} bytes runs past the end at byte {pos}")
            start = pos
            pos += n
            return start

        def string(limit: int) -> str:
            start = skip_string()
            if pos - start > limit:  # a key or value no real file has: refuse, do not copy it
                raise bad(f"a string of {pos - start} bytes at byte {start}, over {limit}")
            try:
                return bytes(buf[start:pos]).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise bad(f"a string is not UTF-8 ({exc.reason})") from None

        def value(vtype: int, depth: int = 0):
            nonlocal pos
            if vtype in _SCALARS:
                return take(_SCALARS[vtype])
            if vtype == _STRING:
                return string(MAX_VALUE_BYTES)
            if vtype != _ARRAY or depth > 2:
                raise bad(f"unknown value type {vtype}")
            item, count = take("<I"), take("<Q")
            if item in _SCALARS:  # skipped in one step, after checking it fits
                width = struct.calcsize(_SCALARS[item])
                if count > (size - pos) // max(width, 1):
                    raise bad(f"an array of {count} items runs past the end")
                pos += count * width
            elif count > size - pos:
                raise bad(f"an array of {count} items runs past the end")
            elif item == _STRING:  # e.g. a vocabulary: stepped over, not decoded
                for _ in range(count):
                    skip_string()
            else:
                for _ in range(count):
                    value(item, depth + 1)
            return None  # arrays are not kept

        if bytes(buf[:4]) != b"GGUF":
            raise bad("no GGUF magic")
        pos = 4
        version = take("<I")
        if version not in (2, 3):
            if version in (2 << 24, 3 << 24):
                raise bad("a big-endian GGUF file; quantlab reads little-endian ones")
            raise bad(f"version {version}; quantlab reads versions 2 and 3")
        n_tensors, n_kv = take("<Q"), take("<Q")
        if n_tensors > size or n_kv > size:
            raise bad("more entries than the file has bytes")
        metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = string(MAX_KEY_BYTES)
            metadata[key] = value(take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = string(MAX_KEY_BYTES)
            n_dims = take("<I")
            if not 1 <= n_dims <= 4:
                raise bad(f"tensor {name!r} has {n_dims} dimensions")
            shape = tuple(take("<Q") for _ in range(n_dims))
            type_id, offset = take("<I"), take("<Q")
            try:
                qtype = GGMLQuantizationType(type_id)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise bad(f"tensor {name!r} has unknown type {type_id}") from None
            count = 1
            for d in shape:
                count *= d
            if shape[0] % block:
                raise bad(f"tensor {name!r}: {shape[0]} values per row, blocks of {block}")
            infos.append((name, qtype.name, shape, offset, count // block * type_size))
        alignment = metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise bad(f"invalid general.alignment {alignment!r}")
        data_offset = pos + (-pos % alignment)
        tensors = []
        for name, type_name, shape, offset, nbytes in infos:
            if data_offset + offset + nbytes > size:
                raise bad(f"tensor {name!r} runs past the end of the file")
            tensors.append(GGUFTensor(name, type_name, shape, offset, nbytes))
        return GGUFHeader(version, metadata, tuple(tensors), data_offset)
    finally:
        buf.close()


# Architectures whose GGUF tensors transformers' GGUF loader maps back onto an ArchSpec'd model.
TORCH_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


def check_gguf_architecture(path: str | os.PathLike, runtime: str = "llama.cpp") -> str:
    """The file's ``general.architecture``, after checking that the file's header parses and
    that ``runtime`` ("llama.cpp" or "torch") can run that architecture; clean errors otherwise."""
    from gguf.constants import MODEL_ARCH_NAMES

    arch = read_header(path).metadata.get("general.architecture")
    if arch is None:
        raise CorruptFileError(f"{path}: GGUF file without general.architecture")
    if not isinstance(arch, str):
        raise CorruptFileError(f"{path}: general.architecture is not a string")
    known = TORCH_ARCHITECTURES if runtime == "torch" else tuple(MODEL_ARCH_NAMES.values())
    if arch not in known:
        where = "quantlab's torch runtime" if runtime == "torch" else "llama.cpp"
        some = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "")
        raise QuantlabError(f"{path}: architecture {arch!r} is not one {where} runs ({some})")
    return arch


@contextmanager
def gguf_writer(dst: str | os.PathLike, arch: str) -> Iterator:
    """A `gguf.GGUFWriter` for ``dst``: what the block adds is written to a temporary file that
    becomes ``dst`` only when the block completes (nothing half-written is ever at ``dst``)."""
    from gguf import GGUFWriter

    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        writer = GGUFWriter(tmp, arch)
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dst)
    except OSError as exc:
        raise QuantlabError(f"could not write {dst}: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def copy_gguf(reader, dst: str | os.PathLike, tensor, file_type: int, strings=None) -> Path:
    """Write ``dst`` atomically: every metadata field of ``reader`` (but the file type, which
    becomes ``file_type``, plus the ``strings`` key/values), and each tensor as
    ``tensor(t) -> (array, GGMLQuantizationType)``."""
    from gguf import GGUFValueType

    with gguf_writer(dst, reader.fields["general.architecture"].contents()) as writer:
        for key, field in reader.fields.items():
            if key.startswith(_SKIP_KEYS) or key == "general.architecture":
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), vtype, sub)
        writer.add_file_type(file_type)
        for key, value in (strings or {}).items():
            writer.add_string(key, value)
        for t in reader.tensors:
            data, raw_dtype = tensor(t)
            writer.add_tensor(t.name, data, raw_dtype=raw_dtype)
    return Path(dst)


def retype_gguf(src: str | os.PathLike, dst: str | os.PathLike, tensor_type: str = "F16") -> Path:
    """Write ``dst``: ``src`` with every tensor dequantized to ``tensor_type`` (F16 or F32)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if tensor_type not in FILE_TYPES:
        raise QuantlabError(f"tensor type {tensor_type!r} is not one of {', '.join(FILE_TYPES)}")

    def retyped(t):
        values = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        if tensor_type == "F16" and values.ndim > 1:  # 1-D tensors stay F32, as llama.cpp's
            return values.astype(np.float16), GGMLQuantizationType.F16
        return values, GGMLQuantizationType.F32

    return copy_gguf(open_gguf(src), dst, retyped, FILE_TYPES[tensor_type])
