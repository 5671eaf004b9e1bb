"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): quantize a weight column by column, spreading each column's rounding
error over the columns not yet quantized through the inverse Hessian of the layer's inputs.

Notation as in the paper and its reference code (IST-DASLab/gptq ``gptq.py``): ``W`` (out, in),
``H = 2 X^T X / n`` (in, in) from the layer inputs ``X``, ``Hinv`` the upper Cholesky factor of
``H^-1`` after damping ``H += percdamp * mean(diag H) * I``; columns are processed in blocks of
``block_size`` with lazy batch updates (Algorithm 1). Conventions that GPTQ checkpoints rely on:
- group parameters are found when a group's first column is reached, from the group's weights as
  updated so far (the reference code reads them as they were at the start of the current block,
  which is the same thing when groups start at block boundaries, e.g. group 128 / block 128);
- ``act_order`` (``desc_act``) processes columns by decreasing ``diag(H)``; groups are then formed
  in that order and ``g_idx`` maps each original column to its group, unless ``static_groups``
  fixes the groups on the original column order before any update;
- dead inputs (``diag(H) == 0``) get ``H_ii = 1`` and a zero weight column.

Linears that share an input share ``H``, so their rows are stacked and solved in one pass.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from quantlab.errors import ConfigError
from quantlab.methods.registry import register_method
from quantlab.primitives import check_bits_and_group, scale_zero
from quantlab.types import QuantizedWeight


@dataclass(frozen=True)
class GPTQConfig:
    bits: int = 4
    group_size: int = 128  # -1 = one group per output row
    # defaults: the best held-out quality that every format and kernel runs (docs/METHODS.md,
    # `bench/method_quality.py --heldout`): zero points like RTN, HQQ and AWQ; act-order (desc_act)
    # with static groups, so groups stay consecutive (no g_idx: AWQ, GGUF blocks,
    # compressed-tensors and the CPU int4 kernels hold it)
    sym: bool = False
    damp_percent: float = 0.01
    block_size: int = 128
    act_order: bool = True  # desc_act
    static_groups: bool = True
    true_sequential: bool = True  # each input group sees the previous groups already quantized
    version: int = 1

    def __post_init__(self) -> None:
        check_bits_and_group(self.bits, self.group_size)
        if not 0 < self.damp_percent < 1:
            raise ConfigError(f"damp_percent must be in (0, 1), got {self.damp_percent}")
        if self.block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {self.block_size}")


@contextmanager
def _bf16_matmul_of_bf16_values():
    """Let oneDNN multiply float32 matrices with bf16 units (CPU). Exact for inputs that are bf16
    values: products of two bf16 numbers fit in float32, and the sums stay float32."""
    backend = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if backend is None or not hasattr(backend, "fp32_precision"):
        yield
        return
    before = backend.fp32_precision
    backend.fp32_precision = "bf16"
    try:
        yield
    finally:
        backend.fp32_precision = before


def accumulate_hessian(
    H: torch.Tensor | None, n: int, x: torch.Tensor, *, exact: bool = True, chunk: int = 2048
):
    """Fold inputs ``x`` (..., in) into the running ``H = 2 X^T X / n``; returns ``(H, n)``.

    The product is float32 with float32 sums. When ``x`` is bfloat16 (``--calib-dtype
    bfloat16``) its values are multiplied on the CPU's bf16 units with the same result (each
    product of two bf16 values is exact in float32), about twice as fast. With ``exact=False``
    (search criteria only, never GPTQ's solve: the result need not be positive definite) bf16
    inputs are multiplied natively in ``chunk``-row slices whose sums are rounded to bf16 before
    the float32 total (about 1e-3 relative per entry), four times as fast as float32. Either way
    bf16 inputs are processed ``chunk`` rows at a time.
    """
    low = x.dtype == torch.bfloat16 and x.device.type == "cpu"
    x = x.reshape(-1, x.shape[-1])
    m = x.shape[0]
    if H is None:
        H = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    H.mul_(n / (n + m))
    if low and not exact:
        for i in range(0, m, chunk):
            part = x[i : i + chunk]
            H.add_((part.T @ part).float(), alpha=2 / (n + m))
        return H, n + m
    if not low:
        add_gram(H, x.float(), 2 / (n + m))
        return H, n + m
    # bf16 values widened to float32 a slice at a time into one reused buffer (a fresh float32
    # copy of all of x costs as much as the product's page faults and memory traffic)
    buf = torch.empty(min(chunk, m), x.shape[1], dtype=torch.float32, device=x.device)
    with _bf16_matmul_of_bf16_values():
        for i in range(0, m, chunk):
            part = buf[: min(chunk, m - i)]
            part.copy_(x[i : i + chunk])
            add_gram(H, part, 2 / (n + m))
    return H, n + m


def symmetric_blocks(d: int, blocks: int = 4) -> list[tuple[int, int]]:
    """``blocks`` column ranges covering ``[0, d)`` for the block-triangular products below."""
    step = max(1, math.ceil(d / blocks))
    return [(i, min(i + step, d)) for i in range(0, d, step)]


