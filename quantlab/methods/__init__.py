"""Quantization methods, registered by name: ``rtn``, ``gptq``, ``awq``.

A method is a frozen config dataclass plus a function ``quantize_block(ctx, config)`` that quantizes
one decoder block through the `BlockContext` the calibration pipeline hands it (the block's
weights, its inputs, forward passes with hooks). Methods return `QuantizedWeight`s through the
context; they never write files and never import formats. ``quantize_model`` in
`quantlab.methods.runner` walks the blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from quantlab.errors import ConfigError


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    quantize_block: Callable
    needs_calibration: bool  # False: works from the weights alone (RTN)


_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, config_cls: type, *, needs_calibration: bool):
    """Decorator registering ``quantize_block(ctx, config)`` as method ``name``."""

    def wrap(fn: Callable) -> Callable:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        _METHODS[name] = MethodSpec(name, config_cls, fn, needs_calibration)
        return fn

    return wrap


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_METHODS)


def get_method(name: str) -> MethodSpec:
    _load_builtin()
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown method {name!r}; known: {', '.join(sorted(_METHODS))}"
        ) from None


def _load_builtin() -> None:
    from quantlab.methods import awq, gptq, rtn  # noqa: F401  (registration side effect)
