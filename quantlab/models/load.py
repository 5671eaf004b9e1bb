"""Load a resolved model and its tokenizer into transformers (the only place that does)."""

from __future__ import annotations

from quantlab.errors import ConfigError
from quantlab.models.hf import prepare_transformers
from quantlab.models.resolve import ResolvedModel

DTYPES = ("float32", "bfloat16", "float16")


def load_tokenizer(model: ResolvedModel):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)


def load_model(model: ResolvedModel, *, dtype: str = "float32", device: str = "cpu"):
    """The model in eval mode, weights in ``dtype`` on ``device``."""
    import torch

    prepare_transformers()
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    hf_model = AutoModelForCausalLM.from_pretrained(
        model.path,
        dtype=getattr(torch, dtype),
        trust_remote_code=model.trust_remote_code,
        use_safetensors=bool(model.folder.tensors),
    )
    return hf_model.to(device).eval()


def generate_greedy(model: ResolvedModel, prompt: str, max_new_tokens: int = 20) -> list[int]:
    """Token ids of a greedy continuation of ``prompt`` (prompt ids excluded)."""
    import torch

    tokenizer = load_tokenizer(model)
    hf_model = load_model(model)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return out[0, ids.shape[1] :].tolist()
