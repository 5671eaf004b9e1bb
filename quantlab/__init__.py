"""quantlab: quantize language models (GPTQ, AWQ, GGUF) and measure every output the same way.

Importing quantlab is cheap: torch, transformers and every optional backend are imported by the
functions that need them. See docs/ARCHITECTURE.md for the pipeline and the public types.
"""

__version__ = "0.1.0"
