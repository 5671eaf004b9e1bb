"""Signed-gradient rounding (Cheng et al. 2023, "Optimize Weight Rounding via Signed Gradient
Descent for the Quantization of LLMs", the algorithm of Intel's AutoRound).

Round-to-nearest rounds every weight on its own. Here each block learns, against its unquantized
outputs on the calibration set, *which way* to round each weight and how far to clip each group's
range:

    q = clamp(round(w / s + v) + z, 0, 2**bits - 1),   s = (hi * xmax - lo * xmin) / maxq,
    z = round(-lo * xmin / s),   v in [-0.5, 0.5],   lo, hi in [0, 1]  (per group)

with ``xmin``/``xmax`` the group's range (containing 0, as `scale_zero`), ``v`` one offset per
weight (initially 0: round to nearest) and ``lo``/``hi`` per-group shrink factors of the range
(initially 1: no clipping; AutoRound's ``min_scale``/``max_scale``). The loss is the mean squared
error between the block's output with the fake-quantized weights and the unquantized block's
output, on mini-batches of ``batch_size`` calibration sequences; rounding goes through a
straight-through estimator. The optimiser is signed SGD (``p -= lr * sign(grad)``) with a learning
rate decaying linearly from ``lr`` (AutoRound's default ``1 / iters``) to 0, so a weight's offset
moves at most ``lr * iters / 2`` in all: bounded, as the rounding choice it models. Each block
keeps the parameters of its lowest mini-batch loss (AutoRound's ``best_mse``). Symmetric: the zero
point is ``2**(bits-1)`` and only ``hi`` is learned.

As in AutoRound, the block's inputs are the quantized previous blocks' outputs (the walk feeds
them on) and its target is the unquantized block applied to those inputs. Scales are float16
values in the loop (through the estimator) and in the result, so the codes every format writes
dequantize to exactly what the loop optimised. The result is an ordinary `QuantizedWeight` in
natural group order: GPTQ, AWQ, compressed-tensors, quantlab-native and (for group 32 with
matching bits) GGUF's lossless Q4_0/Q4_1/Q8_0 hold it.

Cost: ``iters`` forward and backward passes of ``batch_size`` sequences per block. AutoRound's
defaults (200 iterations, batches of 8 x 2048 tokens) take ~10 min per 7B model on a GPU; on a
CPU use fewer iterations (``iters``) and shorter batches, and say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quantlab.errors import ConfigError
from quantlab.methods.registry import register_method
from quantlab.primitives import check_bits_and_group, grid_range, natural_g_idx
from quantlab.types import QuantizedWeight


@dataclass(frozen=True)
class SignRoundConfig:
    bits: int = 4
    group_size: int = 128  # -1 = one group per output row
    sym: bool = False
    iters: int = 200  # signed-SGD steps per block (AutoRound's default)
    lr: float = 0.0  # initial step; 0 = 1 / iters (AutoRound's default)
    batch_size: int = 8  # calibration sequences per step
    minmax: bool = True  # learn each group's clipping (lo, hi) besides the rounding
    seed: int = 0  # the mini-batch order
    version: int = 1

    def __post_init__(self) -> None:
        check_bits_and_group(self.bits, self.group_size)
        if self.iters < 0:
            raise ConfigError(f"iters must be >= 0, got {self.iters}")
        if self.lr < 0:
            raise ConfigError(f"lr must be >= 0 (0 = 1 / iters), got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def step(self) -> float:
        return self.lr or 1.0 / max(1, self.iters)


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def _ste_fp16(x: torch.Tensor) -> torch.Tensor:
    """The nearest float16 value (at least 2**-24) forward, identity backward."""
    near = x.detach().clamp(min=2**-24, max=65504.0).half().float()
    return x + (near - x).detach()


class _Rounding:
    """One linear's learnable rounding: its weight in groups, the offsets and the range factors."""

    def __init__(self, w: torch.Tensor, bits: int, group_size: int, sym: bool, minmax: bool):
        out, cols = w.shape
        self.cols, self.bits, self.group_size, self.sym = cols, bits, group_size, sym
        size = group_size if group_size > 0 else cols
        groups = math.ceil(cols / size)
        pad = groups * size - cols  # zeros: the range contains 0 already
        self.w = torch.nn.functional.pad(w.float(), (0, pad)).reshape(out, groups, size)
        xmin, xmax = grid_range(self.w, sym, dim=2)
        self.xmin, self.xmax = xmin.squeeze(2), xmax.squeeze(2)
        self.v = torch.zeros_like(self.w, requires_grad=True)
        self.lo = torch.ones_like(self.xmin, requires_grad=minmax and not sym)
        self.hi = torch.ones_like(self.xmax, requires_grad=minmax)

    def params(self) -> list[torch.Tensor]:
        return [p for p in (self.v, self.lo, self.hi) if p.requires_grad]

    def _grid(self, v, lo, hi):
        maxq = 2**self.bits - 1
        if self.sym:
            top = self.xmax * hi
            scale = _ste_fp16(2 * top / maxq)
            zero = torch.full_like(scale, (maxq + 1) // 2)
        else:
            low, top = self.xmin * lo, self.xmax * hi
            scale = _ste_fp16((top - low) / maxq)
            zero = _ste_round(-low / scale).clamp(0, maxq)
        codes = torch.clamp(_ste_round(self.w / scale[..., None] + v) + zero[..., None], 0, maxq)
        return codes, scale, zero

    def fake(self) -> torch.Tensor:
        """The dequantized weight (out, in), differentiable in the offsets and range factors."""
        codes, scale, zero = self._grid(self.v, self.lo, self.hi)
        deq = scale[..., None] * (codes - zero[..., None])
        return deq.reshape(deq.shape[0], -1)[:, : self.cols]

    def snapshot(self) -> tuple[torch.Tensor, ...]:
        return tuple(p.detach().clone() for p in (self.v, self.lo, self.hi))

    def result(self, best, dtype: torch.dtype) -> QuantizedWeight:
        with torch.no_grad():
            codes, scale, zero = self._grid(*best)
        out = codes.shape[0]
        codes = codes.reshape(out, -1)[:, : self.cols].to(torch.uint8)
        g_idx = natural_g_idx(self.cols, self.group_size, codes.device)
        return QuantizedWeight(
            codes, scale.float(), zero.to(torch.uint8), g_idx, self.bits, self.group_size,
            self.sym, dtype,
        )  # fmt: skip

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """One signed-SGD step, then the parameters back into their bounds."""
        for p in self.params():
            if p.grad is not None:
                p -= lr * torch.sign(p.grad)
                p.grad = None
        self.v.clamp_(-0.5, 0.5)
        self.lo.clamp_(0.0, 1.0)
        self.hi.clamp_(0.0, 1.0)


def _trainable(value):
    """A block keyword argument usable in autograd (the walk captured it in inference mode)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_trainable(v) for v in value)
    return value


def learn_rounding(ctx, config: SignRoundConfig, target: torch.Tensor) -> dict:
    """Learn every linear's rounding of the block against ``target`` (the unquantized block's
    outputs for ``ctx.inputs``); returns each linear's `QuantizedWeight`."""
    from quantlab.methods.runner import _cut, _moved

    compute, device = ctx.compute, ctx.device
    dtype = next(compute.parameters()).dtype
    rounding = {}
    for name in ctx.linear_names:
        c = ctx.config_for(name, config)
        rounding[name] = _Rounding(ctx.weight(name), c.bits, c.group_size, c.sym, config.minmax)
    best = {name: r.snapshot() for name, r in rounding.items()}
    inputs = ctx.inputs
    n = inputs.shape[0]
    batch = min(config.batch_size, n)
    gen = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(n, generator=gen)
    at = 0
    kwargs = {k: _trainable(_moved(v, device)) for k, v in ctx.kwargs.items()}
    flags = {p: p.requires_grad for p in compute.parameters()}
    best_loss = math.inf
    try:
        for p in flags:
            p.requires_grad_(False)
        for it in range(config.iters):
            if at + batch > n:  # a fresh order once the calibration set is used up
                order, at = torch.randperm(n, generator=gen), 0
            idx = order[at : at + batch]
            at += batch
            with ctx.stage("solve"):
                x = inputs[idx].to(device).clone()
                y = target[idx].to(device)
                kw = {k: _cut(v, n, idx) for k, v in kwargs.items()}
                weights = {f"{name}.weight": r.fake().to(dtype) for name, r in rounding.items()}
                out = torch.func.functional_call(compute, weights, (x,), kw)
                out = out[0] if isinstance(out, tuple) else out
                loss = torch.nn.functional.mse_loss(out.float(), y.float())
                value = float(loss.detach())
                if value < best_loss:  # the parameters that gave this loss: before the step
                    best_loss = value
                    best = {name: r.snapshot() for name, r in rounding.items()}
                loss.backward()
                lr = config.step * (1 - it / config.iters)
                for r in rounding.values():
                    r.step(lr)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    with ctx.stage("solve"):
        return {
            name: r.result(best[name], ctx.original_dtype(name)) for name, r in rounding.items()
        }


@register_method(
    "signround",
    SignRoundConfig,
    needs_calibration=True,
    description="signed-gradient rounding (AutoRound, Cheng et al. 2023): learned rounding "
    "and clipping",
    per_module=True,
)
def quantize_block(ctx, config: SignRoundConfig) -> None:
    target = ctx.forward()  # the unquantized block's outputs (and the importance matrix)
    for name, qw in learn_rounding(ctx, config, target).items():
        ctx.set_quantized(name, qw)
