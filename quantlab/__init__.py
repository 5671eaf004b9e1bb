"""quantlab: quantize language models (GPTQ, AWQ, GGUF) and measure every output the same way.

Importing quantlab is cheap: torch, transformers and every optional backend are imported by the
functions that need them. See docs/ARCHITECTURE.md for the pipeline and the public types.
"""

from quantlab.version import __version__

__all__ = ["__version__", "load"]


def load(path, *, dtype: str = "float32", verify: bool = True):
    """Load an artifact of any registered format (GPTQ, AWQ, compressed-tensors, native, or a
    ``.gguf`` dequantized) into a transformers model: ``(model, LoadedCheckpoint)``, whose
    ``format`` is the format's label (``gptq``, ``gptq_v2``, ``awq``, ``native``, ...). See
    `quantlab.formats.loader`."""
    from quantlab.formats.loader import load as _load

    return _load(path, dtype=dtype, verify=verify)
