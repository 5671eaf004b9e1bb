"""Triton kernels: GPTQ / AWQ dequantization, a fused W4A16 GPTQ matmul, GGUF block dequantization.

Imported only when Triton is installed (`quantlab.kernels` imports this module lazily). On a GPU
they compile for it; on a CPU they run in Triton's interpreter (``TRITON_INTERPRET=1`` set before
Triton is imported), which is how the tests check them here. The layouts and the arithmetic they
must reproduce bit for bit are in `quantlab.kernels.reference`.

- ``_dequant_gptq``: one program per ``(BLOCK_K, BLOCK_N)`` tile of the ``(K, N)`` output; each
  int32 word of the tile is loaded once and its ``32 / bits`` fields stored as ``32 / bits`` row
  slices (rows ``PER * r + j``). Without act-order (``GROUP`` > 0: ``g_idx[k] == k // GROUP`` and
  the tile inside one group) one row of scales and zeros serves the tile; otherwise each row's
  group is read from ``g_idx``. ``scale * (code - zero)`` in fp32, one rounding on store.
- ``_dequant_awq``: AWQ's interleaved nibbles (4-bit, consecutive groups), one element at a time.
- ``_matmul_gptq``: ``y = x @ W`` for ``M`` rows of activations; the tile of ``W`` is dequantized
  in registers (never written to memory), slice by slice as above, and fed to ``tl.dot`` with the
  matching columns of ``x`` (or, in the GEMV form for one row, multiplied and summed). For small
  ``M`` the reduction over ``K`` is split over ``split_k`` programs that add into an fp32 output
  with atomics, so a batch-1 GEMV still fills the GPU. Tiles: `matmul_config` (measured on an
  H200, docs/KERNELS.md).
- ``_dequant_q8_0`` / ``_dequant_q4_0`` / ``_dequant_q4_k``: GGUF blocks read as bytes (the fp16
  block scales rebuilt from two bytes), ``BLOCKS`` blocks per program. Floating-point contraction
  (``a * b - c`` into one FMA) is switched off so the results equal ``gguf``'s numpy arithmetic.
"""

from __future__ import annotations

import functools
import weakref

import torch
import triton
import triton.language as tl

