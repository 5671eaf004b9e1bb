"""Formats: the artifacts quantlab writes and reads, each one registered object.

Built in: ``native`` (quantlab's exact tensors), ``gptq`` (v1 / v2), ``awq`` (GEMM), ``gguf``
(llama.cpp) and, read only, ``compressed-tensors``. The registry (`quantlab.formats.registry`)
is what the rest of quantlab asks: `get_format`, `format_names`, `detect` / `detect_format`;
`write_artifact` writes a method's result in a named format and `load` reads any artifact into
transformers. Importing this package registers the built-in formats.
"""

from __future__ import annotations

from pathlib import Path

from quantlab.formats import awq, compressed_tensors, gguf, gptq, native  # noqa: F401 (registration)
from quantlab.formats.loader import load
from quantlab.formats.registry import (
    ArtifactSize,
    Format,
    LoadedCheckpoint,
    WriteRequest,
    default_format,
    detect,
    detect_format,
    format_names,
    format_of_label,
    formats,
    get_format,
    option_fields,
    register_format,
    unregister_format,
)

__all__ = [
    "ArtifactSize",
    "Format",
    "LoadedCheckpoint",
    "WriteRequest",
    "default_format",
    "detect",
    "detect_format",
    "format_names",
    "format_of_label",
    "formats",
    "get_format",
    "load",
    "option_fields",
    "register_format",
    "unregister_format",
    "write_artifact",
]


def write_artifact(name: str, out, source, *, result=None, model=None, **options) -> Path:
    """Write ``result`` (a `QuantizationResult` of ``model``, quantized from the resolved model
    ``source``) as format ``name`` (or a label: ``gptq_v2``) with ``options`` (the format's own,
    e.g. ``gptq_format="v2"``, plus the `WriteRequest` fields ``max_shard_bytes``, ``imatrix``,
    ``calibration``, ``corpus_label``, ``cache``). What the format cannot hold is refused before
    anything is written."""
    from quantlab.errors import FormatError

    fmt = format_of_label(name) or get_format(name)
    request_fields = {"max_shard_bytes", "imatrix", "calibration", "corpus_label", "cache"}
    extra = {k: options.pop(k) for k in list(options) if k in request_fields}
    opts = fmt.options(**{**fmt.label_options(name), **options})
    method = result.method if result is not None else None
    config = result.config if result is not None else None
    reason = fmt.accepts(method, config, opts, imatrix=extra.get("imatrix") is not None)
    if reason:
        raise FormatError(reason)
    request = WriteRequest(Path(out), source, opts, result, model, **extra)
    return fmt.write(request)
