"""The CPU runtime of quantized linears: PyTorch's own int4 / int8 CPU matmuls.

PyTorch ships CPU kernels for weight-only quantized matmuls (the ones torchao's CPU int4 path
uses): ``aten._convert_weight_to_int4pack_for_cpu`` packs 4-bit codes ``(N, K)`` into its blocked
layout once, and ``aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)``
computes ``x @ W.T`` with ``W = (q - 8) * scale + zero`` per group of ``group`` input columns
(``group`` in 32/64/128/256, ``K`` a multiple of it); ``aten._weight_int8pack_mm(x, w, scales)``
does ``x @ (w * scale).T`` for int8 ``w`` with one scale per output row.

A quantlab weight ``scale * (q - z)`` (integer zero ``z``) maps onto that exactly: the kernel's
``zero`` is ``(8 - z) * scale``, and in float32 ``(q - 8) * scale + (8 - z) * scale`` equals
``(q - z) * scale`` bit for bit whenever ``scale`` is a float16 value (as in every GPTQ, AWQ and
compressed-tensors checkpoint): both products and their sum are exact in float32. What can be
represented exactly (`int4_refusal` / `int8_refusal` say why not otherwise):
- 4 bits, any zero points, ``N`` a multiple of 16, groups whose size is a multiple of 32 (or
  one group per row) with ``K`` a multiple of the kernel group: a group of 128 on a 576-wide
  layer runs as groups of 64 (its last group, 64 wide, too); act-order (``g_idx``) is applied
  once by permuting the input columns into group order (exllama's trick), and ``x`` the same way
  at run time;
- 8 bits, one group per row, symmetric (zero 128): ``w = q - 128`` as int8.
Everything else (2/3-bit codes, groups of 16, 8-bit with groups or zero points) stays on the
reference path. Activations in float32 are exact but slow (the kernels' float32 path is scalar);
in bfloat16 (the fast path) or float16 the scales and zeros are rounded to the activation dtype.
"""

from __future__ import annotations

import torch

from quantlab.types import QuantizedWeight

INT4_GROUPS = (256, 128, 64, 32)  # the group sizes the int4 CPU kernel takes, largest first
INNER_K_TILES = 2  # the packing's tile parameter (the CPU kernel accepts 1, 2, 4 or 8)


def available() -> str | None:
    """Why this torch has no CPU int4/int8 kernels, or ``None`` when it has them."""
    ops = ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")
    missing = [op for op in ops + ("_weight_int8pack_mm",) if not hasattr(torch.ops.aten, op)]
    if missing:
        return f"this torch {torch.__version__} lacks {', '.join(missing)}"
    return None


def _layer_group(qw: QuantizedWeight) -> int:
    return qw.group_size if qw.group_size > 0 else qw.shape[1]


def kernel_group(qw: QuantizedWeight) -> int | None:
    """The int4 kernel's group size that represents ``qw``'s groups exactly: it divides the
    layer's group size (every kernel group lies in one layer group) and ``K``."""
    size, k = _layer_group(qw), qw.shape[1]
    for g in INT4_GROUPS:
        if size % g == 0 and k % g == 0:
            return g
    return None


def _group_order(qw: QuantizedWeight) -> torch.Tensor | None:
    """With act-order: the column permutation that puts ``g_idx`` in natural group order, if the
    groups then have exactly the natural sizes; ``None`` when no permutation is needed."""
    if not qw.act_order:
        return None
    order = torch.argsort(qw.g_idx.cpu().long(), stable=True)
    natural = torch.arange(qw.shape[1]) // _layer_group(qw)
    if not torch.equal(qw.g_idx.cpu().long()[order], natural):
        return torch.empty(0, dtype=torch.long)  # groups of other sizes: not representable
    return order


def int4_refusal(qw: QuantizedWeight) -> str | None:
    """Why ``qw`` cannot run exactly through the int4 CPU kernel, or ``None``."""
    if qw.bits != 4:
        return f"the int4 CPU kernel takes 4-bit codes, not {qw.bits}-bit"
    if qw.shape[0] % 16:
        return f"the int4 CPU kernel needs a multiple of 16 output features, not {qw.shape[0]}"
    if kernel_group(qw) is None:
        return (
            f"the int4 CPU kernel needs groups of a multiple of 32 dividing the width "
            f"(group size {qw.group_size}, width {qw.shape[1]})"
        )
    order = _group_order(qw)
    if order is not None and order.numel() == 0:
        return "act-order groups of unequal sizes cannot be permuted into the kernel's groups"
    return None


def int8_refusal(qw: QuantizedWeight) -> str | None:
    """Why ``qw`` cannot run exactly through the int8 CPU kernel, or ``None``."""
    if qw.bits != 8:
        return f"the int8 CPU kernel takes 8-bit codes, not {qw.bits}-bit"
    if qw.n_groups != 1:
        return "the int8 CPU kernel has one scale per output row (no groups)"
    if not bool((qw.zeros == 128).all()):
        return "the int8 CPU kernel is symmetric (zero point 128)"
    return None


