"""RTN: round-to-nearest weight quantization, the baseline every calibrated method must beat.

Each group of ``group_size`` input columns of each linear gets its own min-max scale and zero
point (`quantlab.primitives.quantize_rtn`); no calibration data is used.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantlab.methods.registry import register_method
from quantlab.primitives import check_bits_and_group, quantize_rtn


@dataclass(frozen=True)
class RTNConfig:
    bits: int = 4
    group_size: int = 128  # -1 = one group per output row
    sym: bool = False
    version: int = 1

    def __post_init__(self) -> None:
        check_bits_and_group(self.bits, self.group_size)


@register_method(
    "rtn",
    RTNConfig,
    needs_calibration=False,
    description="round to nearest, no calibration",
    per_module=True,
)
def quantize_block(ctx, config: RTNConfig) -> None:
    ctx.quantize_each_linear(config, lambda w, c: quantize_rtn(w, c.bits, c.group_size, c.sym))
