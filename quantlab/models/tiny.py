"""Tiny, seeded, randomly initialised models for tests and quick runs.

They cover architectures the default model does not (Qwen2 with biases, Qwen3 with q/k norms,
Mistral) and widths that matter for quantization: some ``in_features`` are multiples of 128, some
are not (192, 320, 576), so group sizes that do not divide a row are exercised. Their tokenizer is
a plain byte-level BPE without merges (256 byte tokens + ``<|endoftext|>``): no download, and
every text round-trips. The same name and seed always give bit-identical weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from quantlab.atomic import atomic_directory

TINY_VERSION = 1
TOKENIZER_VOCAB = 257  # 256 byte tokens + <|endoftext|>
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class TinySpec:
    model_type: str  # transformers model_type, picks the config class
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int = 2
    vocab: int = 320  # >= TOKENIZER_VOCAB, padded like real models pad their vocab


TINY_MODELS: dict[str, TinySpec] = {
    "tiny-llama": TinySpec("llama", hidden=256, intermediate=640, heads=4, kv_heads=2),
    "tiny-qwen2": TinySpec("qwen2", hidden=192, intermediate=576, heads=6, kv_heads=2),
    "tiny-qwen3": TinySpec("qwen3", hidden=128, intermediate=320, heads=4, kv_heads=2),
    "tiny-mistral": TinySpec("mistral", hidden=256, intermediate=384, heads=4, kv_heads=1),
}


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=None
    )


def build_tiny_model(name: str, dest: Path, seed: int = 0) -> Path:
    """Write the tiny model ``name`` with weights drawn from ``seed`` to ``dest`` (atomically)."""
    import torch

    from quantlab.models.hf import prepare_transformers

    prepare_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = TINY_MODELS[name]
    config = AutoConfig.for_model(
        spec.model_type,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=32,
        vocab_size=spec.vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=TOKENIZER_VOCAB - 1,
        eos_token_id=TOKENIZER_VOCAB - 1,
        pad_token_id=TOKENIZER_VOCAB - 1,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with atomic_directory(dest) as tmp:
        model.save_pretrained(tmp)
        byte_tokenizer().save_pretrained(tmp)
        provenance = {
            "source": f"quantlab tiny model {name}",
            "seed": seed,
            "tiny_version": TINY_VERSION,
            "weights_note": "random initialisation",
        }
        (tmp / "quantlab_provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return dest
