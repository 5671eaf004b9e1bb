"""AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration"): protect the weights that meet large activations by scaling input channels before
quantization, then clip each group's range.

For each set of linears that read the same input ``X`` (an `InputGroup`), the paper's Eq. 4
picks per-channel scales ``s = mean|X|^alpha`` (normalised so that ``sqrt(max(s) min(s)) = 1``),
alpha on a grid of ``n_grid`` points in [0, 1), minimising the output error of the group's linears

    L(s) = sum_linears || Q(W diag(s)) diag(s)^-1 X - W X ||^2 = sum tr(dW H dW^T),
    H = 2 X^T X / n,

which quantlab evaluates from the layer's Hessian ``H`` (d x d) instead of re-running the layers
on every token (on a CPU with bf16 units the grid is first screened with bf16 products and the
float32 criterion decides among the ``screen`` best). ``s`` is folded into the producer of ``X``
(a norm's weight, or the rows of the previous linear) and into the linears' columns, so the
unquantized function is unchanged. Then, as llm-awq's ``auto_clip``, each (row, group) gets the
clipping range ``max|w| * (1 - i / n_grid)``, ``i < max_shrink * n_grid``, minimising that
group's output error (the group's diagonal block of ``H``); q_proj and k_proj are not clipped
(``ArchSpec.no_clip``). Quantization is asymmetric RTN.

The searched scales and clips are returned as data (`AWQSearch`) so they can be saved and replayed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from quantlab.devices import cpu_has_bf16
from quantlab.errors import ConfigError
from quantlab.methods.registry import register_method
from quantlab.primitives import check_bits_and_group, fake_quantize, quantize_rtn


@dataclass(frozen=True)
class AWQConfig:
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    n_grid: int = 20
    clip: bool = True
    max_shrink: float = 0.5
    # rank candidates with bf16 arithmetic on CPU (`output_error`, `accumulate_hessian`): 1.3x
    # faster on SmolLM2 but its perplexity came out 1.5% worse, so off by default
    fast_search: bool = False
    # screen the grid with bf16 products on CPU, then let the float32 criterion choose among
    # the ``screen`` best (0: float32 for every candidate)
    screen: int = 3
    version: int = 1

    def __post_init__(self) -> None:
        check_bits_and_group(self.bits, self.group_size)
        if self.n_grid < 1:
            raise ConfigError(f"n_grid must be >= 1, got {self.n_grid}")
        if self.screen < 0:
            raise ConfigError(f"screen must be >= 0, got {self.screen}")
        if not 0 <= self.max_shrink < 1:
            raise ConfigError(f"max_shrink must be in [0, 1), got {self.max_shrink}")


def output_error(dW: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``tr(dW H dW^T)``: the summed squared output error of a weight error ``dW`` (out, in).

    A bfloat16 ``H`` (the search's screening and fast mode) multiplies in bf16 (8 significant
    bits, float32 sums inside the product): several times faster on CPUs with bf16 units, and
    precise enough to rank search candidates; the final sum is float32 either way."""
    from quantlab.methods.gptq import symmetric_blocks

    # H is symmetric: sum over the block upper triangle, off-diagonal blocks twice (5/8 of the
    # full product's multiplications for 4 blocks)
    low = dW.to(H.dtype)
    total = torch.zeros((), dtype=torch.float32, device=dW.device)
    for i0, i1 in symmetric_blocks(H.shape[0]):
        product = (low[:, i0:i1] @ H[i0:i1, i0:]).float()
        width = i1 - i0
        total += torch.sum(product[:, :width] * dW[:, i0:i1])
        total += 2 * torch.sum(product[:, width:] * dW[:, i1:])
    return total


def mean_abs(x: torch.Tensor | list[torch.Tensor], chunk: int = 2048) -> torch.Tensor:
    """Mean of ``|x|`` per channel (last dimension) in float32, ``chunk`` rows at a time through
    one reused buffer (10x faster on CPU than widening all of a bf16 ``x`` at once). ``x`` may
    be a list of chunks (`BlockContext.forward` with ``chunks``)."""
    xs = x if isinstance(x, list) else [x]
    total, rows = None, 0
    for part_x in xs:
        flat = part_x.reshape(-1, part_x.shape[-1])
        if total is None:
            total = torch.zeros(flat.shape[1], dtype=torch.float32, device=flat.device)
        buf = torch.empty(min(chunk, flat.shape[0]), flat.shape[1], device=flat.device)
        for i in range(0, flat.shape[0], chunk):
            part = buf[: min(chunk, flat.shape[0] - i)]
            total += part.copy_(flat[i : i + chunk]).abs_().sum(dim=0)
        rows += flat.shape[0]
    return total / rows