def add_gram(H: torch.Tensor, x: torch.Tensor, alpha: float) -> None:
    """``H += alpha * x^T x`` computing only the block upper triangle (5/8 of the products for 4
    blocks) and mirroring it: ``x^T x`` is symmetric, and each entry is the same dot product of
    two columns either way."""
    ranges = symmetric_blocks(H.shape[0])
    for i0, i1 in ranges:
        H[i0:i1, i0:].addmm_(x[:, i0:i1].T, x[:, i0:], alpha=alpha)
    for i0, i1 in ranges[1:]:
        H[i0:i1, :i0] = H[:i0, i0:i1].T


def inverse_cholesky_upper(H: torch.Tensor, *, release: bool = False) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), from one factorisation.

    With ``P`` the order reversal and ``P H P = L L^T``: ``H^-1 = P L^-T L^-1 P = U^T U`` for
    ``U = P L^-1 P``, which is upper triangular with a positive diagonal, hence the Cholesky
    factor (the reference code's ``cholesky(cholesky_inverse(cholesky(H)), upper=True)`` computes
    the same matrix with two more factorisations).

    ``release``: free ``H``'s memory once it is read (the caller gives it away; its other
    references then hold an empty tensor): two n x n matrices fewer alive at the peak."""
    flipped = H.flip(0, 1)
    if release:
        _release(H)
    L = torch.linalg.cholesky(flipped)
    del flipped
    inverse = lower_triangular_inverse(L)
    del L  # before the flip's copy
    return inverse.flip(0, 1)


def _release(t: torch.Tensor) -> None:
    """Free ``t``'s storage now, whoever else refers to it (they must not read it again)."""
    t.untyped_storage().resize_(0)


def lower_triangular_inverse(L: torch.Tensor, leaf: int = 128) -> torch.Tensor:
    """``L^-1`` for a lower-triangular ``L``: ``[[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1,
    C^-1]]``, the halves inverted recursively and the corner from two matrix products, down to
    ``leaf`` rows solved against the identity. About n^3/3 multiply-adds, nearly all in matrix
    products, where one triangular solve against the identity does n^3/2 at a lower rate (2.1x
    faster at n = 1536 on this machine; equal to ~5e-8 relative)."""
    out = torch.zeros_like(L)

    def invert(lo: int, hi: int) -> None:
        n = hi - lo
        if n <= leaf:
            eye = torch.eye(n, dtype=L.dtype, device=L.device)
            out[lo:hi, lo:hi] = torch.linalg.solve_triangular(L[lo:hi, lo:hi], eye, upper=False)
            return
        mid = lo + n // 2
        invert(lo, mid)
        invert(mid, hi)
        out[mid:hi, lo:mid] = -(out[mid:hi, mid:hi] @ (L[mid:hi, lo:mid] @ out[lo:mid, lo:mid]))

    invert(0, L.shape[0])
    return out


