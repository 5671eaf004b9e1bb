"""The packed tensor layouts of one quantized linear, per checkpoint format, both ways.

Notation: a linear's weight is ``(out, in)``; ``G = ceil(in / group_size)`` groups (1 when
``group_size == -1``); codes and zero points are unsigned ``bits``-bit integers; "packed" means the
little-endian bit stream of `quantlab.formats.packing` (32 codes fill ``bits`` int32 words; 3-bit
codes straddle words). Dequantization is always ``scale * (code - zero)``.

**GPTQ** (AutoGPTQ / GPTQModel / transformers / vLLM), tensors ``<linear>.<part>``:
- ``qweight`` int32 ``(in * bits / 32, out)``: codes packed along the *input* dimension (each
  column of ``qweight`` is one output row's codes);
- ``qzeros`` int32 ``(G, out * bits / 32)``: zero points packed along the *output* dimension;
  ``checkpoint_format: gptq`` (v1) stores ``zero - 1`` (so a zero point of 0 cannot be stored:
  readers add 1 to every packed field with carries), ``gptq_v2`` stores ``zero``;
- ``scales`` float16 ``(G, out)``; ``g_idx`` int32 ``(in,)``: the group of each input column
  (``i // group_size`` unless act-order, ``desc_act``, regrouped the columns);
- the number of groups is ``ceil(in / group_size)``: a last, shorter group is representable.

**AWQ GEMM** (AutoAWQ ``version: gemm``, read by transformers / vLLM / GPTQModel), 4-bit only:
- ``qweight`` int32 ``(in, out / 8)``: codes packed along the *output* dimension, each run of 8
  output columns interleaved in `AWQ_ORDER` before packing;
- ``qzeros`` int32 ``(G, out / 8)``: zero points (not minus one), packed and interleaved the same
  way;
- ``scales`` float16 ``(G, out)``; no ``g_idx``: groups are consecutive, ``in % group_size == 0``.

**compressed-tensors ``pack-quantized``** (llm-compressor), tensors ``<linear>.weight_<part>``:
- ``weight_packed`` int32 ``(out, ceil(in * bits / 32))``: ``code`` packed along the *input*
  dimension, where the stored code is the signed value plus ``2**(bits-1)``;
- ``weight_scale`` ``(out, G)`` in the model dtype; ``weight_shape`` int ``(2,)`` = ``(out, in)``;
- asymmetric: ``weight_zero_point`` int32 ``(ceil(out * bits / 32), G)``, signed zero points plus
  ``2**(bits-1)`` packed along the *output* dimension; symmetric: no zero point (the signed zero
  is 0, i.e. stored code ``2**(bits-1)``); optional ``weight_g_idx`` for group act-order.
"""

from __future__ import annotations

import torch

from quantlab.errors import CorruptFileError, FormatError
from quantlab.formats.packing import (
    awq_deinterleave,
    awq_interleave,
    pack_bits,
    packed_length,
    unpack_bits,
)
from quantlab.primitives import natural_g_idx
from quantlab.types import QuantizedWeight

GPTQ_FORMATS = ("gptq", "gptq_v2")


def _fp16_scales(name: str, qw: QuantizedWeight) -> torch.Tensor:
    half = qw.scales.half()
    if not torch.equal(half.float(), qw.scales.float()):
        raise FormatError(
            f"{name}: scales are not exactly representable in float16, so the checkpoint would "
            "not dequantize to the method's values (quantize again with this quantlab version)"
        )
    return half


