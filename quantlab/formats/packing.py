"""Bit packing shared by the GPTQ, AWQ and compressed-tensors layouts.

Every one of those formats packs ``bits``-bit codes into int32 words as one **little-endian bit
stream** along the packed dimension: code ``k`` occupies bits ``[k*bits, (k+1)*bits)`` of the
stream, word ``w`` holds stream bits ``[32*w, 32*w + 32)``, bit 0 of a word being its least
significant bit. For 2, 4 and 8 bits that is simply ``32/bits`` codes per word, lowest code in the
lowest bits; for 3 bits, 32 codes fill exactly 3 words and codes 10 and 21 straddle a word boundary
(AutoGPTQ's 3-bit layout). Words are stored as int32 (two's complement of the uint32 pattern).

AWQ's GEMM layout additionally interleaves 4-bit codes: within each run of 8 output columns,
nibble ``i`` of a word holds column ``AWQ_ORDER[i]`` (``[0, 2, 4, 6, 1, 3, 5, 7]``).
"""

from __future__ import annotations

import math

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def packed_length(count: int, bits: int) -> int:
    """Words needed for ``count`` codes (the stream is padded to a whole word)."""
    return -(-count * bits // 32)


_CHUNK_CODES = 1 << 21  # codes packed at once: the int64 work arrays stay ~16 MB per layer


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the last dimension of ``codes`` (integers in [0, 2**bits)) into int32 words."""
    if not 1 <= bits <= 8:
        raise ValueError(f"can only pack 1..8-bit codes, got {bits}")
    count = codes.shape[-1]
    lead = codes.shape[:-1]
    rows = codes.reshape(math.prod(lead), count)
    step = max(1, _CHUNK_CODES // max(count, 1))
    if rows.shape[0] > step:  # row by row chunks: same words, bounded temporaries
        parts = [_pack_rows(rows[i : i + step], bits) for i in range(0, rows.shape[0], step)]
        return torch.cat(parts).view(*lead, packed_length(count, bits))
    return _pack_rows(rows, bits).view(*lead, packed_length(count, bits))


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    count = codes.shape[-1]
    lead = codes.shape[:-1]
    if 32 % bits == 0:  # whole codes per word: shift each into place and add (fields are disjoint)
        per = 32 // bits
        n_words = packed_length(count, bits)
        padded = torch.zeros(*lead, n_words * per, dtype=torch.int64)
        padded[..., :count] = codes.to(torch.int64) & ((1 << bits) - 1)
        shifts = torch.arange(0, 32, bits, dtype=torch.int64)
        words = (padded.view(*lead, n_words, per) << shifts).sum(dim=-1)
        return (words - ((words >> 31) << 32)).to(torch.int32)  # uint32 pattern as int32
    blocks = -(-count // 32)
    padded = torch.zeros(*lead, blocks * 32, dtype=torch.int64)
    padded[..., :count] = codes.to(torch.int64) & ((1 << bits) - 1)
    padded = padded.view(*lead, blocks, 32)
    words = torch.zeros(*lead, blocks, bits, dtype=torch.int64)
    for k in range(32):  # 32 codes always fill exactly ``bits`` words
        word, shift = divmod(k * bits, 32)
        words[..., word] |= (padded[..., k] << shift) & 0xFFFFFFFF
        if shift + bits > 32:
            words[..., word + 1] |= padded[..., k] >> (32 - shift)
    words = words.view(*lead, blocks * bits)[..., : packed_length(count, bits)]
    return (words - ((words >> 31) << 32)).to(torch.int32)  # uint32 pattern as int32


def unpack_bits(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: ``count`` codes (int64) from the last dimension of ``words``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"can only unpack 1..8-bit codes, got {bits}")
    if words.shape[-1] != packed_length(count, bits):
        raise ValueError(
            f"{words.shape[-1]} words cannot hold exactly {count} {bits}-bit codes "
            f"(expected {packed_length(count, bits)})"
        )
    lead = words.shape[:-1]
    blocks = -(-count // 32)
    stream = torch.zeros(*lead, blocks * bits, dtype=torch.int64)
    stream[..., : words.shape[-1]] = words.to(torch.int64) & 0xFFFFFFFF
    stream = stream.view(*lead, blocks, bits)
    codes = torch.empty(*lead, blocks, 32, dtype=torch.int64)
    mask = (1 << bits) - 1
    for k in range(32):
        word, shift = divmod(k * bits, 32)
        value = stream[..., word] >> shift
        if shift + bits > 32:
            value = value | (stream[..., word + 1] << (32 - shift))
        codes[..., k] = value & mask
    return codes.view(*lead, blocks * 32)[..., :count]


def awq_interleave(codes: torch.Tensor) -> torch.Tensor:
    """Reorder the last dimension (a multiple of 8) into AWQ's packing order."""
    lead = codes.shape[:-1]
    return codes.reshape(*lead, -1, 8)[..., list(AWQ_ORDER)].reshape(*lead, -1)


def awq_deinterleave(codes: torch.Tensor) -> torch.Tensor:
    lead = codes.shape[:-1]
    return codes.reshape(*lead, -1, 8)[..., list(AWQ_REVERSE_ORDER)].reshape(*lead, -1)
