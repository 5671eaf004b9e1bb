"""Models: resolve a spec to a checked local folder, describe it, load it.

``resolve_model(spec)`` -> `ResolvedModel` (a validated folder) -> ``model_info`` / ``load_model``.
Architectures are described as data in `quantlab.models.arch`.
"""

from quantlab.models.arch import ArchSpec, InputGroup, arch_spec, supported_architectures
from quantlab.models.info import ModelInfo, model_info
from quantlab.models.load import generate_greedy, load_model, load_tokenizer
from quantlab.models.resolve import DEFAULT_MODEL, ResolvedModel, named_models, resolve_model

__all__ = [
    "DEFAULT_MODEL",
    "ArchSpec",
    "InputGroup",
    "ModelInfo",
    "ResolvedModel",
    "arch_spec",
    "generate_greedy",
    "load_model",
    "load_tokenizer",
    "model_info",
    "named_models",
    "resolve_model",
    "supported_architectures",
]
