"""A method's result (RTN, GPTQ, AWQ, ...) as GGUF blocks without a second rounding.

Where a `QuantizedWeight` is exactly representable as a GGUF block type, its codes and scales are
written as those blocks directly, so the GGUF file computes the same function as the GPTQ result
(llama.cpp re-quantizing the dequantized weights would round them a second time):

- 4-bit symmetric (zero point 8) -> **Q4_0**: ``d`` f16, then 16 bytes where byte j holds code j
  (low nibble) and code j+16 (high nibble); value ``d * (code - 8)``;
- 8-bit symmetric (zero point 128) -> **Q8_0**: ``d`` f16, then 32 int8 ``code - 128``; value
  ``d * int8``;
- 4-bit asymmetric whose offset ``-scale * zero`` is a float16 value -> **Q4_1**: ``d``, ``m`` f16,
  then 16 bytes as Q4_0; value ``d * code + m``.

Scales are float16 values already (`quantlab.primitives.scale_zero`), so ``d`` is exact; for Q4_1
the offset ``m = -scale * zero`` must be a float16 value too, which is checked per group. Anything
else is refused with the reason. Parameters the method changed besides the linears (AWQ's
scaled norms, a scaled ``v_proj`` bias) are written as F32 in place of the full-precision file's.
The other tensors (embeddings, norms, and linears not quantized) are copied from a
full-precision GGUF of the same model; for the llama architecture llama.cpp's
converter stores attention q/k rows in an interleaved rotary order, so those rows are permuted
the same way (qwen2/qwen3 keep the Hugging Face order).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from quantlab.errors import FormatError
from quantlab.formats.gguf_quant import gguf_parameter_name, gguf_tensor_name
from quantlab.types import QuantizedWeight

BLOCK = 32
FILE_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7}  # llama.cpp LLAMA_FTYPE_MOSTLY_*


def lossless_type(name: str, qw: QuantizedWeight) -> str:
    """The GGUF block type that holds ``qw`` exactly, or a `FormatError` saying why none does."""
    if qw.group_size != BLOCK or qw.act_order:
        raise FormatError(
            f"{name}: GGUF blocks hold 32 consecutive weights; this result has group size "
            f"{qw.group_size}{' and act-order' if qw.act_order else ''} (quantize with "
            "--group-size 32 and without --act-order for a lossless GGUF)"
        )
    if qw.shape[1] % BLOCK:
        raise FormatError(f"{name}: in_features={qw.shape[1]} is not a multiple of 32")
    if qw.bits == 4 and qw.sym:
        return "Q4_0"
    if qw.bits == 8 and qw.sym:
        return "Q8_0"
    if qw.bits == 4:
        m = -qw.scales * qw.zeros.float()
        inexact = int((m.half().float() != m).sum())
        if inexact:
            raise FormatError(
                f"{name}: {inexact} groups have an offset -scale*zero that float16 cannot hold, "
                "so Q4_1 would round it (quantize with --sym for Q4_0)"
            )
        return "Q4_1"
    kind = "symmetric" if qw.sym else "asymmetric"
    raise FormatError(
        f"{name}: {qw.bits}-bit {kind} has no exact GGUF block type "
        "(4-bit -> Q4_0/Q4_1, 8-bit symmetric -> Q8_0)"
    )


def _f16_bytes(values: torch.Tensor) -> np.ndarray:
    """(rows, blocks) -> (rows, blocks, 2) little-endian float16 bytes."""
    return values.half().numpy().astype("<f2").view(np.uint8).reshape(*values.shape, 2)


def pack_blocks(qw: QuantizedWeight, gguf_type: str) -> np.ndarray:
    """The raw GGUF bytes of ``qw`` as ``gguf_type`` blocks: uint8 (rows, blocks * block_bytes)."""
    rows, cols = qw.shape
    codes = qw.qweight.to(torch.int16).reshape(rows, cols // BLOCK, BLOCK)
    d = _f16_bytes(qw.scales)
    if gguf_type == "Q8_0":
        q = (codes - 128).to(torch.int8).numpy().view(np.uint8)
        out = np.concatenate([d, q], axis=-1)
    else:
        nibbles = (codes[..., :16] | (codes[..., 16:] << 4)).to(torch.uint8).numpy()
        if gguf_type == "Q4_0":
            out = np.concatenate([d, nibbles], axis=-1)
        else:  # Q4_1
            m = _f16_bytes(-qw.scales * qw.zeros.float())
            out = np.concatenate([d, m, nibbles], axis=-1)
    return np.ascontiguousarray(out.reshape(rows, -1))


def rotary_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter order of attention q/k rows (interleaved rotary halves)."""
    shape = rows.shape
    return (
        rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )


