"""The plain PyTorch reference of every kernel: what each Triton / CUDA kernel must reproduce.

Packed layouts (documented with shapes in `quantlab.formats.layouts`; restated here for the
kernels, which take raw tensors and know nothing of files). ``K`` = input features, ``N`` = output
features, ``G`` = number of groups, ``P = 32 // bits`` codes per int32 word (bits 2, 4 or 8):

- **GPTQ** (zero points as stored by ``gptq_v2``, i.e. the true zero; v1 files are converted on
  load): ``qweight`` int32 ``(K / P, N)``, code of input ``k`` in word ``k // P`` at bit
  ``(k % P) * bits``; ``qzeros`` int32 ``(G, N / P)``, zero of column ``n`` in word ``n // P`` at
  bit ``(n % P) * bits``; ``scales`` ``(G, N)``; ``g_idx`` int32 ``(K,)``.
- **AWQ GEMM** (4-bit): ``qweight`` int32 ``(K, N / 8)``, column ``n`` in word ``n // 8`` at nibble
  ``AWQ_SLOT[n % 8]`` (the interleave ``[0, 2, 4, 6, 1, 3, 5, 7]`` inverted); ``qzeros`` int32
  ``(G, N / 8)`` packed the same way; ``scales`` ``(G, N)``; group of row ``k`` is
  ``k // group_size``.

Every dequantization computes ``scale * (code - zero)`` in float32 (the arithmetic of
`quantlab.primitives.dequantize`) and rounds once to the output dtype, so kernels can be compared
bit for bit. Output is ``(K, N)``, the transposed weight that ``x @ W`` wants.

GGUF blocks (byte layouts from ggml's ``ggml-common.h``; values as ``gguf.quants`` computes them,
in float32): **Q8_0** 34 bytes = fp16 ``d`` + 32 int8 ``q``: ``d * q``. **Q4_0** 18 bytes = fp16
``d`` + 16 bytes: element ``j < 16`` is the low nibble of byte ``j``, ``j >= 16`` the high nibble of
byte ``j - 16``: ``d * (nibble - 8)``. **Q4_K** 144 bytes per 256 values = fp16 ``d``, fp16
``dmin``, 12 bytes of 6-bit sub-block scales and mins, 128 bytes of nibbles: sub-block ``i`` (32
values) is ``(d * sc_i) * q - (dmin * m_i)`` with ``q`` the low (even ``i``) or high (odd ``i``)
nibbles of bytes ``32 * (i // 2) ...``.
"""

from __future__ import annotations

import torch

AWQ_SLOT = (0, 4, 1, 5, 2, 6, 3, 7)  # nibble that holds column n % 8 (inverse of AWQ_ORDER)
GGUF_BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_K": (256, 144)}  # values, bytes per block


