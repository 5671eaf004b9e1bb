"""Fit to a budget: measured per-tensor sensitivity (`sensitivity`), the allocation that
minimises the predicted KL divergence under a size, bits-per-weight or VRAM budget (`allocate`),
and the artifact that carries it in any format that can (`build`): GGUF with one llama.cpp type
per tensor, GPTQ with per-module bits. Data flows model + calibration -> sensitivity ->
allocation -> method / format writer -> artifact, which the harness then measures like any other.
"""

from quantlab.fit.allocate import Allocation, Option, allocate
from quantlab.fit.build import FitPlan, FitTarget, build_fit, plan_fit
from quantlab.fit.candidates import Setting, Unit
from quantlab.fit.sensitivity import Sensitivity, SensitivityConfig, measure_sensitivity

__all__ = [
    "Allocation",
    "FitPlan",
    "FitTarget",
    "Option",
    "Sensitivity",
    "SensitivityConfig",
    "Setting",
    "Unit",
    "allocate",
    "build_fit",
    "measure_sensitivity",
    "plan_fit",
]
