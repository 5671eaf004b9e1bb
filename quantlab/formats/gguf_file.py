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


# Architectures whose GGUF tensors transformers' GGUF loader maps back onto an ArchSpec'd model.
TORCH_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


def check_gguf_architecture(path: str | os.PathLike, runtime: str = "llama.cpp") -> str:
    """The file's ``general.architecture``, after checking that the file parses and that
    ``runtime`` ("llama.cpp" or "torch") can run that architecture; clean errors otherwise."""
    from gguf.constants import MODEL_ARCH_NAMES

    reader = open_gguf(path)
    field = reader.fields.get("general.architecture")
    if field is None:
        raise CorruptFileError(f"{path}: GGUF file without general.architecture")
    try:
        arch = str(field.contents())
    except (UnicodeDecodeError, ValueError, IndexError) as exc:
        raise CorruptFileError(f"{path}: unreadable general.architecture ({exc})") from None
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
