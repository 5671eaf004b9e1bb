"""`QuantLinear`: a linear layer that keeps its weight quantized and dequantizes when it runs.

It holds one `QuantizedWeight` as buffers (codes one per byte, float32 scales that are exactly
float16 values, zero points, ``g_idx``) and computes ``x @ dequantize(W).T + b`` with the reference
dequantization of `quantlab.primitives`, so a loaded checkpoint gives exactly the logits of the same
weights applied in memory. That path runs everywhere and is what the kernels are tested against.

`use_kernel` (or `use_kernels(model)` for every such layer) switches a layer to the kernels of
`quantlab.kernels`, packing the weight once and dropping the byte-per-code buffers:
- on a CPU, PyTorch's own int4 / int8 CPU kernels (the ``cpu`` backend, layouts ``int4pack`` /
  ``int8pack``) wherever they represent the weight exactly (`quantlab.kernels.cpu.refusal`);
- otherwise the GPTQ layout (2/4/8 bits; or the AWQ layout for 4-bit consecutive groups), with
  `forward` calling the fused matmul where a kernel serves the batch, else a dequantization
  kernel and a dense matmul. The backend is picked by `quantlab.kernels.select` (CUDA > Triton >
  cpu > torch) or forced.
`use_fast_kernels(model)` switches only the layers a real kernel runs on their device (what the
evaluation harness does), leaving the rest on the reference path.
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

    def cpu_refusal(self) -> str | None:
        """Why PyTorch's CPU kernels cannot run this layer exactly (``None``: they can)."""
        from quantlab.kernels import cpu

        return cpu.refusal(self.quantized_weight())

    def use_kernel(self, backend: str = "auto", layout: str = "auto", fused: bool = True) -> None:
        """Pack the weight into ``layout`` and run `forward` through the kernels of ``backend``
        ("auto", "cuda", "triton", "cpu" or "torch"). ``layout`` "auto": PyTorch's CPU layout
        (int4pack / int8pack) when the layer is on a CPU, ``backend`` is "auto" or "cpu" and the
        layout holds the weight exactly, else "gptq"; or "gptq" / "awq" explicitly."""
        from quantlab.errors import ConfigError
        from quantlab.formats.layouts import pack_awq, pack_gptq
        from quantlab.kernels import cpu

        if self.kernel is not None:
            raise ConfigError("this layer already runs through a kernel")
        qw = self.quantized_weight()
        on_cpu = self.qweight.device.type == "cpu"
        if layout == "auto" and backend in ("auto", "cpu") and on_cpu:
            why = cpu.refusal(qw)
            if why is None:
                from quantlab.kernels import select

                kind, packed = cpu.pack(qw)
                self._swap_buffers(packed, qw.qweight.device)
                self.kernel = {"backend": "cpu", "layout": kind, "fused": True}
                # looked up once here, not at every forward
                self._cpu_op = select(f"matmul_{kind}", device="cpu", backend="cpu").load()
                return
            if backend == "cpu":
                raise ConfigError(why)
        if backend == "cpu":
            raise ConfigError("the cpu backend runs PyTorch's CPU layouts (layout auto, on a CPU)")
        layout = "gptq" if layout == "auto" else layout
        if 32 % self.bits:
            raise ConfigError(f"kernels need 2, 4 or 8 bits; this layer has {self.bits}")
        if layout == "gptq":
            packed = pack_gptq("layer", qw, "gptq_v2")
        elif layout == "awq":
            packed = pack_awq("layer", qw)
        else:
            raise ConfigError(f"kernel layout must be auto, gptq or awq, got {layout!r}")
        self._swap_buffers(packed, qw.qweight.device)
        self.kernel = {"backend": backend, "layout": layout, "fused": fused}

    def _swap_buffers(self, packed: dict[str, torch.Tensor], device) -> None:
        for name in ("qweight", "scales", "zeros", "g_idx"):
            delattr(self, name)
        for name, tensor in packed.items():
            self.register_buffer(name, tensor.to(device))

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        from quantlab.kernels import ops

        k = self.kernel
        if k["layout"] in ("int4pack", "int8pack"):
            rows = x.reshape(-1, x.shape[-1])
            if k["layout"] == "int4pack":
                group = self.in_features // self.scales_zeros.shape[0]
                y = self._cpu_op(rows, self.packed, self.scales_zeros, self.perm, group)
            else:
                y = self._cpu_op(rows, self.weight_int8, self.scales)
            y = y.view(*x.shape[:-1], -1)
        elif k["layout"] == "awq":
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
        from quantlab.kernels import cpu

        names = ("qweight", "qzeros", "scales", "g_idx", "packed", "scales_zeros", "perm")
        tensors = {n: getattr(self, n) for n in (*names, "weight_int8") if hasattr(self, n)}
        shape = (self.out_features, self.in_features)
        kw = {
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "dtype": self.weight_dtype,
        }
        if self.kernel["layout"] in ("int4pack", "int8pack"):
            return cpu.unpack(self.kernel["layout"], tensors, shape, **kw)
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


def use_kernels(model: nn.Module, backend: str = "auto", layout: str = "auto", fused=True) -> int:
    """`QuantLinear.use_kernel` on every quantized layer of ``model``; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.use_kernel(backend, layout, fused)
    return len(layers)


def use_fast_kernels(model: nn.Module) -> dict[str, int]:
    """Run each quantized layer of ``model`` through a real kernel where one serves it on its
    device - PyTorch's CPU kernels on a CPU (where exact), quantlab's CUDA/Triton kernels on a
    GPU - and leave the others on the reference path. Returns how many layers run where
    (``{"cpu": 210, "reference": 0}``)."""
    from quantlab.errors import ConfigError
    from quantlab.kernels import select

    counts: dict[str, int] = {}
    for layer in (m for m in model.modules() if isinstance(m, QuantLinear)):
        if layer.kernel is None:
            device = layer.qweight.device.type
            if device == "cpu":
                if layer.cpu_refusal() is None:
                    layer.use_kernel("cpu")
            elif 32 % layer.bits == 0:
                try:
                    best = select("dequant_gptq", device=device, bits=layer.bits).backend
                except ConfigError:
                    best = "torch"
                if best != "torch":  # the torch "kernel" is the reference path, repacked
                    layer.use_kernel()
        where = layer.kernel["backend"] if layer.kernel else "reference"
        counts[where] = counts.get(where, 0) + 1
    return counts
