"""HQQ: half-quadratic quantization (Badri & Shaji 2023), calibration-free.

Round-to-nearest takes each group's scale and zero point from its min and max. HQQ instead
chooses them to minimise an Lp (p < 1) norm of the weight error, which tolerates a few large
errors (outliers) so as to fit the bulk of the group well. The non-convex problem is split with a
half-quadratic auxiliary variable ``e`` (the error the grid is allowed to leave):

    min_{s,z,e}  |e|_p + beta/2 |w - e - s (q - z)|^2,  q = clamp(round(w / s) + z)

and solved by alternating (each step closed form): ``e`` by the generalised soft threshold
``shrink_p(w - s (q - z), beta)``, then the zero point and the scale by least squares against the
target ``w - e``, then the codes by rounding; ``beta`` grows by ``kappa`` per iteration, and each
group keeps the best (scale, zero) it has seen (by mean absolute error, HQQ's own criterion);
a group stops at its first step that does not improve it (HQQ's reference code stops the
whole tensor at the first step that does not lower the mean error).

One difference from the paper's reference code, made for the formats: HQQ's zero point is a
float, and its scale stays at the min-max value. GPTQ, AWQ, compressed-tensors and quantlab-native
checkpoints store integer zero points and float16 scales, so here the zero point is rounded to an
integer at every step and the scale is optimised too (least squares given the codes), rounded to
float16: the result is an ordinary `QuantizedWeight` that every integer format holds exactly.
``sym=True`` keeps the zero at ``2**(bits-1)`` and optimises the scale alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantlab.errors import ConfigError
from quantlab.methods.registry import register_method
from quantlab.primitives import check_bits_and_group, quantize_codes, quantize_groups, scale_zero


@dataclass(frozen=True)
class HQQConfig:
    bits: int = 4
    group_size: int = 128  # -1 = one group per output row
    sym: bool = False
    iters: int = 20  # alternating steps per group (the paper's default)
    lp_norm: float = 0.7  # p of the error norm (p < 1: robust to outliers)
    beta: float = 10.0  # initial weight of the quadratic coupling
    kappa: float = 1.01  # beta's growth per step
    version: int = 1

    def __post_init__(self) -> None:
        check_bits_and_group(self.bits, self.group_size)
        if self.iters < 0:
            raise ConfigError(f"iters must be >= 0, got {self.iters}")
        if not 0 < self.lp_norm <= 1:
            raise ConfigError(f"lp_norm must be in (0, 1], got {self.lp_norm}")
        if self.beta <= 0 or self.kappa < 1:
            raise ConfigError(
                f"beta must be > 0 and kappa >= 1, got beta={self.beta}, kappa={self.kappa}"
            )


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor | None:
    """The generalised soft threshold: ``argmin_e |e|_p + beta/2 |x - e|^2`` (HQQ's eq. 6),
    ``sign(x) * max(|x| - |x|**(p-1) / beta, 0)``. It is non-zero only where
    ``|x| > beta**(-1 / (2 - p))``, which weight errors seldom reach: the power is computed
    there only, and None stands for all zeros."""
    live = x.abs() > beta ** (-1.0 / (2.0 - p))
    if not bool(live.any()):
        return None
    out = torch.zeros_like(x)
    m = x[live].abs()
    out[live] = torch.sign(x[live]) * torch.relu(m - m.pow(p - 1) / beta)
    return out


def _fp16_nearest(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(min=2**-24, max=65504.0).half().float()


def hqq_scale_zero(
    w: torch.Tensor, bits: int, sym: bool, config: HQQConfig = HQQConfig()
) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ's (scale, integer zero) per row of ``w`` (n groups, size), each (n, 1) float32.

    Starts from RTN's min-max choice (`scale_zero`) and never returns a worse one by the mean
    absolute error: each row keeps the best pair it has seen.
    """
    maxq = 2**bits - 1
    w = w.float()
    scale, zero = scale_zero(w, bits, sym)
    q = quantize_codes(w, scale, zero, bits)
    resid = w - scale * (q - zero)  # what the grid leaves of w: the shrink's input
    best_err = resid.abs().mean(dim=1, keepdim=True)
    best_s, best_z = scale.clone(), zero.clone()
    rows = torch.arange(w.shape[0], device=w.device)  # the groups still improving
    beta = config.beta
    for _ in range(config.iters):
        e = shrink_lp(resid, beta, config.lp_norm)
        target = w if e is None else w - e
        if not sym:
            zero = (q - target / scale).mean(dim=1, keepdim=True).round().clamp(0, maxq)
        d = q - zero
        dd = (d * d).sum(dim=1, keepdim=True)
        fitted = (target * d).sum(dim=1, keepdim=True) / dd.clamp_min(1e-12)
        scale = torch.where((dd > 0) & (fitted > 0), _fp16_nearest(fitted), scale)
        beta *= config.kappa
        q = quantize_codes(w, scale, zero, bits)
        resid = w - scale * (q - zero)
        err = resid.abs().mean(dim=1, keepdim=True)
        better = (err < best_err[rows]).squeeze(1)
        if not bool(better.any()):  # HQQ stops once the error stops falling
            break
        if not bool(better.all()):
            rows, w, q, resid = rows[better], w[better], q[better], resid[better]
            scale, zero, err = scale[better], zero[better], err[better]
        best_err[rows], best_s[rows], best_z[rows] = err, scale, zero
    return best_s, best_z


def quantize_hqq(w: torch.Tensor, config: HQQConfig):
    """HQQ-quantize one (out, in) weight into a `QuantizedWeight`."""
    return quantize_groups(
        w,
        config.bits,
        config.group_size,
        config.sym,
        lambda groups, bits, sym: hqq_scale_zero(groups, bits, sym, config),
    )


@register_method(
    "hqq",
    HQQConfig,
    needs_calibration=False,
    description="half-quadratic optimised scales and zero points, no calibration",
    per_module=True,
)
def quantize_block(ctx, config: HQQConfig) -> None:
    ctx.quantize_each_linear(config, quantize_hqq)
