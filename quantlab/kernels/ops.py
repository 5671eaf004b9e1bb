"""The kernel ops, declared once with ``torch.library`` so ``torch.compile`` can trace them.

Each op takes the packed tensors and a ``backend`` ("auto" or a forced one, see
`quantlab.kernels.select`); its fake implementation gives the output's shape and dtype without
running anything. `gptq_linear` is what `quantlab.qlinear.QuantLinear` calls: the fused matmul
when a kernel serves the batch, otherwise the best dequantization kernel and a dense matmul.
"""

from __future__ import annotations

import torch

from quantlab.errors import ConfigError
from quantlab.kernels import select


@torch.library.custom_op("quantlab::dequant_gptq", mutates_args=())
def dequant_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    spec = select("dequant_gptq", device=qweight.device.type, backend=backend, bits=bits)
    return spec.load()(qweight, qzeros, scales, g_idx, bits, dtype)


@dequant_gptq.register_fake
def _(qweight, qzeros, scales, g_idx, bits, dtype, backend):
    return qweight.new_empty((qweight.shape[0] * (32 // bits), qweight.shape[1]), dtype=dtype)


@torch.library.custom_op("quantlab::dequant_awq", mutates_args=())
def dequant_awq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    spec = select("dequant_awq", device=qweight.device.type, backend=backend, bits=4)
    return spec.load()(qweight, qzeros, scales, group_size, dtype)


@dequant_awq.register_fake
def _(qweight, qzeros, scales, group_size, dtype, backend):
    return qweight.new_empty((qweight.shape[0], qweight.shape[1] * 8), dtype=dtype)


@torch.library.custom_op("quantlab::matmul_gptq", mutates_args=())
def matmul_gptq(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    backend: str,
) -> torch.Tensor:
    request = {"bits": bits, "batch": x.shape[0], "dtype": x.dtype}
    spec = select("matmul_gptq", device=x.device.type, backend=backend, **request)
    return spec.load()(x, qweight, qzeros, scales, g_idx, bits)


@matmul_gptq.register_fake
def _(x, qweight, qzeros, scales, g_idx, bits, backend):
    return x.new_empty((x.shape[0], qweight.shape[1]))


@torch.library.custom_op("quantlab::dequant_gguf", mutates_args=())
def dequant_gguf(
    raw: torch.Tensor, gguf_type: str, dtype: torch.dtype, backend: str
) -> torch.Tensor:
    spec = select("dequant_gguf", device=raw.device.type, backend=backend, layout=gguf_type)
    return spec.load()(raw, gguf_type, dtype)


@dequant_gguf.register_fake
def _(raw, gguf_type, dtype, backend):
    from quantlab.kernels.reference import GGUF_BLOCKS

    values, size = GGUF_BLOCKS[gguf_type]
    return raw.new_empty((raw.numel() // size * values,), dtype=dtype)


def gptq_linear(x, qweight, qzeros, scales, g_idx, bits: int, backend: str = "auto", fused=True):
    """``x @ W`` for ``x`` of shape ``(..., K)``: a fused kernel (CUDA or Triton) when one serves
    ``x``'s rows and dtype on this device (and ``fused``), else the best dequantization kernel + a
    dense matmul. A forced backend that has no dequantization kernel (cuda) dequantizes with the
    best available one."""
    rows = x.reshape(-1, x.shape[-1])
    device = x.device.type
    request = {"bits": bits, "batch": len(rows), "dtype": x.dtype}
    if fused:
        try:
            spec = select("matmul_gptq", device=device, backend=backend, **request)
            fused = spec.backend != "torch"  # torch's "fused" op is dequantize + matmul anyway
        except ConfigError:
            fused = False
    if fused:
        y = matmul_gptq(rows, qweight, qzeros, scales, g_idx, bits, backend)
    else:
        try:
            select("dequant_gptq", device=device, backend=backend, bits=bits)
        except ConfigError:
            backend = "auto"
        y = rows @ dequant_gptq(qweight, qzeros, scales, g_idx, bits, x.dtype, backend)
    return y.view(*x.shape[:-1], -1)
