"""Interoperability with third-party loaders and writers (run where they are installed; CI installs
the ``reference`` extra). Logits are compared in float16 - the dtype GPTQModel's CPU kernels run -
as ``max |a - b| / max |b|`` over two 32-token sequences."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from quantlab.formats import write_artifact
from quantlab.formats.loader import load
from quantlab.methods.gptq import GPTQConfig
from quantlab.methods.rtn import RTNConfig
from quantlab.methods.runner import quantize_model
from quantlab.models import load_model, resolve_model

pytestmark = pytest.mark.toolkit

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
IDS = torch.randint(0, 250, (2, 32), generator=torch.Generator().manual_seed(0))


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max())


def ours(path, dtype="float16") -> torch.Tensor:
    model, _ = load(path, dtype=dtype)
    with torch.no_grad():
        return model(IDS).logits


def gptqmodel_logits(path, backend: str) -> tuple[torch.Tensor, str]:
    gptqmodel = pytest.importorskip("gptqmodel")
    model = gptqmodel.GPTQModel.load(
        str(path), backend=getattr(gptqmodel.BACKEND, backend), device="cpu", dtype=torch.float16
    )
    kernel = type(model.model.model.layers[0].self_attn.q_proj).__name__
    with torch.no_grad():
        return model.model(IDS).logits, kernel


def calibration_ids(n=8, seq=64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 250, size=(n, seq), dtype=np.int64)


@pytest.fixture(scope="module")
def ours_written(tiny_models, tmp_path_factory):
    """quantlab GPTQ (calibrated, act-order) and AWQ-format checkpoints of tiny-llama."""
    from quantlab.data.calibration import CalibrationConfig, CalibrationSet, hash_token_ids

    root = tmp_path_factory.mktemp("ours")
    source = resolve_model(str(tiny_models["tiny-llama"]))
    ids = calibration_ids()
    calib = CalibrationSet(
        ids, CalibrationConfig("random", None, 8, 64), "random", "-", ids.size, hash_token_ids(ids)
    )
    out = {}
    for fmt, method, config in (
        (
            "gptq",
            "gptq",
            GPTQConfig(bits=4, group_size=64, sym=True, act_order=True, static_groups=False),
        ),
        ("awq", "rtn", RTNConfig(bits=4, group_size=64, sym=False)),
    ):
        model = load_model(source)
        result = quantize_model(
            model, source.folder.arch, method, config, calib if method != "rtn" else None,
            progress=False,
        )  # fmt: skip
        out[fmt] = write_artifact(fmt, root / fmt, source, result=result, model=model)
    return out


def test_gptqmodel_reads_quantlab_gptq(ours_written):
    theirs, kernel = gptqmodel_logits(ours_written["gptq"], "GPTQ_TORCH")
    assert kernel == "TorchLinear"
    assert rel_diff(theirs, ours(ours_written["gptq"])) < 1e-3


def test_gptqmodel_reads_quantlab_awq(ours_written):
    theirs, kernel = gptqmodel_logits(ours_written["awq"], "AWQ_TORCH")
    assert kernel == "AwqTorchLinear"
    assert rel_diff(theirs, ours(ours_written["awq"])) < 1e-3


def test_transformers_reads_quantlab_gptq(ours_written):
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    from transformers import AutoModelForCausalLM, GPTQConfig

    path = ours_written["gptq"]
    # backend "torch": GPTQModel's reference kernel; the default on this CPU is its ATen int4
    # kernel, which computes less exactly (about 7e-3 here), so it gets a looser bound
    for backend, bound in (("torch", 1e-3), (None, 2e-2)):
        kwargs = {"quantization_config": GPTQConfig(bits=4, backend=backend)} if backend else {}
        model = AutoModelForCausalLM.from_pretrained(
            path, device_map="cpu", dtype=torch.float16, **kwargs
        )
        with torch.no_grad():
            theirs = model(IDS).logits
        assert rel_diff(theirs, ours(path)) < bound, backend


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_quantlab_reads_gptqmodel_checkpoints(tiny_models, tmp_path, method):
    from quantlab.reference import available, run_reference

    if not available("gptqmodel"):
        pytest.skip("gptqmodel is not installed")
    run = run_reference(
        "gptqmodel",
        method,
        tiny_models["tiny-llama"],
        calibration_ids(),
        tmp_path / "ckpt",
        group_size=64,
        sym=method == "gptq",
    )
    model, checkpoint = load(run.out_dir, dtype="float16")
    assert checkpoint.format == ("gptq" if method == "gptq" else "awq")
    theirs, _ = gptqmodel_logits(run.out_dir, "GPTQ_TORCH" if method == "gptq" else "AWQ_TORCH")
    with torch.no_grad():
        assert rel_diff(theirs, model(IDS).logits) < 1e-3


def test_quantlab_reads_llmcompressor_w4a16(tiny_models, tmp_path):
    from quantlab.reference import available, run_reference

    if not available("llmcompressor"):
        pytest.skip("llmcompressor is not installed")
    from transformers import AutoModelForCausalLM

    run = run_reference(
        "llmcompressor", "gptq", tiny_models["tiny-llama"], calibration_ids(), tmp_path / "ckpt",
        group_size=64,
    )  # fmt: skip
    model, checkpoint = load(run.out_dir, dtype="float32")
    assert checkpoint.format == "compressed-tensors"
    # transformers decompresses compressed-tensors checkpoints through compressed-tensors itself
    theirs = AutoModelForCausalLM.from_pretrained(run.out_dir, dtype=torch.float32)
    with torch.no_grad():
        assert rel_diff(theirs(IDS).logits, model(IDS).logits) < 1e-3


def mean_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().mean() / b.abs().mean())


@pytest.mark.slow
def test_gptqmodel_and_transformers_read_quantlab_gptq_of_the_default_model(
    default_model, tmp_path
):
    """576 with group 128 (a short last group), which GPTQModel's torch kernel reads. Thirty fp16
    layers with SmolLM2's massive activations drift from fp32 by up to ~0.2 of the largest logit
    at single positions (quantlab's own fp16 run drifts as much), so the checkpoint is compared
    weight by weight (exact) and the logits on average."""
    pytest.importorskip("gptqmodel")
    from transformers import AutoModelForCausalLM, GPTQConfig

    model = load_model(default_model)
    config = RTNConfig(bits=4, group_size=128, sym=True)
    result = quantize_model(model, default_model.folder.arch, "rtn", config, None, progress=False)
    path = write_artifact("gptq", tmp_path / "gptq", default_model, result=result, model=model)
    mine = ours(path, dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(
        path, device_map="cpu", dtype=torch.float16,
        quantization_config=GPTQConfig(bits=4, backend="torch"),
    )  # fmt: skip
    theirs, kernel = gptqmodel_logits(path, "GPTQ_TORCH")
    assert kernel == "TorchLinear"
    for name, qw in result.weights.items():
        module = hf.get_submodule(name)
        assert torch.equal(module.dequantize_weight().T.float(), qw.dequantize().half().float())
    with torch.no_grad():
        hf_logits = hf(IDS).logits
    for logits in (theirs, hf_logits):
        assert mean_rel_diff(logits, mine) < 5e-3
        assert (logits.argmax(-1) == mine.argmax(-1)).float().mean() > 0.9


def test_gptqmodel_reads_per_module_bits_from_dynamic(tiny_models, tmp_path):
    """A fit's GPTQ checkpoint: 4-bit base, q/k/v of one block at 8 bits and group 32, one
    down_proj at 3 bits (GPTQModel's ``dynamic``): GPTQModel builds each module with its own
    bits and computes what quantlab computes."""
    source = resolve_model(str(tiny_models["tiny-llama"]))
    model = load_model(source)
    own = {
        **{
            f"model.layers.0.self_attn.{n}_proj": RTNConfig(bits=8, group_size=32, sym=True)
            for n in ("q", "k", "v")
        },
        "model.layers.1.mlp.down_proj": RTNConfig(bits=3, group_size=64, sym=True),
    }
    result = quantize_model(
        model, source.folder.arch, "rtn", RTNConfig(bits=4, group_size=64, sym=True), None,
        progress=False, overrides=own,
    )  # fmt: skip
    path = write_artifact("gptq", tmp_path / "mixed", source, result=result, model=model)
    theirs, _ = gptqmodel_logits(path, "GPTQ_TORCH")
    gptqmodel = pytest.importorskip("gptqmodel")
    loaded = gptqmodel.GPTQModel.load(
        str(path), backend=gptqmodel.BACKEND.GPTQ_TORCH, device="cpu", dtype=torch.float16
    )
    layers = loaded.model.model.layers
    assert layers[0].self_attn.q_proj.bits == 8 and layers[0].self_attn.q_proj.group_size == 32
    assert layers[1].mlp.down_proj.bits == 3 and layers[1].mlp.up_proj.bits == 4
    assert rel_diff(theirs, ours(path)) < 1e-3
