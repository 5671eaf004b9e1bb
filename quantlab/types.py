"""Types shared by every stage: what a method returns and a format writes.

A `QuantizedWeight` is one linear layer's weight after weight-only quantization, in the form every
method produces and every format packs: integer codes, per-group scales and integer zero points,
and for act-order (GPTQ ``desc_act``) the group of each input column. Dequantization is

    W[o, i] = scales[o, g_idx[i]] * (qweight[o, i] - zeros[o, g_idx[i]])

which `dequantize` computes (re-exported by `quantlab.primitives`, the reference every kernel is
tested against).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """One quantized ``(out_features, in_features)`` weight.

    Fields (``G`` = number of groups = ceil(in / group_size), or 1 for per-channel):
    - ``qweight``: (out, in) uint8, codes in [0, 2**bits - 1], in the layer's column order;
    - ``scales``: (out, G) float32;
    - ``zeros``: (out, G) uint8 integer zero points (symmetric: 2**(bits-1));
    - ``g_idx``: (in,) int32, the group of each input column (``i // group_size`` unless act-order
      without static groups reordered them);
    - ``bits``, ``group_size`` (-1 = one group per row), ``sym``;
    - ``dtype``: the dtype the original weight had (what a checkpoint restores non-quantized
      tensors to).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    sym: bool
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        out, cols = self.qweight.shape
        groups = self.scales.shape[1]
        if self.scales.shape != (out, groups) or self.zeros.shape != (out, groups):
            raise ValueError("scales and zeros must both be (out, groups)")
        if self.g_idx.shape != (cols,):
            raise ValueError(f"g_idx must have {cols} entries")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[1])

    @property
    def act_order(self) -> bool:
        """True when columns are not grouped in order (GPTQ desc_act without static groups)."""
        size = self.group_size if self.group_size > 0 else self.shape[1]
        natural = torch.arange(self.shape[1], dtype=torch.int32) // size
        return not torch.equal(self.g_idx.cpu(), natural)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self)


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """``scales[o, g_idx[i]] * (qweight[o, i] - zeros[o, g_idx[i]])`` as float32 (out, in)."""
    if qw.act_order:
        g = qw.g_idx.long()
        return qw.scales[:, g] * (qw.qweight.float() - qw.zeros[:, g].float())
    # consecutive groups: broadcast each group's scale and zero (no gather), same values
    out, cols = qw.qweight.shape
    size = qw.group_size if qw.group_size > 0 else cols
    full = cols // size
    codes = qw.qweight.float()
    values = torch.empty(out, cols, dtype=torch.float32, device=codes.device)
    head = values[:, : full * size].view(out, full, size)
    zeros, scales = qw.zeros[:, :full].float()[:, :, None], qw.scales[:, :full, None]
    torch.mul(codes[:, : full * size].view(out, full, size) - zeros, scales, out=head)
    if full * size < cols:  # a shorter last group
        tail = codes[:, full * size :] - qw.zeros[:, full:].float()
        values[:, full * size :] = tail * qw.scales[:, full:]
    return values
