"""Quantization methods, registered by name: ``rtn``, ``hqq``, ``gptq``, ``awq``, ``signround``.

A method is a frozen config dataclass plus a function ``quantize_block(ctx, config)`` that quantizes
one decoder block through the `BlockContext` the block walk hands it (the block's weights, its
inputs, forward passes with hooks). Methods return `QuantizedWeight`s through the context; they
never write files and never import formats. ``quantize_model`` in `quantlab.methods.runner` walks
the blocks. The registry is `quantlab.methods.registry`; importing this package registers the
built-in methods.
"""

from __future__ import annotations

from quantlab.methods import awq, gptq, hqq, rtn, signround  # noqa: F401  (registration)
from quantlab.methods.registry import (
    MethodSpec,
    get_method,
    method_names,
    register_method,
    unregister_method,
)

__all__ = ["MethodSpec", "get_method", "method_names", "register_method", "unregister_method"]
