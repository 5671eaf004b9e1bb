"""Synthetic models of any size, written shard by shard (never held in memory).

For the streaming tests and the scale benchmarks: a model whose weights are larger than the
memory it is quantized in must be created without ever holding it. `write_synthetic_model` draws
each tensor from a seeded generator and writes one safetensors shard per decoder block (plus one
for the embedding, final norm and head), as Hugging Face sharded checkpoints are laid out, with
the tiny models' byte-level tokenizer. Weights are random (normal, std 0.02; norms 1): such a
model measures memory and time, not quality.

`SHAPES` names real architectures' shapes (Llama-3-8B/70B, Mistral-7B, Qwen2.5 0.5B-14B, ...):
`write_shape("llama-3-8b", dest)` writes a model with exactly that config's tensors (vocabulary,
tied head, Qwen2's attention biases included), in bf16 by default - the time and memory of
quantizing and evaluating it are real, the weights are not (``quantlab synthetic``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from quantlab.atomic import atomic_directory
from quantlab.errors import QuantlabError


@dataclass(frozen=True)
class ShapeSpec:
    """A real model's shape (from its config.json)."""

    model_type: str  # transformers model_type: llama, mistral, qwen2
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie: bool = False  # tied input embedding and output head
    rope_theta: float = 10000.0
    max_positions: int = 4096
    source: str = ""  # the model whose config this is

    @property
    def bias(self) -> bool:
        return self.model_type == "qwen2"  # Qwen2's q/k/v projections have biases

    def parameters(self) -> int:
        return synthetic_bytes(**self.kwargs(), itemsize=1)

    def kwargs(self) -> dict:
        return {
            "hidden": self.hidden,
            "intermediate": self.intermediate,
            "layers": self.layers,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "vocab": self.vocab,
            "tie": self.tie,
            "bias": self.bias,
        }


SHAPES: dict[str, ShapeSpec] = {
    "qwen2.5-0.5b": ShapeSpec("qwen2", 896, 4864, 24, 14, 2, 151936, True, 1e6, 32768,
                              "Qwen/Qwen2.5-0.5B"),
    "qwen2.5-1.5b": ShapeSpec("qwen2", 1536, 8960, 28, 12, 2, 151936, True, 1e6, 32768,
                              "Qwen/Qwen2.5-1.5B"),
    "qwen2.5-3b": ShapeSpec("qwen2", 2048, 11008, 36, 16, 2, 151936, True, 1e6, 32768,
                            "Qwen/Qwen2.5-3B"),
    "qwen2.5-7b": ShapeSpec("qwen2", 3584, 18944, 28, 28, 4, 152064, False, 1e6, 32768,
                            "Qwen/Qwen2.5-7B"),
    "qwen2.5-14b": ShapeSpec("qwen2", 5120, 13824, 48, 40, 8, 152064, False, 1e6, 32768,
                             "Qwen/Qwen2.5-14B"),
    "llama-3.2-1b": ShapeSpec("llama", 2048, 8192, 16, 32, 8, 128256, True, 5e5, 131072,
                              "meta-llama/Llama-3.2-1B"),
    "llama-3.2-3b": ShapeSpec("llama", 3072, 8192, 28, 24, 8, 128256, True, 5e5, 131072,
                              "meta-llama/Llama-3.2-3B"),
    "llama-3-8b": ShapeSpec("llama", 4096, 14336, 32, 32, 8, 128256, False, 5e5, 8192,
                            "meta-llama/Meta-Llama-3-8B"),
    "llama-3-70b": ShapeSpec("llama", 8192, 28672, 80, 64, 8, 128256, False, 5e5, 8192,
                             "meta-llama/Meta-Llama-3-70B"),
    "mistral-7b": ShapeSpec("mistral", 4096, 14336, 32, 32, 8, 32768, False, 1e6, 32768,
                            "mistralai/Mistral-7B-v0.3"),
}  # fmt: skip


def shape_spec(name: str) -> ShapeSpec:
    try:
        return SHAPES[name]
    except KeyError:
        raise QuantlabError(
            f"unknown synthetic shape {name!r}; known: {', '.join(sorted(SHAPES))}"
        ) from None


