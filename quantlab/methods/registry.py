"""The method registry: a method is one registered object (`MethodSpec`).

A method is a frozen, validated config dataclass plus ``quantize_block(ctx, config)``, which
quantizes one decoder block through the `BlockContext` the block walk hands it. Registering it
(``@register_method("name", Config, needs_calibration=...)`` on its ``quantize_block``) is all it
takes for the CLI (``--method NAME`` and a flag per config field), run configs (``{method: NAME,
<config fields>}``), the app and the registry-driven tests to offer it.

What formats read from a method's config: ``bits``, ``group_size``, ``sym`` and (optionally)
``act_order`` describe the integer tensors the method produces; a format's ``accepts`` decides
from them whether it can hold the result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from quantlab.errors import ConfigError


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type  # frozen dataclass, validated in __post_init__
    quantize_block: Callable  # (ctx: BlockContext, config) -> None
    needs_calibration: bool  # False: works from the weights alone (RTN)
    description: str = ""
    per_module: bool = False  # takes per-linear configs (`BlockContext.config_for`)

    def fields(self) -> list[dataclasses.Field]:
        """The config's settable fields (``version`` is the config's own)."""
        return [f for f in dataclasses.fields(self.config_cls) if f.name != "version"]


_METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str, config_cls: type, *, needs_calibration: bool, description="", per_module=False
):
    """Decorator registering ``quantize_block(ctx, config)`` as method ``name``."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"method {name!r}: the config must be a dataclass")

    def wrap(fn: Callable) -> Callable:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        _METHODS[name] = MethodSpec(
            name, config_cls, fn, needs_calibration, description or name, per_module
        )
        return fn

    return wrap


def unregister_method(name: str) -> None:
    """Remove a method (plugins and tests that register their own)."""
    _METHODS.pop(name, None)


def method_names() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> MethodSpec:
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown method {name!r}; known: {', '.join(sorted(_METHODS))}"
        ) from None