def _fields(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unpack each int32 word into its ``32 // bits`` fields along a new axis after ``dim``."""
    per = 32 // bits
    shifts = torch.arange(per, device=words.device, dtype=torch.int32) * bits
    shape = [1] * (words.dim() + 1)
    shape[dim + 1] = per
    fields = (words.unsqueeze(dim + 1) >> shifts.view(shape)) & ((1 << bits) - 1)
    size = list(words.shape)
    size[dim] *= per
    return fields.reshape(size)


def dequant_gptq(qweight, qzeros, scales, g_idx, bits: int, dtype=torch.float16) -> torch.Tensor:
    """``(K, N)`` weight from the GPTQ layout (true zero points)."""
    codes = _fields(qweight, bits, 0).float()  # (K, N)
    zeros = _fields(qzeros, bits, 1).float()  # (G, N)
    g = g_idx.long()
    return (scales.float()[g] * (codes - zeros[g])).to(dtype)


def dequant_awq(qweight, qzeros, scales, group_size: int, dtype=torch.float16) -> torch.Tensor:
    """``(K, N)`` weight from the AWQ GEMM layout (4-bit)."""
    slots = torch.tensor(AWQ_SLOT, device=qweight.device)

    def columns(words):  # (R, N / 8) -> (R, N) in natural column order
        nib = _fields(words, 4, 1).view(words.shape[0], -1, 8)
        return nib[:, :, slots].reshape(words.shape[0], -1)

    codes, zeros = columns(qweight).float(), columns(qzeros).float()
    g = torch.arange(qweight.shape[0], device=qweight.device) // group_size
    return (scales.float()[g] * (codes - zeros[g])).to(dtype)


def matmul_gptq(x, qweight, qzeros, scales, g_idx, bits: int) -> torch.Tensor:
    """``x @ W`` with ``W`` dequantized to ``x``'s dtype first (what a fused kernel computes)."""
    return x @ dequant_gptq(qweight, qzeros, scales, g_idx, bits, x.dtype)


def _half(raw: torch.Tensor) -> torch.Tensor:
    """Little-endian float16 from the two bytes ``raw[..., 0:2]`` (as float32)."""
    return raw[..., :2].contiguous().view(torch.float16).float().squeeze(-1)


def dequant_gguf(raw: torch.Tensor, gguf_type: str, dtype=torch.float16) -> torch.Tensor:
    """The values of a tensor's GGUF blocks (``raw``: its bytes as uint8), flattened."""
    if gguf_type not in GGUF_BLOCKS:
        raise ValueError(f"no reference for GGUF type {gguf_type}; have {', '.join(GGUF_BLOCKS)}")
    values, size = GGUF_BLOCKS[gguf_type]
    blocks = raw.view(-1, size)
    d = _half(blocks)[:, None]
    if gguf_type == "Q8_0":
        q = blocks[:, 2:].contiguous().view(torch.int8).float()
        out = d * q
    elif gguf_type == "Q4_0":
        qs = blocks[:, 2:].to(torch.int32)
        q = torch.cat([qs & 0xF, qs >> 4], dim=1).float() - 8
        out = d * q
    else:  # Q4_K
        dmin = _half(blocks[:, 2:4])[:, None]
        s = blocks[:, 4:16].to(torch.int32)
        sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], dim=1)
        m = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
        qs = blocks[:, 16:].to(torch.int32).view(-1, 4, 32)
        q = torch.stack([qs & 0xF, qs >> 4], dim=2).view(-1, 8, 32).float()  # sub-block i
        out = (d * sc.float())[:, :, None] * q - (dmin * m.float())[:, :, None]
    return out.reshape(-1).to(dtype)


# -- PyTorch's CPU packed layouts (`quantlab.kernels.cpu`) ----------------------------------------
# **int4pack**: ``packed`` uint8 ``(N, K / 2)`` in PyTorch's blocked layout (made by
# ``aten._convert_weight_to_int4pack_for_cpu``; `quantlab.kernels.cpu.unpack_codes` reads it);
# ``scales_zeros`` ``(K / group, N, 2)``: weight ``(code - 8) * scale + zero`` per block of
# ``group`` input columns; ``perm`` int32 ``(K,)`` or empty: the kernel's input column ``i`` is the
# layer's column ``perm[i]`` (act-order groups made contiguous). **int8pack**: ``weight_int8``
# ``(N, K)``, ``scales`` ``(N,)``: weight ``code * scale``.


def matmul_int4pack(x, packed, scales_zeros, perm, group: int) -> torch.Tensor:
    from quantlab.kernels.cpu import unpack_codes

    n = scales_zeros.shape[1]
    codes = unpack_codes(packed.cpu(), n, packed.shape[1] * 2).float()  # (N, K)
    sz = scales_zeros.float().cpu().repeat_interleave(group, dim=0)  # (K, N, 2)
    weight = (codes.t() - 8.0) * sz[..., 0] + sz[..., 1]  # (K, N)
    if perm.numel():
        x = x.index_select(-1, perm.to(x.device))
    return (x.float() @ weight.to(x.device)).to(x.dtype)


def matmul_int8pack(x, weight_int8, scales) -> torch.Tensor:
    weight = weight_int8.float() * scales.float()[:, None]
    return (x.float() @ weight.t()).to(x.dtype)