def synthetic_tensors(
    hidden: int, intermediate: int, heads: int, kv_heads: int, bias: bool = False
) -> dict:
    """Name -> shape of one Llama-style block's tensors (with Qwen2's q/k/v biases)."""
    head_dim = hidden // heads
    out = {
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
    if bias:
        out["self_attn.q_proj.bias"] = (heads * head_dim,)
        out["self_attn.k_proj.bias"] = (kv_heads * head_dim,)
        out["self_attn.v_proj.bias"] = (kv_heads * head_dim,)
    return out


def synthetic_bytes(
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int = 320,
    itemsize: int = 2,
    tie: bool = False,
    bias: bool = False,
) -> int:
    """Bytes of the weights `write_synthetic_model` writes."""
    block = sum(
        math.prod(s)
        for s in synthetic_tensors(hidden, intermediate, heads, kv_heads, bias).values()
    )
    return itemsize * (layers * block + (1 if tie else 2) * vocab * hidden + hidden)


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
    model_type: str = "llama",
    tie: bool = False,
    bias: bool | None = None,
    rope_theta: float = 10000.0,
    max_positions: int = 4096,
    source: str = "",
    progress: bool = False,
) -> Path:
    """Write a random model to ``dest`` (atomically), one block in memory at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from quantlab.models.tiny import TOKENIZER_VOCAB, byte_tokenizer

    if vocab < TOKENIZER_VOCAB:
        raise ValueError(f"vocab must be >= {TOKENIZER_VOCAB} (the byte tokenizer's size)")
    architectures = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
    architectures["qwen2"] = "Qwen2ForCausalLM"
    if model_type not in architectures:
        raise QuantlabError(f"synthetic models are {', '.join(architectures)}, not {model_type}")
    bias = model_type == "qwen2" if bias is None else bias
    config = AutoConfig.for_model(
        model_type,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=max_positions,
        rope_theta=rope_theta,
        tie_word_embeddings=tie,
        bos_token_id=TOKENIZER_VOCAB - 1,
        eos_token_id=TOKENIZER_VOCAB - 1,
        pad_token_id=TOKENIZER_VOCAB - 1,
        dtype=dtype,
        architectures=[architectures[model_type]],
    )
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)

    def draw(name, shape) -> torch.Tensor:
        if name.endswith(".bias"):
            return torch.zeros(shape, dtype=torch_dtype)
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch_dtype)
        out = torch.empty(shape, dtype=torch_dtype)
        rows = max(1, (1 << 24) // shape[1])  # drawn in float32 slices of ~64 MB
        for r in range(0, shape[0], rows):
            out[r : r + rows] = torch.randn(out[r : r + rows].shape, generator=gen) * 0.02
        return out

    block = synthetic_tensors(hidden, intermediate, heads, kv_heads, bias)
    n = layers + 1
    weight_map, total = {}, 0
    from tqdm import tqdm

    from quantlab.console import bar_stream

    bar = tqdm(total=n, desc="writing synthetic shards", unit="shard", file=bar_stream(),
               disable=not progress)  # fmt: skip
    with atomic_directory(Path(dest)) as tmp:
        for i in range(n):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            if i < layers:
                shapes = {f"model.layers.{i}.{k}": v for k, v in block.items()}
            else:
                shapes = {
                    "model.embed_tokens.weight": (vocab, hidden),
                    "model.norm.weight": (hidden,),
                }
                if not tie:
                    shapes["lm_head.weight"] = (vocab, hidden)
            tensors = {name: draw(name, shape) for name, shape in shapes.items()}
            save_file(tensors, tmp / fname, metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update(dict.fromkeys(tensors, fname))
            del tensors
            bar.update(1)
        bar.close()
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config.save_pretrained(tmp)
        byte_tokenizer().save_pretrained(tmp)
        provenance = {
            "source": "quantlab synthetic model",
            **({"shape_of": source} if source else {}),
            "seed": seed,
            "weights_note": "random initialisation, for memory and speed measurements only",
        }
        (tmp / "quantlab_provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return Path(dest)


def write_shape(
    name: str,
    dest: str | Path,
    *,
    layers: int | None = None,
    dtype: str = "bfloat16",
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """Write the synthetic model of shape ``name`` (`SHAPES`) to ``dest``; ``layers`` keeps only
    that many blocks (the same blocks: time and memory per block are the full model's)."""
    spec = shape_spec(name)
    kwargs = spec.kwargs()
    if layers is not None:
        if not 1 <= layers <= spec.layers:
            raise QuantlabError(f"{name} has {spec.layers} blocks; layers must be 1..{spec.layers}")
        kwargs["layers"] = layers
    return write_synthetic_model(
        dest,
        **kwargs,
        dtype=dtype,
        seed=seed,
        model_type=spec.model_type,
        rope_theta=spec.rope_theta,
        max_positions=spec.max_positions,
        source=spec.source,
        progress=progress,
    )
