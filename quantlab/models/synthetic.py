"""Synthetic Llama models of any size, written shard by shard (never held in memory).

For the streaming tests and the memory benchmark: a model whose weights are larger than the memory
it is quantized in must be created without ever holding it. `write_synthetic_model` draws each
tensor from a seeded generator and writes one safetensors shard per decoder block (plus one for the
embedding, final norm and head), as Hugging Face sharded checkpoints are laid out, with the tiny
models' byte-level tokenizer. Weights are random (normal, std 0.02; norms 1): such a model measures
memory and time, not quality.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from quantlab.atomic import atomic_directory


def synthetic_tensors(hidden: int, intermediate: int, heads: int, kv_heads: int) -> dict:
    """Name -> shape of one Llama block's tensors."""
    head_dim = hidden // heads
    return {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (heads * head_dim, hidden),
        "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.o_proj.weight": (hidden, heads * head_dim),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (intermediate, hidden),
        "mlp.up_proj.weight": (intermediate, hidden),
        "mlp.down_proj.weight": (hidden, intermediate),
    }


def synthetic_bytes(
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int = 320,
    itemsize: int = 2,
) -> int:
    """Bytes of the weights `write_synthetic_model` writes (untied head)."""
    block = sum(
        math.prod(s) for s in synthetic_tensors(hidden, intermediate, heads, kv_heads).values()
    )
    return itemsize * (layers * block + 2 * vocab * hidden + hidden)


def write_synthetic_model(
    dest: str | Path,
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int = 320,
    dtype: str = "float16",
    seed: int = 0,
) -> Path:
    """Write a random Llama model to ``dest`` (atomically), one tensor in memory at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from quantlab.models.tiny import TOKENIZER_VOCAB, byte_tokenizer

    if vocab < TOKENIZER_VOCAB:
        raise ValueError(f"vocab must be >= {TOKENIZER_VOCAB} (the byte tokenizer's size)")
    config = AutoConfig.for_model(
        "llama",
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=TOKENIZER_VOCAB - 1,
        eos_token_id=TOKENIZER_VOCAB - 1,
        pad_token_id=TOKENIZER_VOCAB - 1,
        dtype=dtype,
        architectures=["LlamaForCausalLM"],
    )
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)

    def draw(shape) -> torch.Tensor:
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch_dtype)
        return (torch.randn(shape, generator=gen) * 0.02).to(torch_dtype)

    block = synthetic_tensors(hidden, intermediate, heads, kv_heads)
    n = layers + 1
    weight_map, total = {}, 0
    with atomic_directory(Path(dest)) as tmp:
        for i in range(n):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            if i < layers:
                shapes = {f"model.layers.{i}.{k}": v for k, v in block.items()}
            else:
                shapes = {
                    "model.embed_tokens.weight": (vocab, hidden),
                    "model.norm.weight": (hidden,),
                    "lm_head.weight": (vocab, hidden),
                }
            tensors = {name: draw(shape) for name, shape in shapes.items()}
            save_file(tensors, tmp / fname, metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update(dict.fromkeys(tensors, fname))
            del tensors
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config.save_pretrained(tmp)
        byte_tokenizer().save_pretrained(tmp)
        provenance = {
            "source": "quantlab synthetic model",
            "seed": seed,
            "weights_note": "random initialisation, for memory and speed measurements only",
        }
        (tmp / "quantlab_provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return Path(dest)
