"""The one reference fake-quantization that every method, format and kernel is compared against.

Asymmetric min-max quantization to ``bits`` bits per group of ``group_size`` input columns, with
the conventions of the GPTQ reference code (``quant.py``) that GPTQ checkpoints assume:
- the range always contains 0: ``xmin = min(min(w), 0)``, ``xmax = max(max(w), 0)``;
- symmetric: ``xmax = max(|xmin|, xmax)``, ``xmin = -xmax``, zero point ``2**(bits-1)``;
- asymmetric: zero point ``round(-xmin / scale)`` (an integer in [0, 2**bits - 1]);
- ``scale = (xmax - xmin) / (2**bits - 1)``; an all-zero group gets the range [-1, 1];
- scales are rounded *up* to a float16 value (at least 2**-24, the smallest float16), so that the
  fp16 ``scales`` of every checkpoint format hold them exactly (a written checkpoint dequantizes to
  the very values the method computed with) while the range still covers the group;
- codes ``q = clamp(round(w / scale) + zero, 0, 2**bits - 1)``, values ``scale * (q - zero)``.
A group size that does not divide ``in_features`` leaves a shorter last group.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from quantlab.errors import ConfigError
from quantlab.types import QuantizedWeight, dequantize

__all__ = [
    "SUPPORTED_BITS",
    "check_bits_and_group",
    "dequantize",
    "fake_quantize",
    "grid_range",
    "natural_g_idx",
    "quantize_codes",
    "quantize_groups",
    "quantize_rtn",
    "scale_zero",
]

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits_and_group(bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        allowed = f"{', '.join(map(str, SUPPORTED_BITS[:-1]))} or {SUPPORTED_BITS[-1]}"
        raise ConfigError(f"bits must be {allowed}, got {bits}")
    if group_size != -1 and group_size < 1:
        raise ConfigError(f"group_size must be -1 (per channel) or >= 1, got {group_size}")


def _fp16_at_least(x: torch.Tensor) -> torch.Tensor:
    """The smallest float16 value >= ``x`` (as float32): rounding a scale up keeps the group's
    whole range representable, so every code stays within half a step of its weight."""
    half = x.half()
    below = half.float() < x
    return torch.where(
        below, torch.nextafter(half, torch.full_like(half, float("inf"))), half
    ).float()


def grid_range(w: torch.Tensor, sym: bool, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xmin, xmax)`` of ``w`` along ``dim`` (kept) by the conventions above: the range
    contains 0, is symmetric with ``sym``, and is [-1, 1] for an all-zero group."""
    lo, hi = torch.aminmax(w.float(), dim=dim, keepdim=True)
    xmin = torch.clamp(lo, max=0)
    xmax = torch.clamp(hi, min=0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    return torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)


def scale_zero(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and integer zero point of ``w`` (rows, cols), each (rows, 1) float32."""
    maxq = 2**bits - 1
    xmin, xmax = grid_range(w, sym)
    scale = _fp16_at_least(torch.clamp((xmax - xmin) / maxq, min=2**-24))
    zero = (
        torch.full_like(scale, (maxq + 1) // 2) if sym else (-xmin / scale).round().clamp(0, maxq)
    )
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int):
    """Integer codes of ``w`` given broadcastable ``scale`` and ``zero`` (float32 result)."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, 2**bits - 1)


def natural_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    size = group_size if group_size > 0 else in_features
    return torch.arange(in_features, dtype=torch.int32, device=device) // size


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> QuantizedWeight:
    """Round-to-nearest quantization of a (out, in) weight, group by group (all groups at once:
    the same values as quantizing each group on its own)."""
    return quantize_groups(w, bits, group_size, sym, scale_zero)


def quantize_groups(
    w: torch.Tensor, bits: int, group_size: int, sym: bool, fit: Callable
) -> QuantizedWeight:
    """Quantize a (out, in) weight group by group with the scale and zero point that
    ``fit(groups, bits, sym) -> (scale, zero)`` chooses for a (n, size) float32 matrix of groups
    (one group per row; each (n, 1)): `scale_zero` for RTN, HQQ's optimiser for HQQ. Scales
    must be float16 values and zeros integers in [0, 2**bits - 1] (what every format stores)."""
    check_bits_and_group(bits, group_size)
    out, cols = w.shape
    size = group_size if group_size > 0 else cols
    full = cols // size
    dtype, w = w.dtype, w.float()
    parts = []  # (codes, scales, zeros) of the whole groups, then of a shorter last group
    if full:
        head = w[:, : full * size].reshape(out * full, size)
        scale, zero = fit(head, bits, sym)
        codes = quantize_codes(head, scale, zero, bits).reshape(out, full * size)
        parts.append((codes, scale.reshape(out, full), zero.reshape(out, full)))
    if full * size < cols:
        tail = w[:, full * size :]
        scale, zero = fit(tail, bits, sym)
        parts.append((quantize_codes(tail, scale, zero, bits), scale, zero))
    codes = torch.cat([p[0] for p in parts], dim=1).to(torch.uint8)
    scales = torch.cat([p[1] for p in parts], dim=1)
    zeros = torch.cat([p[2] for p in parts], dim=1).to(torch.uint8)
    g_idx = natural_g_idx(cols, group_size, w.device)
    return QuantizedWeight(codes, scales, zeros, g_idx, bits, group_size, sym, dtype)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """``dequantize(quantize_rtn(w))``: the reference fake-quant of a weight, computed without
    the integer tensors (codes and zero points are whole numbers, exact in float32, so
    ``scale * (code - zero)`` has the same value either way; tested)."""
    check_bits_and_group(bits, group_size)
    out, cols = w.shape
    size = group_size if group_size > 0 else cols
    full = cols // size
    w = w.float()
    values = torch.empty_like(w)
    if full:
        head = w[:, : full * size].reshape(out * full, size)
        scale, zero = scale_zero(head, bits, sym)
        codes = quantize_codes(head, scale, zero, bits)
        values[:, : full * size] = codes.sub_(zero).mul_(scale).view(out, full * size)
    if full * size < cols:
        tail = w[:, full * size :]
        scale, zero = scale_zero(tail, bits, sym)
        values[:, full * size :] = quantize_codes(tail, scale, zero, bits).sub_(zero).mul_(scale)
    return values
