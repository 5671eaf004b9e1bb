"""Triton kernels: GPTQ / AWQ dequantization, a fused W4A16 GPTQ matmul, GGUF block dequantization.

Imported only when Triton is installed (`quantlab.kernels` imports this module lazily). On a GPU
they compile for it; on a CPU they run in Triton's interpreter (``TRITON_INTERPRET=1`` set before
Triton is imported), which is how the tests check them here. The layouts and the arithmetic they
must reproduce bit for bit are in `quantlab.kernels.reference`.

- ``_dequant_gptq``: one program per ``(BLOCK_K, BLOCK_N)`` tile of the ``(K, N)`` output; codes
  unpacked with shifts from the int32 words, the group of each row read from ``g_idx`` (so
  act-order needs no special case), ``scale * (code - zero)`` in fp32, one rounding on store.
- ``_dequant_awq``: the same for AWQ's interleaved nibbles (4-bit, consecutive groups).
- ``_matmul_gptq``: ``y = x @ W`` for ``M`` rows of activations; each ``(BLOCK_K, BLOCK_N)`` tile of
  ``W`` is dequantized in registers (never written to memory) and fed to ``tl.dot``. For small
  ``M`` the reduction over ``K`` is split over ``SPLIT_K`` programs that add into an fp32 output
  with atomics, so a batch-1 GEMV still fills the GPU.
- ``_dequant_q8_0`` / ``_dequant_q4_0`` / ``_dequant_q4_k``: GGUF blocks read as bytes (the fp16
  block scales rebuilt from two bytes), ``BLOCKS`` blocks per program. Floating-point contraction
  (``a * b - c`` into one FMA) is switched off so the results equal ``gguf``'s numpy arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantlab.kernels.reference import AWQ_SLOT, GGUF_BLOCKS

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _dequant_gptq(
    qw_ptr, qz_ptr, sc_ptr, g_ptr, out_ptr, K, N,
    BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mk, mn = offs_k < K, offs_n < N
    mask = mk[:, None] & mn[None, :]
    words = tl.load(qw_ptr + (offs_k // PER)[:, None] * N + offs_n[None, :], mask=mask, other=0)
    q = (words >> ((offs_k % PER) * BITS)[:, None]) & MASK
    g = tl.load(g_ptr + offs_k, mask=mk, other=0)
    zw = tl.load(qz_ptr + g[:, None] * (N // PER) + (offs_n // PER)[None, :], mask=mask, other=0)
    z = (zw >> ((offs_n % PER) * BITS)[None, :]) & MASK
    s = tl.load(sc_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    w = s * (q.to(tl.float32) - z.to(tl.float32))
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask)


@triton.jit
def _dequant_awq(
    qw_ptr, qz_ptr, sc_ptr, slot_ptr, out_ptr, K, N, GROUP,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mk, mn = offs_k < K, offs_n < N
    mask = mk[:, None] & mn[None, :]
    shift = (tl.load(slot_ptr + offs_n % 8, mask=mn, other=0) * 4)[None, :]
    words = tl.load(
        qw_ptr + offs_k[:, None] * (N // 8) + (offs_n // 8)[None, :], mask=mask, other=0
    )
    q = (words >> shift) & 0xF
    g = offs_k // GROUP
    zw = tl.load(qz_ptr + g[:, None] * (N // 8) + (offs_n // 8)[None, :], mask=mask, other=0)
    z = (zw >> shift) & 0xF
    s = tl.load(sc_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    w = s * (q.to(tl.float32) - z.to(tl.float32))
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask)


@triton.jit
def _matmul_gptq(
    x_ptr, qw_ptr, qz_ptr, sc_ptr, g_ptr, y_ptr, M, N, K,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):  # fmt: skip
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mm, mn = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(tl.program_id(2) * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mm[:, None] & mk[None, :], other=0.0
        )
        mask = mk[:, None] & mn[None, :]
        words = tl.load(qw_ptr + (offs_k // PER)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        q = (words >> ((offs_k % PER) * BITS)[:, None]) & MASK
        g = tl.load(g_ptr + offs_k, mask=mk, other=0)
        zw = tl.load(
            qz_ptr + g[:, None] * (N // PER) + (offs_n // PER)[None, :], mask=mask, other=0
        )
        z = (zw >> ((offs_n % PER) * BITS)[None, :]) & MASK
        s = tl.load(sc_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
        w = s.to(tl.float32) * (q.to(tl.float32) - z.to(tl.float32))
        acc += tl.dot(x, w.to(x.dtype), input_precision="ieee")  # fp32 x: no TF32 rounding
    y = y_ptr + offs_m[:, None] * N + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])
    else:
        tl.atomic_add(y, acc, mask=mm[:, None] & mn[None, :])


@triton.jit
def _half_at(ptr):
    """The little-endian float16 at the two bytes ``ptr`` (a block of pointers), as float32."""
    lo = tl.load(ptr).to(tl.uint16)
    hi = tl.load(ptr + 1).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _dequant_q8_0(raw_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr):
    b = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    mb = b < n_blocks
    j = tl.arange(0, 32)
    base = b * 34
    d = _half_at(raw_ptr + tl.where(mb, base, 0))
    q = tl.load(raw_ptr + base[:, None] + 2 + j[None, :], mask=mb[:, None], other=0)
    v = d[:, None] * q.to(tl.int8, bitcast=True).to(tl.float32)
    tl.store(out_ptr + b[:, None] * 32 + j[None, :], v.to(out_ptr.dtype.element_ty), mb[:, None])


@triton.jit
def _dequant_q4_0(raw_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr):
    b = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    mb = b < n_blocks
    j = tl.arange(0, 32)
    base = b * 18
    d = _half_at(raw_ptr + tl.where(mb, base, 0))
    byte = tl.load(raw_ptr + base[:, None] + 2 + (j % 16)[None, :], mask=mb[:, None], other=0)
    q = (byte.to(tl.int32) >> (j // 16 * 4)[None, :]) & 0xF
    v = d[:, None] * (q - 8).to(tl.float32)
    tl.store(out_ptr + b[:, None] * 32 + j[None, :], v.to(out_ptr.dtype.element_ty), mb[:, None])


@triton.jit
def _dequant_q4_k(raw_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr):
    b = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    mb = b < n_blocks
    e = tl.arange(0, 256)
    i = e // 32  # sub-block, 0..7
    base = tl.where(mb, b * 144, 0)
    d = _half_at(raw_ptr + base)
    dmin = _half_at(raw_ptr + base + 2)
    sp = raw_ptr + base[:, None] + 4
    lo = i < 4
    a = tl.load(sp + tl.where(lo, i, i - 4)[None, :]).to(tl.int32)  # scales[i] or scales[i-4]
    c = tl.load(sp + (i + 4)[None, :]).to(tl.int32)  # scales[i+4]
    h = tl.load(sp + tl.where(lo, i + 4, i)[None, :]).to(tl.int32)  # mins' high bits source
    sc = tl.where(lo[None, :], a & 63, (c & 0xF) | ((a >> 6) << 4))
    m = tl.where(lo[None, :], h & 63, (c >> 4) | ((h >> 6) << 4))
    byte = tl.load(raw_ptr + base[:, None] + 16 + (32 * (i // 2) + e % 32)[None, :])
    q = (byte.to(tl.int32) >> ((i % 2) * 4)[None, :]) & 0xF
    scale = d[:, None] * sc.to(tl.float32)
    offset = dmin[:, None] * m.to(tl.float32)
    v = scale * q.to(tl.float32) - offset
    tl.store(out_ptr + b[:, None] * 256 + e[None, :], v.to(out_ptr.dtype.element_ty), mb[:, None])


_GGUF_KERNELS = {"Q8_0": _dequant_q8_0, "Q4_0": _dequant_q4_0, "Q4_K": _dequant_q4_k}


def _tile(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(n)))


def _output(out, shape, dtype, device) -> torch.Tensor:
    """``out`` if given (tests pass one poisoned with NaN), else a fresh tensor."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous tensor of shape {tuple(shape)}")
    return out


