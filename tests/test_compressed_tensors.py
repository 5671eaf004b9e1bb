"""The compressed-tensors writer: its tensors decompress bit for bit through compressed-tensors'
own decompressor, its config parses as compressed-tensors' own `QuantizationConfig`, and
transformers loads the folder to quantlab's logits. Needs the ``reference`` extra (CI has it)."""

from __future__ import annotations

import json

import pytest
import torch

from quantlab.errors import ConfigError, FormatError
from quantlab.formats import get_format, layouts, write_artifact
from quantlab.formats.loader import load
from quantlab.methods.gptq import GPTQConfig
from quantlab.methods.hqq import HQQConfig, quantize_hqq
from quantlab.methods.rtn import RTNConfig
from quantlab.methods.runner import quantize_model
from quantlab.models import load_model, resolve_model
from quantlab.primitives import quantize_rtn

ct = pytest.importorskip("compressed_tensors")
IDS = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
FMT = get_format("compressed-tensors")


@pytest.fixture(scope="module")
def calibration(tiny_models):
    from quantlab.data import CalibrationConfig, calibration_for

    ref = resolve_model(str(tiny_models["tiny-llama"]))
    cfg = CalibrationConfig(corpus="pydoc", split="all", n_samples=4, seq_len=64)
    return calibration_for(ref, cfg)[1]


def _scheme(qc: dict):
    """compressed-tensors' own parse of the config quantlab wrote (validates it too)."""
    from compressed_tensors.quantization import QuantizationConfig

    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.format == "pack-quantized" and parsed.quant_method == "compressed-tensors"
    (scheme,) = parsed.config_groups.values()
    return scheme


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_their_decompressor_gives_our_dequantized_weight_bit_for_bit(bits, group_size, sym):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(bits)) * 0.05
    qw = quantize_hqq(w, HQQConfig(bits=bits, group_size=group_size, sym=sym))
    packed = layouts.pack_compressed("w", qw)
    assert packed["weight_packed"].dtype == torch.int32
    assert ("weight_zero_point" in packed) == (not sym)
    qc = FMT.quantization_config("hqq", None, {"w": qw}, FMT.options())
    scheme = _scheme(qc)
    assert scheme.weights.num_bits == bits and scheme.weights.symmetric == sym
    # float32 scales: their dequantization then computes in float32, as quantlab's does
    state = {**packed, "weight_scale": packed["weight_scale"].float()}
    theirs = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
    assert torch.equal(theirs, qw.dequantize())
    back = layouts.unpack_compressed(
        "w", packed, bits=bits, group_size=group_size, sym=sym, dtype=torch.float32
    )
    for a, b in ((back.qweight, qw.qweight), (back.scales, qw.scales), (back.zeros, qw.zeros)):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "method, config",
    [
        ("rtn", RTNConfig(bits=4, group_size=64, sym=True)),
        ("hqq", HQQConfig(bits=8, group_size=-1)),
        ("gptq", GPTQConfig(bits=4, group_size=32, act_order=True, static_groups=True)),
    ],
)
def test_transformers_loads_what_quantlab_writes(
    tiny_models, calibration, tmp_path, method, config
):
    from transformers import AutoModelForCausalLM

    source = resolve_model(str(tiny_models["tiny-llama"]))
    model = load_model(source)
    calib = calibration if method == "gptq" else None
    result = quantize_model(model, source.folder.arch, method, config, calib, progress=False)
    out = write_artifact("compressed-tensors", tmp_path / "ct", source, result=result, model=model)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = _scheme(qc)
    assert scheme.weights.actorder == ("weight" if method == "gptq" else None)
    mine, checkpoint = load(out, dtype="float32")
    assert checkpoint.format == "compressed-tensors"
    assert set(checkpoint.weights) == set(result.weights)
    for name, qw in result.weights.items():
        assert torch.equal(checkpoint.weights[name].dequantize(), qw.dequantize()), name
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        a, b = mine(IDS).logits, theirs(IDS).logits
    assert float((a - b).abs().max() / b.abs().max()) < 1e-5
    assert FMT.size(out).linear_weights == sum(q.qweight.numel() for q in result.weights.values())


def test_what_compressed_tensors_cannot_hold_is_refused_before_any_work():
    from quantlab.workbench.config import parse_variant

    # act-order with static groups keeps groups consecutive: every such layout holds it
    for fmt, extra in (("awq", {}), ("compressed-tensors", {}), ("gguf", {"group_size": 32})):
        act = {"method": "gptq", "bits": 4, "act_order": True, "format": fmt, **extra}
        parse_variant({**act, "static_groups": True})
        with pytest.raises(ConfigError, match="g_idx"):
            parse_variant({**act, "static_groups": False})
    reason = FMT.preflight(RTNConfig(group_size=128), FMT.options(), {"m.down": (64, 576)})
    assert "not a multiple of group_size 128" in reason
    qw = quantize_rtn(torch.randn(8, 100), 4, 64, False)  # a shorter last group
    with pytest.raises(FormatError, match="not a multiple"):
        layouts.pack_compressed("m.w", qw)


# -- W8A8 INT8: int-quantized weights, dynamic per-token int8 activations ---------------------


