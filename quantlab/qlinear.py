"""`QuantLinear`: a linear layer that keeps its weight quantized and dequantizes when it runs.

It holds one `QuantizedWeight` as buffers (codes one per byte, float32 scales that are exactly
float16 values, zero points, ``g_idx``) and computes ``x @ dequantize(W).T + b`` with the reference
dequantization of `quantlab.primitives`, so a loaded checkpoint gives exactly the logits of the same
weights applied in memory. GPU kernels (Triton / CUDA) plug in behind `forward` later; this path is
the reference they are tested against and runs everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantlab.types import QuantizedWeight


class QuantLinear(nn.Module):
    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self.bits, self.group_size, self.sym = qw.bits, qw.group_size, qw.sym
        self.weight_dtype = qw.dtype
        self.register_buffer("qweight", qw.qweight.to(torch.uint8).contiguous())
        self.register_buffer("scales", qw.scales.float().contiguous())
        self.register_buffer("zeros", qw.zeros.to(torch.uint8).contiguous())
        self.register_buffer("g_idx", qw.g_idx.to(torch.int32).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(
            self.qweight,
            self.scales.float(),
            self.zeros,
            self.g_idx,
            self.bits,
            self.group_size,
            self.sym,
            self.weight_dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.quantized_weight().dequantize().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, sym={self.sym}, bias={self.bias is not None}"
        )