def search_scale(
    weights: list[torch.Tensor], H: torch.Tensor, act_mean: torch.Tensor, cfg: AWQConfig
) -> tuple[torch.Tensor, float]:
    """The per-input-channel scale ``s`` (in,) minimising the group's output error, and alpha."""
    W = torch.cat(weights)  # the group's linears share H: one product for all their rows
    # bf16 screening pays only where the CPU has bf16 units; elsewhere float32 throughout (the
    # exact criterion for every candidate: what screening approximates)
    low = H.device.type == "cpu" and cpu_has_bf16() and (cfg.fast_search or cfg.screen > 0)
    H_search = H.bfloat16() if low else H

    def candidate(step: int):
        alpha = step / cfg.n_grid
        s = act_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        return fake_quantize(W * s, cfg.bits, cfg.group_size, cfg.sym) / s - W, s, alpha

    losses = [float(output_error(candidate(step)[0], H_search)) for step in range(cfg.n_grid)]
    order = sorted(range(cfg.n_grid), key=losses.__getitem__)
    if low and not cfg.fast_search:  # the float32 criterion decides among the best screened
        best = min(order[: cfg.screen], key=lambda step: float(output_error(candidate(step)[0], H)))
    else:
        best = order[0]
    _, s, alpha = candidate(best)
    return s, alpha


def _grouped(W: torch.Tensor, H: torch.Tensor, size: int):
    """W as (out, G, size) and H's diagonal blocks as (G, size, size), zero-padded."""
    out, cols = W.shape
    groups = math.ceil(cols / size)
    pad = groups * size - cols
    Wp = torch.nn.functional.pad(W, (0, pad)).reshape(out, groups, size)
    Hp = torch.nn.functional.pad(H, (0, pad, 0, pad))
    blocks = torch.stack(
        [Hp[g * size : (g + 1) * size, g * size : (g + 1) * size] for g in range(groups)]
    )
    return Wp, blocks, pad


def search_clip(W: torch.Tensor, H: torch.Tensor, cfg: AWQConfig) -> torch.Tensor:
    """Per (row, group) clipping bound ``max|w|`` (out, G) minimising each group's output error."""
    size = cfg.group_size if cfg.group_size > 0 else W.shape[1]
    Wg, Hg, pad = _grouped(W, H, size)
    org_max = Wg.abs().amax(dim=2)  # (out, G)
    best_err = torch.full_like(org_max, math.inf)
    best_max = org_max.clone()
    for step in range(int(cfg.max_shrink * cfg.n_grid)):
        max_val = org_max * (1 - step / cfg.n_grid)
        clipped = torch.maximum(
            torch.minimum(W, _expand(max_val, W, size)), -_expand(max_val, W, size)
        )
        dW = fake_quantize(clipped, cfg.bits, cfg.group_size, cfg.sym) - W
        dWg = torch.nn.functional.pad(dW, (0, pad)).reshape(Wg.shape)
        err = torch.einsum("ogi,gij,ogj->og", dWg, Hg, dWg)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, max_val, best_max)
    return best_max


def _expand(per_group: torch.Tensor, W: torch.Tensor, size: int) -> torch.Tensor:
    """(out, G) -> (out, in): each column gets its group's value."""
    return per_group.repeat_interleave(size, dim=1)[:, : W.shape[1]]


def quantize_clipped(W: torch.Tensor, max_val: torch.Tensor | None, cfg: AWQConfig, dtype):
    size = cfg.group_size if cfg.group_size > 0 else W.shape[1]
    if max_val is not None:
        bound = _expand(max_val, W, size)
        W = torch.maximum(torch.minimum(W, bound), -bound)
    return dataclasses.replace(quantize_rtn(W, cfg.bits, cfg.group_size, cfg.sym), dtype=dtype)


@dataclass(frozen=True)
class AWQSearch:
    """What the search found for one block, replayable: scale per input group, clip per linear."""

    scales: dict[str, torch.Tensor]  # input group's prev_op -> (in,) scale folded into it
    alphas: dict[str, float]
    clips: dict[str, torch.Tensor]  # linear -> (out, G) clipping bound


@register_method(
    "awq",
    AWQConfig,
    needs_calibration=True,
    description="AWQ (Lin et al. 2023): activation-aware scales and clipping",
)
def quantize_block(ctx, config: AWQConfig) -> None:
    stats: dict = {}

    def collect(group, xs) -> None:
        from quantlab.methods.gptq import hessian_of

        # the Hessian from x as it is (bf16 calibration: bf16 units, float32 sums)
        with ctx.stage("hessians"):
            act_mean = mean_abs(xs)
            H, n = hessian_of(xs, exact=not config.fast_search)
            if not config.fast_search:  # the exact H's diagonal is the importance matrix
                ctx.record_imatrix(group, torch.diag(H) * (n / 2), n)  # H = 2 X^T X / n
        stats[group] = (H, act_mean)

    ctx.forward(on_group_input=collect, imatrix=config.fast_search, chunks=True)
    scales, alphas, clips = {}, {}, {}
    hessians = {}
    for group, (H, act_mean) in stats.items():
        if ctx.can_fold(group):
            weights = [ctx.weight(n) for n in group.linears]
            with ctx.stage("search"):
                s, alpha = search_scale(weights, H, act_mean, config)
            ctx.fold_scale(group, s)
            H = H / s[:, None] / s[None, :]
            scales[group.prev_op], alphas[group.prev_op] = s, alpha
        for name in group.linears:
            hessians[name] = H
    for name in ctx.linear_names:
        W = ctx.weight(name)
        clip = None
        with ctx.stage("solve"):
            if config.clip and name not in ctx.arch.no_clip:
                clip = clips[name] = search_clip(W, hessians[name], config)
            qw = quantize_clipped(W, clip, config, ctx.original_dtype(name))
        ctx.set_quantized(name, qw)
    ctx.record(AWQSearch(scales, alphas, clips))