def test_w8a8_int8_weights_decompress_bit_for_bit_and_the_config_is_their_preset():
    from compressed_tensors.compressors import IntQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0)) * 0.05
    qw = quantize_rtn(w, 8, -1, True)
    options = FMT.options(activations="int8")
    packed = FMT.pack("w", qw, options)
    assert packed["weight"].dtype == torch.int8 and packed["weight_scale"].shape == (48, 1)
    qc = FMT.quantization_config("rtn", None, {"w": qw}, options)
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.format == "int-quantized"
    (scheme,) = parsed.config_groups.values()
    preset = preset_name_to_scheme("W8A8", ["Linear"])
    assert scheme.weights == preset.weights and scheme.input_activations == preset.input_activations
    state = {**packed, "weight_scale": packed["weight_scale"].float()}
    theirs = IntQuantizationCompressor.decompress(state, scheme)["weight"]
    assert torch.equal(theirs, qw.dequantize())


def test_w8a8_int8_loads_in_transformers_with_the_same_activation_rounding(tiny_models, tmp_path):
    """transformers quantizes each linear's input per token for such a checkpoint; quantlab's
    loader simulates the same rounding: the logits agree bit for bit, and differ from the
    weight-only model's (the activations' rounding is in every measurement)."""
    from transformers import AutoModelForCausalLM

    source = resolve_model(str(tiny_models["tiny-llama"]))
    model = load_model(source)
    result = quantize_model(model, source.folder.arch, "rtn", RTNConfig(8, -1, True), None)
    out = write_artifact(
        "compressed-tensors", tmp_path / "w8a8", source, result=result, model=model,
        activations="int8", keep_dtype=True,
    )  # fmt: skip
    mine, checkpoint = load(out, dtype="float32")
    assert checkpoint.format == "compressed-tensors W8A8-INT8"
    assert checkpoint.activations.startswith("int8 per token")
    for name, qw in result.weights.items():
        assert torch.equal(checkpoint.weights[name].dequantize(), qw.dequantize()), name
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        a, b, weight_only = mine(IDS).logits, theirs(IDS).logits, model(IDS).logits
    assert torch.equal(a, b)
    assert float((a - weight_only).abs().max()) > 1e-4
    size = FMT.size(out)
    assert size.linear_weights == sum(q.qweight.numel() for q in result.weights.values())
    reports = []
    FMT.verify(out, lambda check, outcome: reports.append(check))
    assert "loads" in reports


def test_w8a8_int8_takes_only_8_bit_symmetric_per_channel_results():
    from quantlab.workbench.config import parse_variant

    ok = parse_variant(
        {"method": "gptq", "bits": 8, "group_size": -1, "sym": True, "act_order": False,
         "format": "compressed-tensors", "activations": "int8"}
    )  # fmt: skip
    assert ok.options.activations == "int8"
    for bad in ({"bits": 4, "group_size": -1, "sym": True}, {"bits": 8, "group_size": 128},
                {"bits": 8, "group_size": -1, "sym": False}):  # fmt: skip
        with pytest.raises(ConfigError, match="W8A8"):
            parse_variant({"method": "rtn", **bad, "activations": "int8"})
    with pytest.raises(ConfigError, match="activations must be one of"):
        FMT.options(activations="fp4")


# -- W8A8 FP8: e4m3 weights with channel scales, dynamic per-token fp8 activations --------------


def test_w8a8_fp8_is_made_from_the_unquantized_model_and_read_as_transformers_reads_it(
    tiny_models, tmp_path
):
    from compressed_tensors.compressors import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from quantlab.data import CalibrationConfig
    from quantlab.workbench.config import parse_variant
    from quantlab.workbench.produce import SharedInputs, produce

    variant = parse_variant({"format": "compressed-tensors", "activations": "fp8"})
    assert variant.method is None and variant.name == "compressed-tensors-fp8"
    with pytest.raises(ConfigError, match="give no method"):
        parse_variant({"method": "rtn", "bits": 8, "group_size": -1, "activations": "fp8"})
    source = resolve_model(str(tiny_models["tiny-qwen2"]))  # (biases on q/k/v)
    calib = CalibrationConfig(corpus="pydoc", n_samples=2, seq_len=32, allow_fallback=True)
    made = produce(variant, SharedInputs(source, calib), tmp_path / "fp8", progress=False)
    out = tmp_path / "fp8"
    assert made.format == "compressed-tensors W8A8-FP8"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.format == "float-quantized"
    (scheme,) = parsed.config_groups.values()
    preset = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    assert scheme.weights == preset.weights and scheme.input_activations == preset.input_activations
    mine, checkpoint = load(out, dtype="float32")
    assert checkpoint.activations.startswith("fp8 per token") and len(checkpoint.dense) == 14
    stored = load_file(out / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj"
    assert stored[f"{name}.weight"].dtype == torch.float8_e4m3fn
    state = {k: stored[f"{name}.{k}"] for k in ("weight", "weight_scale")}
    state["weight_scale"] = state["weight_scale"].float()
    theirs_w = FloatQuantizationCompressor.decompress(state, scheme)["weight"]
    assert torch.equal(theirs_w, mine.get_submodule(name).weight)
    # every weight within e4m3's rounding (3 mantissa bits: half a step is 1/16 relative)
    original = load_model(source).get_submodule(name).weight
    err = (mine.get_submodule(name).weight - original).abs()
    assert (err <= original.abs() / 16 + state["weight_scale"] * 2**-9).all()
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(mine(IDS).logits, theirs(IDS).logits)
    size = FMT.size(out)
    assert size.linear_weights == sum(
        p.numel() for n, p in stored.items() if n.endswith("proj.weight")
    )
