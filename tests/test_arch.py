import pytest

from quantlab.errors import UnsupportedArchitectureError
from quantlab.models.arch import (
    ArchSpec,
    InputGroup,
    arch_spec,
    arch_spec_for_config,
    register_arch,
    supported_architectures,
)


def test_supported_architectures_include_the_tested_ones():
    tested = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
    assert tested <= set(supported_architectures())


def test_unknown_architecture_lists_supported_ones():
    with pytest.raises(UnsupportedArchitectureError) as exc:
        arch_spec("GPT2LMHeadModel")
    assert "GPT2LMHeadModel" in str(exc.value) and "LlamaForCausalLM" in str(exc.value)


def test_config_without_architectures_is_refused():
    with pytest.raises(UnsupportedArchitectureError, match="architectures"):
        arch_spec_for_config({"model_type": "llama"})


def test_duplicate_registration_is_rejected():
    with pytest.raises(ValueError, match="already registered"):
        register_arch(arch_spec("LlamaForCausalLM"))


def test_input_groups_must_cover_every_linear_once():
    with pytest.raises(ValueError, match="cover"):
        ArchSpec("X", "m.layers", "m.e", "m.n", "h", ("a", "b"), (InputGroup("norm", ("a",)),))
