"""quantlab: quantize language models (GPTQ, AWQ, GGUF) and measure every output the same way.

Importing quantlab is cheap: torch, transformers and every optional backend are imported by the
functions that need them. See docs/ARCHITECTURE.md for the pipeline and the public types.
"""

from quantlab.version import __version__

__all__ = ["__version__", "load"]


def load(path, *, dtype: str = "float32", verify: bool = True):
    """Load a quantized checkpoint (GPTQ, AWQ, compressed-tensors or quantlab-native) into a
    transformers model: ``(model, LoadedCheckpoint)``. See `quantlab.formats.loader`."""
    from quantlab.formats.loader import load as _load

    return _load(path, dtype=dtype, verify=verify)