def gptq_quantize(
    W: torch.Tensor, H: torch.Tensor, cfg: GPTQConfig, *, owned: bool = False
) -> QuantizedWeight:
    """Quantize ``W`` (out, in) with the Hessian ``H`` (in, in) of its inputs. ``owned``: the
    caller gives ``W`` and ``H`` away (it will not read them again), so they are changed in place
    and freed once read instead of copied - the same result with fewer n x n matrices alive
    (at most three; 8B's down_proj: 0.8 GB each)."""
    W = W.detach().float() if owned else W.detach().clone().float()
    H = H.detach().float() if owned else H.detach().clone().float()
    out, cols = W.shape
    bits, sym = cfg.bits, cfg.sym
    gs = cfg.group_size if cfg.group_size > 0 else cols
    n_groups = math.ceil(cols / gs)
    dev = W.device  # every tensor of the solve lives where W is (the compute device)
    H = H.to(dev)
    scales = torch.zeros(out, n_groups, device=dev)
    zeros = torch.zeros(out, n_groups, device=dev)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if cfg.static_groups:
        for g in range(n_groups):
            s, z = scale_zero(W[:, g * gs : (g + 1) * gs], bits, sym)
            scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
    perm = None
    if cfg.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]

    H.diagonal().add_(cfg.damp_percent * torch.mean(torch.diag(H)))
    try:
        # H is ours (a copy, or owned; a reordered copy with act-order): freed once read
        Hinv = inverse_cholesky_upper(H, release=True)
    except torch.linalg.LinAlgError as exc:
        raise ValueError(f"Hessian is not positive definite; raise damp_percent ({exc})") from None
    del H

    # Work on transposed copies: column ``c`` of W is row ``c`` of ``Wt`` (contiguous), so the
    # per-column steps below touch contiguous memory and the error update is one rank-1 ``addr_``.
    Wt = W.T.contiguous()
    _release(W)  # ours (owned, copied or reordered) and not read again
    del W
    Qt = torch.zeros_like(Wt)
    maxq = 2**bits - 1
    # group of each column, in processing order
    if cfg.static_groups:
        source = perm if perm is not None else torch.arange(cols, device=dev)
        group_of = (source // gs).to(torch.int32)
    else:
        group_of = (torch.arange(cols, device=dev) // gs).to(torch.int32)
    static_of = group_of.tolist()
    s = z = None
    tmp = torch.empty(out, device=dev)
    for i1 in range(0, cols, cfg.block_size):
        i2 = min(i1 + cfg.block_size, cols)
        W1 = Wt[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        diag = Hinv1.diagonal().tolist()
        for i in range(i2 - i1):
            col = i1 + i
            if cfg.static_groups:
                g = static_of[col]
                s, z = scales[:, g], zeros[:, g]
            elif col % gs == 0:
                g = col // gs
                # the group's columns as updated so far (in this block, then later ones)
                group = torch.cat([W1[i : i + gs], Wt[i2 : col + gs]]).T
                s2, z2 = scale_zero(group, bits, sym)
                s, z = s2[:, 0], z2[:, 0]
                scales[:, g], zeros[:, g] = s, z
            w, q, err = W1[i], Qt[col], Err1[i]
            # q = clamp(round(w / s) + z, 0, maxq); err = (w - s * (q - z)) / Hinv[col, col]
            torch.div(w, s, out=q).round_().add_(z).clamp_(0, maxq)
            torch.sub(q, z, out=tmp).mul_(s)
            torch.sub(w, tmp, out=err).div_(diag[i])
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1)
    Q = Qt.T

    g_idx = group_of
    if perm is not None:
        invperm = torch.argsort(perm)
        Q, g_idx = Q[:, invperm], group_of[invperm]
    return QuantizedWeight(
        Q.to(torch.uint8),
        scales,
        zeros.to(torch.uint8),
        g_idx.to(torch.int32),
        bits,
        cfg.group_size,
        sym,
    )


def hessian_of(xs: list[torch.Tensor], *, exact: bool = True) -> tuple[torch.Tensor, int]:
    """``(H, n)`` of a group's input given as chunks (`BlockContext.forward` with ``chunks``):
    accumulated chunk by chunk (a GPU's case; on the CPU the chunks arrive as one tensor, summed
    in one product as always)."""
    H, n = None, 0
    for x in xs:
        H, n = accumulate_hessian(H, n, x, exact=exact)
    return H, n


def split_rows(qw: QuantizedWeight, sizes: list[int], dtypes: list) -> list[QuantizedWeight]:
    """Split a row-stacked `QuantizedWeight` back into one per linear."""
    out, start = [], 0
    for rows, dtype in zip(sizes, dtypes, strict=True):
        sl = slice(start, start + rows)
        parts = (t.clone() for t in (qw.qweight[sl], qw.scales[sl], qw.zeros[sl], qw.g_idx))
        out.append(QuantizedWeight(*parts, qw.bits, qw.group_size, qw.sym, dtype))
        start += rows
    return out


@register_method(
    "gptq",
    GPTQConfig,
    needs_calibration=True,
    description="GPTQ (Frantar et al. 2022): Hessian-based error feedback",
    per_module=True,
)
def quantize_block(ctx, config: GPTQConfig) -> None:
    def solve(group, H: torch.Tensor) -> None:
        # linears of the group with the same config are stacked and solved in one pass
        by_config: dict[GPTQConfig, list[str]] = {}
        for name in group.linears:
            by_config.setdefault(ctx.config_for(name, config), []).append(name)
        for i, (cfg, names) in enumerate(by_config.items()):
            weights = [ctx.weight(name) for name in names]
            sizes = [w.shape[0] for w in weights]
            stacked = torch.cat(weights)
            del weights  # the stacked copy is the only one the solve needs
            last = i == len(by_config) - 1  # H's last use: the solve may take it over
            try:
                with ctx.stage("solve"):
                    stacked = gptq_quantize(stacked, H if last else H.clone(), cfg, owned=True)
            except ValueError as exc:
                raise ctx.error(names[0], str(exc)) from None
            dtypes = [ctx.original_dtype(name) for name in names]
            for name, qw in zip(names, split_rows(stacked, sizes, dtypes), strict=True):
                ctx.set_quantized(name, qw)

    def hessian(group, xs) -> torch.Tensor:
        with ctx.stage("hessians"):
            H, n = hessian_of(xs)
            ctx.record_imatrix(group, torch.diag(H) * (n / 2), n)  # H = 2 X^T X / n
        return H

    if config.true_sequential:
        # one pass: each group is solved from its input just before it runs
        ctx.forward(
            on_group_input=lambda group, xs: solve(group, hessian(group, xs)),
            imatrix=False,
            chunks=True,
        )
        return
    hessians = {}
    ctx.forward(
        on_group_input=lambda g, xs: hessians.__setitem__(g, hessian(g, xs)),
        imatrix=False,
        chunks=True,
    )
    for group, H in hessians.items():
        solve(group, H)
