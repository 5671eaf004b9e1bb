"""Tiny random models: every architecture builds, loads, matches its ArchSpec, is reproducible."""

import hashlib

import pytest
import torch

from quantlab.models import arch_spec, load_model, load_tokenizer, resolve_model
from quantlab.models.tiny import TINY_MODELS, build_tiny_model


def _weights_hash(folder) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_tiny_model_matches_its_arch_spec(tiny_models, name):
    model = resolve_model(str(tiny_models[name]))
    spec = arch_spec(model.folder.config["architectures"][0])
    hf = load_model(model)
    blocks = hf.get_submodule(spec.blocks)
    assert len(blocks) == TINY_MODELS[name].layers
    for block in blocks:
        for linear in spec.linears:
            assert isinstance(block.get_submodule(linear), torch.nn.Linear)
        for group in spec.input_groups:
            block.get_submodule(group.prev_op)
    for path in (spec.embed, spec.final_norm, spec.lm_head):
        hf.get_submodule(path)
    tok = load_tokenizer(model)
    ids = tok("Hello, world", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "Hello, world"
    with torch.inference_mode():
        logits = hf(ids).logits
    assert logits.shape == (1, ids.shape[1], hf.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_tiny_models_cover_widths_that_128_does_not_divide(tiny_models):
    widths = set()
    for folder in tiny_models.values():
        model = resolve_model(str(folder))
        widths |= {t.shape[1] for t in model.folder.tensors if t.name.endswith("proj.weight")}
    assert any(w % 128 == 0 for w in widths)
    assert any(w % 128 != 0 for w in widths)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a = build_tiny_model("tiny-llama", tmp_path / "a", seed=0)
    b = build_tiny_model("tiny-llama", tmp_path / "b", seed=0)
    c = build_tiny_model("tiny-llama", tmp_path / "c", seed=1)
    assert _weights_hash(a) == _weights_hash(b)
    assert _weights_hash(a) != _weights_hash(c)


def test_named_tiny_spec_builds_into_the_cache(tmp_path):
    model = resolve_model("tiny-qwen3", cache=tmp_path)
    assert model.path.parent == tmp_path / "tiny"
    assert model.folder.arch.architecture == "Qwen3ForCausalLM"
    assert not [p for p in (tmp_path / "tiny").iterdir() if ".tmp-" in p.name]