def permute_rows(qw: QuantizedWeight, n_head: int) -> QuantizedWeight:
    """``qw`` with its output rows in llama.cpp's q/k order (codes, scales, zeros together)."""
    return QuantizedWeight(
        rotary_permute(qw.qweight, n_head).contiguous(),
        rotary_permute(qw.scales, n_head).contiguous(),
        rotary_permute(qw.zeros, n_head).contiguous(),
        qw.g_idx,
        qw.bits,
        qw.group_size,
        qw.sym,
        qw.dtype,
    )


_Q = re.compile(r"\.self_attn\.q_proj$")
_K = re.compile(r"\.self_attn\.k_proj$")


def write_lossless_gguf(
    result, full_precision: str | os.PathLike, dst: str | os.PathLike, config: dict
) -> tuple[Path, dict[str, str]]:
    """Write ``result``'s linears as exact GGUF blocks into a copy of ``full_precision``.

    ``config`` is the model's config.json (for the q/k head counts). Returns the path and the
    block type of each quantized tensor. Refuses (nothing written) when any linear is not exact.
    """
    from gguf import GGMLQuantizationType

    from quantlab.formats.gguf_file import copy_gguf, open_gguf

    reader = open_gguf(full_precision)
    arch = reader.fields["general.architecture"].contents()
    if arch not in ("llama", "qwen2", "qwen3"):
        raise FormatError(f"lossless GGUF writing supports llama, qwen2 and qwen3, not {arch}")
    permute = arch == "llama"  # llama.cpp's converter reorders q/k rows for llama only
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    blocks: dict[str, tuple[str, np.ndarray]] = {}
    for name, qw in result.weights.items():  # everything is checked before anything is written
        gtype = lossless_type(name, qw)
        if permute and _Q.search(name):
            qw = permute_rows(qw, n_head)
        elif permute and _K.search(name):
            qw = permute_rows(qw, n_kv)
        blocks[gguf_tensor_name(name)] = (gtype, pack_blocks(qw, gtype))
    kinds = {t for t, _ in blocks.values()}
    names = {t.name for t in reader.tensors}
    missing = sorted(set(blocks) - names)
    if missing:
        raise FormatError(f"{full_precision} has no tensor {missing[0]}")
    # other parameters the method changed (AWQ's scaled norms, a scaled v_proj bias): written
    # as F32 in place of the full-precision file's; a changed linear weight is its blocks
    changed: dict[str, np.ndarray] = {}
    for name, value in result.modified.items():
        module, _, kind = name.rpartition(".")
        if kind == "weight" and module in result.weights:
            continue
        if permute and (_Q.search(module) or _K.search(module)):
            raise FormatError(f"{name}: a changed q/k parameter is not written to GGUF")
        changed[gguf_parameter_name(name)] = value.detach().float().numpy()
    missing = sorted(set(changed) - names)
    if missing:
        raise FormatError(f"{full_precision} has no tensor {missing[0]}")
    strings = {"quantlab.method": result.method}
    if result.calibration:
        strings["quantlab.calibration.sha256"] = result.calibration["sha256"]

    def tensor(t):
        if t.name in blocks:
            gtype, raw = blocks[t.name]
            return raw, GGMLQuantizationType[gtype]
        if t.name in changed:
            if tuple(changed[t.name].shape) != tuple(np.array(t.data).shape):
                raise FormatError(f"{t.name}: changed parameter's shape differs from the file's")
            return changed[t.name], GGMLQuantizationType.F32
        return np.array(t.data), t.tensor_type

    file_type = FILE_TYPES[max(kinds, key=list(FILE_TYPES).index)]
    dst = copy_gguf(reader, dst, tensor, file_type, strings)
    return dst, {name: gtype for name, (gtype, _) in blocks.items()}


def lossless_artifact(
    result, model_ref, out: Path, cache: Path, outtype: str = "F16"
) -> tuple[Path, dict]:
    """``out``: ``result`` (a `QuantizationResult` of ``model_ref``) as GGUF blocks in a copy of
    the model's full-precision GGUF (``outtype`` F16 or F32: the other tensors' type; 1-D ones
    stay F32), with its manifest; returns the path and per-linear types."""
    import dataclasses
    import json

    from quantlab.formats.gguf_quant import full_precision_gguf, write_gguf_manifest

    src = full_precision_gguf(model_ref, cache, outtype)
    config = json.loads((Path(model_ref.path) / "config.json").read_text())
    path, types = write_lossless_gguf(result, src, out, config)
    write_gguf_manifest(
        path,
        src,
        model_ref,
        lossless_from=result.method,
        config=dataclasses.asdict(result.config),
        calibration=result.calibration,
    )
    return path, types