def dequant_gptq(qweight, qzeros, scales, g_idx, bits: int, dtype=torch.float16, out=None):
    K, N = qweight.shape[0] * (32 // bits), qweight.shape[1]
    out = _output(out, (K, N), dtype, qweight.device)
    bk, bn = _tile(K, 32), _tile(N, 128)
    grid = (triton.cdiv(K, bk), triton.cdiv(N, bn))
    _dequant_gptq[grid](qweight, qzeros, scales, g_idx, out, K, N, bits, bk, bn)
    return out


def dequant_awq(qweight, qzeros, scales, group_size: int, dtype=torch.float16, out=None):
    K, N = qweight.shape[0], qweight.shape[1] * 8
    out = _output(out, (K, N), dtype, qweight.device)
    slots = torch.tensor(AWQ_SLOT, dtype=torch.int32, device=qweight.device)
    bk, bn = _tile(K, 32), _tile(N, 128)
    grid = (triton.cdiv(K, bk), triton.cdiv(N, bn))
    _dequant_awq[grid](qweight, qzeros, scales, slots, out, K, N, group_size, bk, bn)
    return out


def matmul_gptq(x, qweight, qzeros, scales, g_idx, bits: int, split_k: int | None = None, out=None):
    """``x @ W`` for ``x`` of shape ``(M, K)`` (fp16 / bf16 / fp32), ``W`` in the GPTQ layout.
    ``out`` (same dtype as ``x``) is written only without split-K."""
    M, K = x.shape
    N = qweight.shape[1]
    x = x.contiguous()
    bm = 16 if M <= 16 else (32 if M <= 32 else 64)
    bn, bk = _tile(N, 64), _tile(K, 64)
    if split_k is None:  # enough programs along K to cover the GPU when M is small
        split_k = max(1, min(16, triton.cdiv(K, bk) // 4)) if M <= 16 else 1
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), split_k)
    if split_k == 1:
        y = _output(out, (M, N), x.dtype, x.device)
    else:
        y = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    _matmul_gptq[grid](x, qweight, qzeros, scales, g_idx, y, M, N, K, bits, bm, bn, bk, split_k)
    return y if split_k == 1 else y.to(x.dtype)


def dequant_gguf(raw: torch.Tensor, gguf_type: str, dtype=torch.float16, out=None):
    values, size = GGUF_BLOCKS[gguf_type]
    if raw.numel() % size:
        raise ValueError(f"{raw.numel()} bytes is not a whole number of {gguf_type} blocks")
    n_blocks = raw.numel() // size
    out = _output(out, (n_blocks * values,), dtype, raw.device)
    blocks = 8 if values == 256 else 32
    grid = (triton.cdiv(n_blocks, blocks),)
    _GGUF_KERNELS[gguf_type][grid](raw, out, n_blocks, blocks, enable_fp_fusion=False)
    return out