def refusal(qw: QuantizedWeight) -> str | None:
    """Why neither CPU kernel represents ``qw`` exactly, or ``None``."""
    why = available()
    if why:
        return why
    if qw.bits == 8:
        return int8_refusal(qw)
    return int4_refusal(qw)


def pack(qw: QuantizedWeight) -> tuple[str, dict[str, torch.Tensor]]:
    """``qw`` as the tensors of a CPU kernel: ``("int4pack", {packed, scales_zeros, perm})`` or
    ``("int8pack", {weight_int8, scales})``. Call `refusal` first."""
    if qw.bits == 8:
        weight = (qw.qweight.to(torch.int16) - 128).to(torch.int8).contiguous()
        return "int8pack", {"weight_int8": weight, "scales": qw.scales[:, 0].float().contiguous()}
    order = _group_order(qw)
    codes = qw.qweight if order is None else qw.qweight[:, order]
    g = kernel_group(qw)
    k = qw.shape[1]
    layer_group = torch.arange(0, k, g) // _layer_group(qw)  # the layer group of each block
    scales = qw.scales.float()[:, layer_group].t()  # (K / g, N)
    zeros = qw.zeros.float()[:, layer_group].t()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        codes.to(torch.int32).contiguous(), INNER_K_TILES
    )
    tensors = {
        "packed": packed,
        "scales_zeros": torch.stack([scales, (8.0 - zeros) * scales], dim=-1).contiguous(),
        "perm": (order if order is not None else torch.empty(0, dtype=torch.long)).to(torch.int32),
    }
    return "int4pack", tensors


def group_of(tensors: dict[str, torch.Tensor], k: int) -> int:
    """The kernel group size of packed int4 tensors for a layer of width ``k``."""
    return k // tensors["scales_zeros"].shape[0]


def matmul_int4pack(x, packed, scales_zeros, perm, group: int) -> torch.Tensor:
    """``x @ W.T`` (``x``: (M, K)) through the int4 CPU kernel."""
    if perm.numel():
        x = x.index_select(-1, perm)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.contiguous(), packed, group, scales_zeros.to(x.dtype)
    )


def matmul_int8pack(x, weight_int8, scales) -> torch.Tensor:
    """``x @ W.T`` (``x``: (M, K)) through the int8 CPU kernel."""
    return torch.ops.aten._weight_int8pack_mm(x.contiguous(), weight_int8, scales.to(x.dtype))


def unpack(
    kind: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int], **fields
) -> QuantizedWeight:
    """The `QuantizedWeight` a `pack` came from (codes, scales, zeros and ``g_idx`` exactly).
    ``fields``: bits, group_size, sym, dtype."""
    n, k = shape
    if kind == "int8pack":
        codes = (tensors["weight_int8"].to(torch.int16) + 128).to(torch.uint8)
        zeros = torch.full((n, 1), 128, dtype=torch.uint8)
        g_idx = torch.zeros(k, dtype=torch.int32)
        return QuantizedWeight(codes, tensors["scales"].float()[:, None], zeros, g_idx, **fields)
    codes = unpack_codes(tensors["packed"], n, k)
    perm = tensors["perm"].long()
    size = fields["group_size"] if fields["group_size"] > 0 else k
    natural = (torch.arange(k) // size).to(torch.int32)
    g_idx = natural
    if perm.numel():  # undo the act-order permutation
        restored = torch.empty_like(codes)
        restored[:, perm] = codes
        codes = restored
        g_idx = torch.empty_like(natural)
        g_idx[perm] = natural
    block = k // tensors["scales_zeros"].shape[0]
    first = torch.arange(0, k, size) // block  # the first kernel block of each layer group
    sz = tensors["scales_zeros"][first]  # (groups, N, 2)
    scales = sz[..., 0].t().contiguous()
    zeros = torch.round(8.0 - sz[..., 1].t() / torch.where(scales == 0, 1.0, scales))
    zeros = torch.where(scales == 0, 8.0, zeros).to(torch.uint8)
    return QuantizedWeight(codes, scales, zeros, g_idx, **fields)


def unpack_codes(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The (N, K) codes in a packed int4 tensor. The blocked layout is PyTorch's own, so it is
    found by packing the digits of each position's index (base 16) and reading where they land."""
    index = torch.arange(n * k, dtype=torch.int64)
    where = torch.zeros(n * k, dtype=torch.int64)
    digits, shift = (n * k - 1).bit_length() // 4 + 1, 0
    for _ in range(digits):
        digit = ((index >> shift) & 15).to(torch.int32).view(n, k)
        landed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit, INNER_K_TILES)
        where |= _nibbles(landed).to(torch.int64) << shift
        shift += 4
    codes = torch.empty(n * k, dtype=torch.uint8)
    codes[where] = _nibbles(packed)
    return codes.view(n, k)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Each byte's low then high nibble, flattened (N * K values)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1)