from quantlab.kernels.reference import AWQ_SLOT, GGUF_BLOCKS

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _dequant_gptq(
    qw_ptr, qz_ptr, sc_ptr, g_ptr, out_ptr, K, N,
    BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    ROWS: tl.constexpr = BLOCK_K // PER  # packed rows per tile, each word loaded once
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mr, mn = rows < K // PER, offs_n < N
    mask = mr[:, None] & mn[None, :]
    zshift = (offs_n % PER) * BITS
    words = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=mask, other=0)
    if GROUP > 0:  # g_idx = k // GROUP and the tile lies in one group: one row of scales/zeros
        g0 = tl.program_id(0) * BLOCK_K // GROUP
        z0 = (tl.load(qz_ptr + g0 * (N // PER) + offs_n // PER, mask=mn, other=0) >> zshift) & MASK
        s0 = tl.load(sc_ptr + g0 * N + offs_n, mask=mn, other=0.0).to(tl.float32)
    for j in tl.static_range(PER):  # rows k = PER * row + j: field j of each word
        offs_k = rows * PER + j
        q = (words >> (j * BITS)) & MASK
        if GROUP > 0:
            z = z0[None, :]
            s = s0[None, :]
        else:
            g = tl.load(g_ptr + offs_k, mask=mr, other=0)
            zw = tl.load(
                qz_ptr + g[:, None] * (N // PER) + (offs_n // PER)[None, :], mask=mask, other=0
            )
            z = (zw >> zshift[None, :]) & MASK
            s = tl.load(sc_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
            s = s.to(tl.float32)
        w = s * (q - z).to(tl.float32)
        out = out_ptr + offs_k[:, None] * N + offs_n[None, :]
        tl.store(out, w.to(out_ptr.dtype.element_ty), mask)


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
    x_ptr, qw_ptr, qz_ptr, sc_ptr, g_ptr, y_ptr, M, N, K, split_k,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr, GEMV: tl.constexpr, ATOMIC: tl.constexpr, LOWP: tl.constexpr,
):  # fmt: skip
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    ROWS: tl.constexpr = BLOCK_K // PER  # packed rows per K tile, each word loaded once
    XT = x_ptr.dtype.element_ty
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, ROWS)
    mn = offs_n < N
    zshift = (offs_n % PER) * BITS
    if GEMV:  # one row of x per program: products summed over K, no tl.dot padding to 16 rows
        m = tl.program_id(0)
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)  # reduced over rows once, at the end
    else:
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        mm = offs_m < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(tl.program_id(2) * BLOCK_K, K, BLOCK_K * split_k):
        rows = k0 // PER + offs_r
        mr = rows < K // PER
        mask = mr[:, None] & mn[None, :]
        words = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=mask, other=0)
        if GROUP > 0:  # g_idx = k // GROUP and the tile lies in one group
            g0 = k0 // GROUP
            z0 = (
                tl.load(qz_ptr + g0 * (N // PER) + offs_n // PER, mask=mn, other=0) >> zshift
            ) & MASK
            s0 = tl.load(sc_ptr + g0 * N + offs_n, mask=mn, other=0.0)
        # K tile = PER slices: slice j holds rows k = PER * row + j (field j of each word), so the
        # matching columns of x are read with stride PER and no word is unpacked twice
        for j in tl.static_range(PER):
            offs_k = rows * PER + j
            q = (words >> (j * BITS)) & MASK
            if GROUP > 0:
                z = z0[None, :]
                s = s0[None, :]
            else:
                g = tl.load(g_ptr + offs_k, mask=mr, other=0)
                zw = tl.load(
                    qz_ptr + g[:, None] * (N // PER) + (offs_n // PER)[None, :], mask=mask, other=0
                )
                z = (zw >> zshift[None, :]) & MASK
                s = tl.load(sc_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
            if LOWP:  # noqa: SIM108 - scales in x dtype: (q - z) exact there, rounded once as in fp32
                w = (q - z).to(XT) * s
            else:
                w = (s.to(tl.float32) * (q - z).to(tl.float32)).to(XT)
            if GEMV:
                x = tl.load(x_ptr + m * K + offs_k, mask=mr, other=0.0)
                acc += x.to(tl.float32)[:, None] * w.to(tl.float32)
            else:
                xm = mm[:, None] & mr[None, :]
                x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=xm, other=0.0)
                acc += tl.dot(x, w, input_precision="ieee")  # fp32 x: no TF32 rounding
    if GEMV:
        acc = tl.sum(acc, axis=0)
        y = y_ptr + m * N + offs_n
        ymask = mn
    else:
        y = y_ptr + offs_m[:, None] * N + offs_n[None, :]
        ymask = mm[:, None] & mn[None, :]
    if ATOMIC:
        tl.atomic_add(y, acc, mask=ymask)
    else:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=ymask)


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


_NATURAL: dict[int, tuple] = {}


def natural_group(g_idx: torch.Tensor) -> int:
    """``G`` when ``g_idx[k] == k // G`` for every ``k`` (no act-order), else 0. Computed once
    per tensor (one device-to-host copy) and remembered while the tensor lives and its version
    counter is unchanged (in-place torch writes bump it; writes through ``.data`` or shared numpy
    memory do not, and are not seen), so a layer's kernels read one row of scales and zeros per
    tile instead of one per element. Inference-mode tensors have no version counter: computed
    every call."""
    cacheable = not g_idx.is_inference()
    key = id(g_idx)
    hit = _NATURAL.get(key) if cacheable else None
    if hit is not None and hit[0]() is g_idx and hit[1] == g_idx._version:
        return hit[2]
    g = g_idx.to("cpu", torch.int64)
    K = len(g)
    ones = (g == 1).nonzero()
    G = int(ones[0]) if len(ones) else K
    G = G if G > 0 and torch.equal(g, torch.arange(K) // G) else 0
    if cacheable:
        ref = weakref.ref(g_idx, lambda _: _NATURAL.pop(key, None))
        _NATURAL[key] = (ref, g_idx._version, G)
    return G


def _group(g_idx, block_k: int) -> int:
    """The GROUP constexpr: the group size when every ``block_k`` tile lies in one group."""
    G = natural_group(g_idx)
    return G if G and G % block_k == 0 else 0


def dequant_gptq(qweight, qzeros, scales, g_idx, bits: int, dtype=torch.float16, out=None):
    K, N = qweight.shape[0] * (32 // bits), qweight.shape[1]
    out = _output(out, (K, N), dtype, qweight.device)
    G = natural_group(g_idx)
    bk, bn = (128 if G and G % 128 == 0 else 32), _tile(N, 128)
    grid = (triton.cdiv(K, bk), triton.cdiv(N, bn))
    group = _group(g_idx, bk)
    _dequant_gptq[grid](qweight, qzeros, scales, g_idx, out, K, N, bits, bk, bn, group)
    return out


@functools.cache
def _awq_slots(device: torch.device) -> torch.Tensor:
    """AWQ's nibble order on ``device``, made once (not inside a CUDA graph capture)."""
    return torch.tensor(AWQ_SLOT, dtype=torch.int32, device=device)


def dequant_awq(qweight, qzeros, scales, group_size: int, dtype=torch.float16, out=None):
    K, N = qweight.shape[0], qweight.shape[1] * 8
    out = _output(out, (K, N), dtype, qweight.device)
    slots = _awq_slots(qweight.device)
    bk, bn = _tile(K, 32), _tile(N, 128)
    grid = (triton.cdiv(K, bk), triton.cdiv(N, bn))
    _dequant_awq[grid](qweight, qzeros, scales, slots, out, K, N, group_size, bk, bn)
    return out


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number
    return torch.cuda.get_device_properties(device).multi_processor_count


def matmul_config(M: int, N: int, K: int, device: torch.device) -> dict:
    """Tiles for ``x @ W``, the winners of the tile sweep on an H200 (``bench/kernels.py
    --sweep``, docs/KERNELS.md): one row of ``x`` per program (a GEMV, 64 columns) for a single
    row, ``tl.dot`` on 16-row tiles of 128 or 256 columns up to 16 rows, 64-row tiles beyond; K
    tiles of 128 rows, the reduction over K split into up to 16 parts (for 64 rows only as far as
    needed for about two programs per multiprocessor)."""
    bk = _tile(K, 128)
    tiles = triton.cdiv(K, bk)
    split_k = max(1, min(16, tiles // 2))
    if M == 1:
        return dict(
            bm=1, bn=_tile(N, 64), bk=bk, split_k=split_k, gemv=True, num_warps=4, num_stages=3
        )
    if M <= 4:
        return dict(
            bm=16, bn=_tile(N, 128), bk=bk, split_k=split_k, gemv=False, num_warps=4, num_stages=3
        )
    if M <= 16:
        return dict(
            bm=16, bn=_tile(N, 256), bk=bk, split_k=split_k, gemv=False, num_warps=8, num_stages=3
        )
    bm, bn = (32 if M <= 32 else 64), _tile(N, 256)
    programs = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    split_k = max(1, min(split_k, -(-2 * _multiprocessors(device) // programs)))
    return dict(bm=bm, bn=bn, bk=bk, split_k=split_k, gemv=False, num_warps=4, num_stages=3)


def matmul_gptq(
    x, qweight, qzeros, scales, g_idx, bits: int, split_k: int | None = None, out=None, config=None
):
    """``x @ W`` for ``x`` of shape ``(M, K)`` (fp16 / bf16 / fp32), ``W`` in the GPTQ layout.
    ``out`` (same dtype as ``x``) is written only without split-K. ``config`` overrides
    `matmul_config`'s choice (keys bm, bn, bk, split_k, gemv, num_warps, num_stages: what the
    benchmark's sweep tries)."""
    M, K = x.shape
    N = qweight.shape[1]
    x = x.contiguous()
    cfg = matmul_config(M, N, K, x.device)
    cfg.update(config or {})
    if split_k is not None:
        cfg["split_k"] = split_k
    per = 32 // bits
    # tl.dot needs 16 rows of packed words per K tile; a GEMV one
    bk = max(cfg["bk"], per if cfg["gemv"] else 16 * per)
    bm = cfg["bm"] if cfg["gemv"] else max(16, cfg["bm"])  # tl.dot needs 16 rows of x
    bn, split = cfg["bn"], cfg["split_k"]
    grid = (M if cfg["gemv"] else triton.cdiv(M, bm), triton.cdiv(N, bn), split)
    if split == 1:
        y = _output(out, (M, N), x.dtype, x.device)
    else:
        y = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    lowp = x.dtype in (torch.float16, torch.bfloat16) and scales.dtype == x.dtype
    _matmul_gptq[grid](
        x, qweight, qzeros, scales, g_idx, y, M, N, K, split,
        bits, bm, bn, bk, _group(g_idx, bk), cfg["gemv"], split > 1, lowp,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return y if split == 1 else y.to(x.dtype)


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
