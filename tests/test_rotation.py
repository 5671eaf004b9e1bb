"""Rotation (quantlab.models.rotation): orthogonal matrices of the widths real models have, the
model's function unchanged after the rotation is fused, and the rotated copy as a variant."""

from __future__ import annotations

import json

import pytest
import torch

from quantlab.errors import ConfigError, QuantlabError
from quantlab.models import arch_spec, load_model, resolve_model
from quantlab.models.rotation import hadamard, rotate_model, rotated_model, rotation_matrix
from quantlab.models.tiny import TINY_MODELS


@pytest.mark.parametrize("n", [1, 2, 12, 28, 36, 64, 72, 128, 576, 896, 1536])
def test_hadamard_orders_of_real_widths_are_orthonormal_with_plus_minus_entries(n):
    h = hadamard(n)
    assert h is not None, n
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-10)
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5))


def test_a_width_without_a_hadamard_matrix_gets_a_seeded_random_orthogonal_one():
    assert hadamard(6) is None  # no Hadamard matrix of order 6 exists
    q, kind = rotation_matrix(6, seed=3)
    assert "random orthogonal" in kind
    torch.testing.assert_close(q @ q.T, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(q, rotation_matrix(6, seed=3)[0]) and not torch.equal(
        q, rotation_matrix(6, seed=4)[0]
    )
    h, kind = rotation_matrix(64, seed=0)
    assert kind == "randomised Hadamard" and not torch.equal(h, hadamard(64))


def _logits(model) -> torch.Tensor:
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return model(ids).logits


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_rotation_keeps_the_fp32_logits_and_spreads_the_weights(tiny_models, name):
    ref = resolve_model(str(tiny_models[name]))
    model, rotated = load_model(ref), load_model(ref)
    arch = arch_spec(model.config.architectures[0])
    record = rotate_model(rotated, arch, seed=0)
    torch.testing.assert_close(_logits(rotated), _logits(model), rtol=0, atol=1e-4)
    block = rotated.get_submodule(arch.blocks)[0]
    assert torch.equal(block.input_layernorm.weight, torch.ones_like(block.input_layernorm.weight))
    before = model.get_submodule(arch.blocks)[0].self_attn.q_proj.weight
    assert not torch.allclose(block.self_attn.q_proj.weight, before)
    assert "Hadamard" in record["residual"] and "down_proj" in record["not_rotated"]


def test_a_tied_embedding_is_untied_and_the_function_kept(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = resolve_model(str(tiny_models["tiny-llama"]))
    model = load_model(ref)
    model.config.tie_word_embeddings = True
    tied = AutoModelForCausalLM.from_config(model.config)
    tied.load_state_dict(model.state_dict(), strict=False)
    tied.tie_weights()
    tied.eval()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    want = _logits(tied)
    record = rotate_model(tied, arch_spec("LlamaForCausalLM"))
    assert record["untied_embedding"] and not tied.config.tie_word_embeddings
    assert tied.lm_head.weight.data_ptr() != tied.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(_logits(tied), want, rtol=0, atol=1e-4)


def test_unsupported_models_are_refused_by_name(tiny_models):
    import dataclasses

    ref = resolve_model(str(tiny_models["tiny-llama"]))
    arch = dataclasses.replace(arch_spec("LlamaForCausalLM"), value_output=None)
    with pytest.raises(QuantlabError, match="rotation does not support LlamaForCausalLM"):
        rotate_model(load_model(ref), arch)


def test_the_rotated_copy_is_cached_with_its_provenance(tiny_models, tmp_path):
    ref = resolve_model(str(tiny_models["tiny-qwen2"]))
    made = rotated_model(ref, cache=tmp_path)
    provenance = json.loads((made.path / "quantlab_provenance.json").read_text())
    assert provenance["rotation"]["seed"] == 0 and provenance["source_key"]
    stamp = (made.path / "config.json").stat().st_mtime_ns
    again = rotated_model(ref, cache=tmp_path)
    assert again.path == made.path and (again.path / "config.json").stat().st_mtime_ns == stamp
    torch.testing.assert_close(
        _logits(load_model(made)), _logits(load_model(ref)), rtol=0, atol=1e-4
    )
    assert rotated_model(ref, seed=1, cache=tmp_path).path != made.path


def test_a_rotate_variant_is_quantized_from_the_rotated_model(tiny_models, tmp_path):
    from quantlab.data import CalibrationConfig
    from quantlab.formats.loader import load
    from quantlab.workbench.config import parse_variant
    from quantlab.workbench.produce import SharedInputs, produce

    variant = parse_variant({"method": "rtn", "bits": 4, "group_size": 32, "rotate": True})
    assert variant.rotate and variant.name == "rtn-w4-g32-rot"
    assert "rotate" in variant.settings_key()
    plain = parse_variant({"method": "rtn", "bits": 4, "group_size": 32})
    assert plain.settings_key() != variant.settings_key()
    with pytest.raises(ConfigError, match="rotate applies to quantized variants"):
        parse_variant({"rotate": True})
    ref = resolve_model(str(tiny_models["tiny-llama"]))
    calib = CalibrationConfig(corpus="pydoc", n_samples=2, seq_len=32, allow_fallback=True)
    shared = SharedInputs(ref, calib, cache=tmp_path / "cache")
    made = produce(variant, shared, tmp_path / "rot", progress=False)
    assert not shared.drawn  # RTN needs no calibration: none was drawn for the rotated copy
    manifest = json.loads((tmp_path / "rot" / "quantlab_manifest.json").read_text())
    assert "rotated" in manifest["source"]["spec"]
    loaded, _ = load(made.target)
    # a 4-bit rotated model computes the unrotated model's function up to its rounding
    want = _logits(load_model(ref))
    got = _logits(loaded)
    assert float((got - want).abs().mean()) < 0.2 * float(want.abs().mean())