def _n_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size <= 0 else -(-in_features // group_size)


# --- GPTQ ------------------------------------------------------------------------------------


def check_gptq(name: str, qw: QuantizedWeight, checkpoint_format: str = "gptq") -> None:
    """Refuse (FormatError) what the GPTQ layout cannot hold exactly."""
    out, cols = qw.shape
    if checkpoint_format not in GPTQ_FORMATS:
        raise FormatError(f"GPTQ checkpoint_format must be one of {GPTQ_FORMATS}")
    for what, n in (("in_features", cols), ("out_features", out)):
        if n * qw.bits % 32:
            raise FormatError(
                f"{name}: {what}={n} x {qw.bits} bits is not a whole number of int32 words; "
                "the GPTQ layout cannot store it"
            )
    if checkpoint_format == "gptq" and bool((qw.zeros == 0).any()):
        count = int((qw.zeros == 0).sum())
        raise FormatError(
            f"{name}: {count} groups have zero point 0, which GPTQ v1 cannot store (it stores "
            "zero - 1); quantize with --sym, or write checkpoint_format gptq_v2 "
            "(--gptq-format v2, read by GPTQModel)"
        )


def pack_gptq(name: str, qw: QuantizedWeight, checkpoint_format: str = "gptq") -> dict:
    check_gptq(name, qw, checkpoint_format)
    zeros = qw.zeros.to(torch.int64)
    if checkpoint_format == "gptq":
        zeros = zeros - 1
    return {
        "qweight": pack_bits(qw.qweight, qw.bits).T.contiguous(),
        "qzeros": pack_bits(zeros.T, qw.bits).contiguous(),
        "scales": _fp16_scales(name, qw).T.contiguous(),
        "g_idx": qw.g_idx.to(torch.int32).contiguous(),
    }


def _expect(name: str, part: str, tensor: torch.Tensor, shape: tuple, dtype=None) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise CorruptFileError(
            f"tensor {name}.{part} has shape {list(tensor.shape)}, expected {list(shape)}"
        )
    if dtype is not None and tensor.dtype != dtype:
        raise CorruptFileError(f"tensor {name}.{part} has dtype {tensor.dtype}, expected {dtype}")


def _v1_zeros(qzeros: torch.Tensor, bits: int, out: int) -> torch.Tensor:
    """Zero points of a v1 ``qzeros``: for 2/4/8 bits, v1 writers subtract 0x11111111 (4-bit;
    0x55555555 / 0x01010101) from each whole int32 word, so a stored zero of 0 borrows from its
    neighbour; adding the constant back per word (mod 2**32) undoes exactly that. 3-bit fields
    straddle words and are shifted field by field (as GPTQModel does)."""
    if 32 % bits == 0:
        ones = sum(1 << (k * bits) for k in range(32 // bits))
        words = ((qzeros.to(torch.int64) & 0xFFFFFFFF) + ones) & 0xFFFFFFFF
        return unpack_bits(words, bits, out)
    return (unpack_bits(qzeros, bits, out) + 1) & ((1 << bits) - 1)


def unpack_gptq(
    name: str,
    tensors: dict,
    out: int,
    cols: int,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    checkpoint_format: str = "gptq",
    dtype=torch.float16,
) -> QuantizedWeight:
    """A `QuantizedWeight` from GPTQ tensors; shapes are checked against ``(out, cols)``."""
    groups = _n_groups(cols, group_size)
    _expect(name, "qweight", tensors["qweight"], (packed_length(cols, bits), out), torch.int32)
    _expect(name, "qzeros", tensors["qzeros"], (groups, packed_length(out, bits)), torch.int32)
    _expect(name, "scales", tensors["scales"], (groups, out))
    codes = unpack_bits(tensors["qweight"].T, bits, cols)
    zeros = (
        _v1_zeros(tensors["qzeros"], bits, out)
        if checkpoint_format == "gptq"
        else (unpack_bits(tensors["qzeros"], bits, out))
    )
    g_idx = tensors.get("g_idx")
    if g_idx is None:
        g_idx = natural_g_idx(cols, group_size)
    _expect(name, "g_idx", g_idx, (cols,))
    g_idx = g_idx.to(torch.int32)
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        raise CorruptFileError(f"tensor {name}.g_idx has groups outside [0, {groups})")
    return QuantizedWeight(
        codes.to(torch.uint8),
        tensors["scales"].float().T.contiguous(),
        zeros.T.to(torch.uint8).contiguous(),
        g_idx,
        bits,
        group_size,
        sym,
        dtype,
    )


# --- AWQ GEMM --------------------------------------------------------------------------------


def check_awq(name: str, qw: QuantizedWeight) -> None:
    out, cols = qw.shape
    if qw.bits != 4:
        raise FormatError(f"{name}: AWQ GEMM checkpoints are 4-bit only, got {qw.bits} bits")
    if qw.group_size <= 0 or cols % qw.group_size:
        raise FormatError(
            f"{name}: in_features={cols} is not a multiple of group size {qw.group_size}; AWQ "
            "loaders assume whole groups (use a group size that divides it, or --format gptq)"
        )
    if out % 8:
        raise FormatError(f"{name}: out_features={out} is not a multiple of 8 (AWQ packing)")
    if qw.act_order:
        raise FormatError(f"{name}: AWQ checkpoints have no g_idx; act-order cannot be stored")


def pack_awq(name: str, qw: QuantizedWeight) -> dict:
    check_awq(name, qw)
    return {
        "qweight": pack_bits(awq_interleave(qw.qweight.T), 4).contiguous(),
        "qzeros": pack_bits(awq_interleave(qw.zeros.T), 4).contiguous(),
        "scales": _fp16_scales(name, qw).T.contiguous(),
    }


def unpack_awq(
    name: str, tensors: dict, out: int, cols: int, *, group_size: int, dtype=torch.float16
) -> QuantizedWeight:
    if group_size <= 0 or cols % group_size:
        raise CorruptFileError(f"{name}: in_features={cols} is not a multiple of {group_size}")
    groups = cols // group_size
    _expect(name, "qweight", tensors["qweight"], (cols, out // 8), torch.int32)
    _expect(name, "qzeros", tensors["qzeros"], (groups, out // 8), torch.int32)
    _expect(name, "scales", tensors["scales"], (groups, out))
    codes = awq_deinterleave(unpack_bits(tensors["qweight"], 4, out))
    zeros = awq_deinterleave(unpack_bits(tensors["qzeros"], 4, out))
    return QuantizedWeight(
        codes.T.to(torch.uint8).contiguous(),
        tensors["scales"].float().T.contiguous(),
        zeros.T.to(torch.uint8).contiguous(),
        natural_g_idx(cols, group_size),
        4,
        group_size,
        False,
        dtype,
    )


# --- compressed-tensors pack-quantized -------------------------------------------------------


def pack_compressed(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """One linear as compressed-tensors ``pack-quantized`` tensors (the layout above): codes and
    zero points are stored as they are (``stored = signed + 2**(bits-1)`` is quantlab's unsigned
    code), scales in float16 (quantlab's scales are float16 values). compressed-tensors 0.19
    has no ``g_idx`` (its group act-order was removed): an act-order result must use static
    groups, and whole groups (``in % group_size == 0``)."""
    out, cols = qw.shape
    if qw.act_order:
        raise FormatError(
            f"{name}: act-order without static groups (a g_idx) cannot be written as "
            "compressed-tensors (its loaders dropped g_idx); quantize with static_groups"
        )
    if qw.group_size > 0 and cols % qw.group_size:
        raise FormatError(
            f"{name}: in_features={cols} is not a multiple of group_size {qw.group_size}, "
            "which compressed-tensors needs"
        )
    parts = {
        "weight_packed": pack_bits(qw.qweight, qw.bits),
        "weight_scale": _fp16_scales(name, qw).contiguous(),
        "weight_shape": torch.tensor([out, cols], dtype=torch.int64),
    }
    if not qw.sym:
        parts["weight_zero_point"] = pack_bits(qw.zeros.T.contiguous(), qw.bits).T.contiguous()
    return parts


def unpack_compressed(
    name: str, tensors: dict, *, bits: int, group_size: int | None, sym: bool, dtype
) -> QuantizedWeight:
    shape = tensors.get("weight_shape")
    if shape is None or shape.numel() != 2:
        raise CorruptFileError(f"tensor {name}.weight_shape is missing or not (out, in)")
    out, cols = (int(v) for v in shape.tolist())
    scale = tensors["weight_scale"]
    groups = scale.shape[1] if scale.ndim == 2 else 1
    _expect(name, "weight_packed", tensors["weight_packed"], (out, packed_length(cols, bits)))
    _expect(name, "weight_scale", scale.reshape(out, groups), (out, groups))
    codes = unpack_bits(tensors["weight_packed"], bits, cols)
    if sym:
        zeros = torch.full((out, groups), 1 << (bits - 1), dtype=torch.int64)
    else:
        zp = tensors.get("weight_zero_point")
        if zp is None:
            raise CorruptFileError(f"tensor {name}.weight_zero_point is missing (asymmetric)")
        _expect(name, "weight_zero_point", zp, (packed_length(out, bits), groups))
        zeros = unpack_bits(zp.T, bits, out).T
    if group_size is None or group_size <= 0:
        size = -(-cols // groups)
        group_size = -1 if groups == 1 else size
    elif groups != -(-cols // group_size):
        raise CorruptFileError(
            f"tensor {name}.weight_scale has {groups} groups, expected {-(-cols // group_size)} "
            f"for in_features={cols} and group size {group_size}"
        )
    g_idx = tensors.get("weight_g_idx")
    g_idx = natural_g_idx(cols, group_size) if g_idx is None else g_idx.to(torch.int32)
    _expect(name, "weight_g_idx", g_idx, (cols,))
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        raise CorruptFileError(f"tensor {name}.weight_g_idx has groups outside [0, {groups})")
    return QuantizedWeight(
        codes.to(torch.uint8),
        scale.reshape(out, groups).float(),
        zeros.to(torch.uint8),
        g_idx,
        bits,
        group_size,
        sym,
        dtype,
    )
