"""The one reference fake-quantization that every method, format and kernel is compared against.

Asymmetric min-max quantization to ``bits`` bits per group of ``group_size`` input columns, with
the conventions of the GPTQ reference code (``quant.py``) that GPTQ checkpoints assume:
- the range always contains 0: ``xmin = min(min(w), 0)``, ``xmax = max(max(w), 0)``;
- symmetric: ``xmax = max(|xmin|, xmax)``, ``xmin = -xmax``, zero point ``2**(bits-1)``;
- asymmetric: zero point ``round(-xmin / scale)`` (an integer in [0, 2**bits - 1]);
- ``scale = (xmax - xmin) / (2**bits - 1)``; an all-zero group gets the range [-1, 1];
- codes ``q = clamp(round(w / scale) + zero, 0, 2**bits - 1)``, values ``scale * (q - zero)``.
A group size that does not divide ``in_features`` leaves a shorter last group.
"""

from __future__ import annotations

import math

import torch

from quantlab.errors import ConfigError
from quantlab.types import QuantizedWeight

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits_and_group(bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size != -1 and group_size < 1:
        raise ConfigError(f"group_size must be -1 (per channel) or >= 1, got {group_size}")


def scale_zero(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and integer zero point of ``w`` (rows, cols), each (rows, 1) float32."""
    maxq = 2**bits - 1
    w = w.float()
    xmin = torch.clamp(w.min(dim=1, keepdim=True).values, max=0)
    xmax = torch.clamp(w.max(dim=1, keepdim=True).values, min=0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int):
    """Integer codes of ``w`` given broadcastable ``scale`` and ``zero`` (float32 result)."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, 2**bits - 1)


def natural_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    size = group_size if group_size > 0 else in_features
    return torch.arange(in_features, dtype=torch.int32) // size


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> QuantizedWeight:
    """Round-to-nearest quantization of a (out, in) weight, group by group."""
    check_bits_and_group(bits, group_size)
    out, cols = w.shape
    size = group_size if group_size > 0 else cols
    groups = math.ceil(cols / size)
    codes = torch.empty(out, cols, dtype=torch.uint8)
    scales = torch.empty(out, groups, dtype=torch.float32)
    zeros = torch.empty(out, groups, dtype=torch.uint8)
    for g in range(groups):
        cols_g = slice(g * size, min((g + 1) * size, cols))
        scale, zero = scale_zero(w[:, cols_g], bits, sym)
        codes[:, cols_g] = quantize_codes(w[:, cols_g], scale, zero, bits).to(torch.uint8)
        scales[:, g], zeros[:, g] = scale[:, 0], zero[:, 0].to(torch.uint8)
    g_idx = natural_g_idx(cols, group_size)
    return QuantizedWeight(codes, scales, zeros, g_idx, bits, group_size, sym, w.dtype)


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """``scales[o, g_idx[i]] * (qweight[o, i] - zeros[o, g_idx[i]])`` as float32 (out, in)."""
    g = qw.g_idx.long()
    scales = qw.scales[:, g]
    zeros = qw.zeros[:, g].float()
    return scales * (qw.qweight.float() - zeros)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """``dequantize(quantize_rtn(w))``: the reference fake-quant of a weight."""
    return dequantize(quantize_rtn(w, bits, group_size, sym))
