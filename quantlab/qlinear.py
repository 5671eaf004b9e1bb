"""`QuantLinear`: a linear layer that keeps its weight quantized and dequantizes when it runs.

It holds one `QuantizedWeight` as buffers (codes one per byte, float32 scales that are exactly
float16 values, zero points, ``g_idx``) and computes ``x @ dequantize(W).T + b`` with the reference
dequantization of `quantlab.primitives`, so a loaded checkpoint gives exactly the logits of the same
weights applied in memory. That path runs everywhere and is what the kernels are tested against.

`use_kernel` (or `use_kernels(model)` for every such layer) switches a layer to the kernels of
`quantlab.kernels`: the weight is packed once into the GPTQ layout (2/4/8 bits; or the AWQ layout
for 4-bit consecutive groups), the byte-per-code buffers are dropped, and `forward` calls the
fused matmul where a kernel serves the batch, else a dequantization kernel and a dense matmul.
The backend is picked by `quantlab.kernels.select` (CUDA > Triton > torch) or forced.
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

    kernel: dict | None = None  # set by use_kernel: backend, layout, fused

    def use_kernel(self, backend: str = "auto", layout: str = "gptq", fused: bool = True) -> None:
        """Pack the weight into ``layout`` ("gptq" or "awq") and run `forward` through the kernels
        of ``backend`` ("auto", "cuda", "triton" or "torch")."""
        from quantlab.errors import ConfigError
        from quantlab.formats.layouts import pack_awq, pack_gptq

        if self.kernel is not None:
            raise ConfigError("this layer already runs through a kernel")
        qw = self.quantized_weight()
        if 32 % self.bits:
            raise ConfigError(f"kernels need 2, 4 or 8 bits; this layer has {self.bits}")
        if layout == "gptq":
            packed = pack_gptq("layer", qw, "gptq_v2")
        elif layout == "awq":
            packed = pack_awq("layer", qw)
        else:
            raise ConfigError(f"kernel layout must be gptq or awq, got {layout!r}")
        for name in ("qweight", "scales", "zeros", "g_idx"):
            delattr(self, name)
        for name, tensor in packed.items():
            self.register_buffer(name, tensor.to(qw.qweight.device))
        self.kernel = {"backend": backend, "layout": layout, "fused": fused}

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        from quantlab.kernels import ops

        k = self.kernel
        if k["layout"] == "awq":
            w = ops.dequant_awq(
                self.qweight, self.qzeros, self.scales, self.group_size, x.dtype, k["backend"]
            )
            y = x @ w
        else:
            args = (self.qweight, self.qzeros, self.scales, self.g_idx, self.bits)
            y = ops.gptq_linear(x, *args, backend=k["backend"], fused=k["fused"])
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def quantized_weight(self) -> QuantizedWeight:
        if self.kernel is not None:
            return self._unpacked()
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

    def _unpacked(self) -> QuantizedWeight:
        from quantlab.formats.layouts import unpack_awq, unpack_gptq

        tensors = {
            n: getattr(self, n)
            for n in ("qweight", "qzeros", "scales", "g_idx")
            if hasattr(self, n)
        }
        shape = (self.out_features, self.in_features)
        kw = {
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "dtype": self.weight_dtype,
        }
        if self.kernel["layout"] == "awq":
            return unpack_awq(
                "layer", tensors, *shape, group_size=self.group_size, dtype=kw["dtype"]
            )
        return unpack_gptq("layer", tensors, *shape, checkpoint_format="gptq_v2", **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self._kernel_forward(x)
        weight = self.quantized_weight().dequantize().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, sym={self.sym}, bias={self.bias is not None}, "
            f"kernel={self.kernel}"
        )


def use_kernels(model: nn.Module, backend: str = "auto", layout: str = "gptq", fused=True) -> int:
    """`QuantLinear.use_kernel` on every quantized layer of ``model``; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.use_kernel(backend, layout, fused)
    return len(layers)
