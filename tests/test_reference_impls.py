"""GPTQModel's and llm-compressor's GPTQ and AWQ on tiny models: what their checkpoints hold.

Each toolkit is optional; its tests skip when it is not installed. The whole file takes about 12 s
on two cores, plus 15-30 s once per machine: GPTQModel's first GPTQ run compiles its CPU packing
extension into ~/.cache/gptqmodel.

The layouts checked (``model.layers.0.self_attn.q_proj``, ``in`` = hidden size, ``out`` = heads x
head_dim, 4 bits, symmetric):

| checkpoint (impl, method)             | tensors                                                  |
|---------------------------------------|----------------------------------------------------------|
| GPTQ v1 (gptqmodel, gptq)             | qweight int32 (in/8, out), qzeros int32 (groups, out/8), |
|                                       | scales fp16 (groups, out), g_idx int32 (in,)             |
| AWQ GEMM (gptqmodel, awq)             | qweight int32 (in, out/8), qzeros int32 (groups, out/8), |
|                                       | scales bf16 (groups, out)                                |
| compressed-tensors (llmcompressor, *) | weight_packed int32 (out, in/8), weight_scale bf16       |
|                                       | (out, groups), weight_shape int64 [out, in]              |
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from quantlab.errors import ConfigError, DataError, QuantlabError
from quantlab.reference import available, run_reference

pytestmark = pytest.mark.toolkit

Q_PROJ = "model.layers.0.self_attn.q_proj"
GROUP = 64
BITS = 4
TOOLKIT_NAMES = {"gptqmodel": "GPTQModel", "llmcompressor": "llm-compressor"}


@pytest.fixture(scope="module")
def calib_ids() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(4, 64), dtype=np.int64)


def toolkit(impl: str) -> None:
    pytest.importorskip(impl)  # the impl names are the toolkits' import names


def tensors(folder, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor in the folder's safetensors files whose name starts with ``prefix.``."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if key.startswith(prefix + "."):
                    out[key.removeprefix(prefix + ".")] = f.get_tensor(key)
    return out


def q_proj_dims(model_dir) -> tuple[int, int]:
    cfg = json.loads((model_dir / "config.json").read_text())
    return cfg["hidden_size"], cfg["num_attention_heads"] * cfg["head_dim"]


def unpack_int32(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpack along the last dim, low bits first (GPTQ / AWQ / compressed-tensors order)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    return ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).flatten(-2)


def quantization_config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def quantize(impl, method, model_dir, ids, tmp_path, **kwargs):
    out = tmp_path / f"{impl}-{method}"
    run = run_reference(impl, method, model_dir, ids, out, bits=BITS, group_size=GROUP, **kwargs)
    assert run.out_dir == out and out.is_dir() and run.impl == impl and run.method == method
    assert run.seconds > 0 and run.save_seconds > 0 and run.dtype == "bfloat16"
    assert run.versions[impl] != "not installed"
    assert not list(tmp_path.glob(".*tmp-*")), "the atomic temp folder was left behind"
    assert set(tensors(out, "lm_head")) == {"weight"}  # lm_head stays unquantized
    return run


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen3"])
def test_gptqmodel_gptq_writes_gptq_v1(model, tiny_models, calib_ids, tmp_path):
    toolkit("gptqmodel")
    run = quantize("gptqmodel", "gptq", tiny_models[model], calib_ids, tmp_path)
    assert run.format == "gptq"
    qcfg = quantization_config(run.out_dir)
    assert (qcfg["quant_method"], qcfg["format"], qcfg["checkpoint_format"]) == ("gptq",) * 3
    assert (qcfg["bits"], qcfg["group_size"], qcfg["sym"], qcfg["desc_act"]) == (4, 64, True, False)
    assert qcfg["meta"]["act_group_aware"] is False and qcfg["meta"]["damp_percent"] == 0.01
    assert json.loads((run.out_dir / "quantize_config.json").read_text())["format"] == "gptq"

    d_in, d_out = q_proj_dims(tiny_models[model])
    t = tensors(run.out_dir, Q_PROJ)
    assert set(t) == {"qweight", "qzeros", "scales", "g_idx"}
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (d_in * BITS // 32, d_out)
    assert t["qzeros"].dtype == torch.int32 and t["qzeros"].shape == (d_in // GROUP, d_out // 8)
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (d_in // GROUP, d_out)
    assert torch.equal(t["g_idx"], torch.arange(d_in, dtype=torch.int32) // GROUP)
    # GPTQ v1 stores zero - 1: a symmetric 4-bit zero point of 8 is written as 7 (0x77777777)
    assert torch.all(unpack_int32(t["qzeros"], BITS) == 7)
    assert torch.all(t["scales"] > 0)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen3"])
def test_gptqmodel_awq_writes_awq_gemm(model, tiny_models, calib_ids, tmp_path):
    toolkit("gptqmodel")
    run = quantize("gptqmodel", "awq", tiny_models[model], calib_ids, tmp_path)
    assert run.format == "awq-gemm"
    qcfg = quantization_config(run.out_dir)
    assert (qcfg["quant_method"], qcfg["format"], qcfg["version"]) == ("awq", "gemm", "gemm")
    assert (qcfg["bits"], qcfg["group_size"], qcfg["zero_point"]) == (4, 64, False)

    d_in, d_out = q_proj_dims(tiny_models[model])
    t = tensors(run.out_dir, Q_PROJ)
    assert set(t) == {"qweight", "qzeros", "scales"}
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (d_in, d_out * BITS // 32)
    assert t["qzeros"].dtype == torch.int32 and t["qzeros"].shape == (d_in // GROUP, d_out // 8)
    assert t["scales"].dtype == torch.bfloat16 and t["scales"].shape == (d_in // GROUP, d_out)
    # AWQ stores the zero point itself: 8 for symmetric 4-bit
    assert torch.all(unpack_int32(t["qzeros"], BITS) == 8)


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen3"])
def test_llmcompressor_writes_pack_quantized(method, model, tiny_models, calib_ids, tmp_path):
    toolkit("llmcompressor")
    run = quantize("llmcompressor", method, tiny_models[model], calib_ids, tmp_path)
    assert run.format == "compressed-tensors pack-quantized"
    qcfg = quantization_config(run.out_dir)
    assert (qcfg["quant_method"], qcfg["format"]) == ("compressed-tensors", "pack-quantized")
    assert qcfg["ignore"] == ["lm_head"] and list(qcfg["config_groups"]) == ["group_0"]
    weights = qcfg["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["type"], weights["symmetric"]) == (4, "int", True)
    assert (weights["strategy"], weights["group_size"], weights["actorder"]) == ("group", 64, None)
    assert qcfg["config_groups"]["group_0"]["input_activations"] is None

    d_in, d_out = q_proj_dims(tiny_models[model])
    t = tensors(run.out_dir, Q_PROJ)
    assert set(t) == {"weight_packed", "weight_scale", "weight_shape"}  # symmetric: no zero point
    assert t["weight_packed"].dtype == torch.int32
    assert t["weight_packed"].shape == (d_out, d_in * BITS // 32)
    assert t["weight_scale"].dtype == torch.bfloat16
    assert t["weight_scale"].shape == (d_out, d_in // GROUP)
    assert t["weight_shape"].tolist() == [d_out, d_in]


@pytest.mark.parametrize("impl", ["gptqmodel", "llmcompressor"])
def test_act_order_reaches_the_toolkit(impl, tiny_models, calib_ids, tmp_path):
    toolkit(impl)
    run = quantize(impl, "gptq", tiny_models["tiny-qwen3"], calib_ids, tmp_path, act_order=True)
    qcfg = quantization_config(run.out_dir)
    t = tensors(run.out_dir, Q_PROJ)
    if impl == "gptqmodel":  # desc_act: groups follow the activation order, recorded in g_idx
        assert qcfg["desc_act"] is True
        g_idx = t["g_idx"]
        assert not torch.equal(g_idx, torch.sort(g_idx).values)
        assert torch.bincount(g_idx).tolist() == [GROUP] * (len(g_idx) // GROUP)
    else:  # "weight": solved in activation order, groups stay contiguous, so no g_idx
        assert qcfg["config_groups"]["group_0"]["weights"]["actorder"] == "weight"
        assert "weight_g_idx" not in t


@pytest.mark.parametrize(("impl", "method"), [("gptqmodel", "awq"), ("llmcompressor", "gptq")])
def test_asymmetric_checkpoints_carry_zero_points(impl, method, tiny_models, calib_ids, tmp_path):
    toolkit(impl)
    model = tiny_models["tiny-qwen3"]
    run = quantize(impl, method, model, calib_ids, tmp_path, sym=False)
    qcfg = quantization_config(run.out_dir)
    d_in, d_out = q_proj_dims(model)
    t = tensors(run.out_dir, Q_PROJ)
    if impl == "gptqmodel":
        assert qcfg["zero_point"] is True
        assert len(unpack_int32(t["qzeros"], BITS).unique()) > 1
    else:  # the zero points are packed along the output dimension
        assert qcfg["config_groups"]["group_0"]["weights"]["symmetric"] is False
        assert t["weight_zero_point"].dtype == torch.int32
        assert t["weight_zero_point"].shape == (d_out * BITS // 32, d_in // GROUP)


@pytest.mark.parametrize("impl", ["gptqmodel", "llmcompressor"])
def test_toolkit_failure_is_a_quantlab_error_and_leaves_no_folder(
    impl, tiny_models, calib_ids, tmp_path
):
    toolkit(impl)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["tiny-llama"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated: the toolkit's load fails
    out = tmp_path / "out"
    with pytest.raises(QuantlabError, match=TOOLKIT_NAMES[impl]):
        run_reference(impl, "gptq", broken, calib_ids, out, group_size=GROUP)
    assert not out.exists() and not list(tmp_path.glob(".*tmp-*"))


def test_bad_names_and_settings_are_refused(tiny_models, calib_ids, tmp_path):
    model = tiny_models["tiny-llama"]
    out = tmp_path / "out"
    for impl, method, kwargs in [
        ("autogptq", "gptq", {}),
        ("gptqmodel", "gguf", {}),
        ("gptqmodel", "awq", {"act_order": True}),
        ("llmcompressor", "gptq", {"group_size": 0}),
        ("llmcompressor", "gptq", {"bits": 5}),
    ]:
        with pytest.raises(QuantlabError):
            run_reference(impl, method, model, calib_ids, out, **kwargs)
    with pytest.raises(DataError, match="integer"):
        run_reference("gptqmodel", "gptq", model, calib_ids.astype(np.float32), out)
    with pytest.raises(DataError, match="outside the model's vocabulary"):  # GPTQModel swaps them
        run_reference("gptqmodel", "gptq", model, calib_ids + 320, out)
    with pytest.raises(ConfigError, match="known: gptqmodel, llmcompressor"):
        available("auto-gptq")
    out.mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        run_reference("gptqmodel", "gptq", model, calib_ids, out)


def test_gptqmodel_refuses_rows_it_would_drop(tiny_models, tmp_path):
    toolkit("gptqmodel")
    ids = np.zeros((4, 8), dtype=np.int64)  # GPTQModel drops rows of <= 10 tokens
    with pytest.raises(ConfigError, match="shorter than 11 tokens"):
        run_reference("gptqmodel", "gptq", tiny_models["tiny-llama"], ids, tmp_path / "out")


def test_importing_quantlab_reference_imports_no_toolkit():
    code = (
        "import sys, quantlab.reference as r; r.available('gptqmodel'); "
        "r.available('llmcompressor'); "
        "assert not {'gptqmodel', 'llmcompressor', 'torch'} & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
