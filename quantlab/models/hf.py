"""transformers, imported the way quantlab uses it."""

from __future__ import annotations


def _absent(*_args, **_kwargs) -> bool:
    return False


def prepare_transformers() -> None:
    """Have transformers skip its torchao integration, which quantlab never uses.

    torchao is installed as a requirement of GPTQModel (the ``reference`` extra); transformers
    then imports it when its quantizers load (at the first model load), and importing torchao
    on this CPU build prints failed native-library loads and torch ``_pytree`` warnings. quantlab
    loads no torchao-quantized model, so transformers is told torchao is absent; called before
    the quantizers are imported (afterwards it changes nothing). The reference toolkits import
    torchao themselves when they run."""
    import sys

    if "transformers.quantizers.quantizer_torchao" in sys.modules:
        return
    import transformers.utils

    transformers.utils.is_torchao_available = _absent
