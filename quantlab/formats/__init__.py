"""Formats: writers and readers of model files (GGUF now; GPTQ and AWQ checkpoints next)."""
