"""The device path on a real GPU (#21): skipped without one; run by bench/gpu_check.sh.

CPU and GPU quantizations agree (codes may differ at rounding ties; the stated tolerance is 1 % of
codes off by one at most, scales within 1e-3); only the block being computed is ever on the GPU;
a full GPU gives one line and no artifact; evaluation on the GPU measures VRAM and gives the same
KLD as on the CPU within noise."""

from __future__ import annotations

import pytest
import torch

from quantlab.cli import main
from quantlab.data import CalibrationConfig, calibration_for
from quantlab.eval.harness import EvalConfig, evaluate
from quantlab.eval.perplexity import PerplexityConfig
from quantlab.methods import get_method
from quantlab.methods import runner as runner_mod
from quantlab.methods.runner import quantize_model
from quantlab.models import load_model, resolve_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def calib(tiny_models):
    ref = resolve_model(str(tiny_models["tiny-qwen2"]))
    cfg = CalibrationConfig(corpus="pydoc", split="all", n_samples=8, seq_len=128, seed=0)
    return calibration_for(ref, cfg)[1]


def _agree(a, b, share: float) -> None:
    """Codes at most one step apart, at most ``share`` of them differing; scales within 1e-3."""
    for name, qa in a.weights.items():
        qb = b.weights[name]
        diff = (qa.qweight.int() - qb.qweight.int()).abs()
        assert diff.max() <= 1 and diff.float().mean() <= share, (name, diff.float().mean())
        assert torch.allclose(qa.scales, qb.scales, rtol=1e-3, atol=1e-6), name


@pytest.mark.parametrize(
    ("method", "dtype", "settings", "share"),
    [
        ("gptq", "float32", {}, 0.01),
        ("rtn", "float32", {}, 0.01),
        # the CPU screens AWQ's grid with bf16 products (screen=3), a GPU does not: fp32 on both
        ("awq", "float32", {"screen": 0}, 0.01),
        # bf16 forwards differ by bf16 ulps on each device, compounding over the blocks
        ("gptq", "bfloat16", {}, 0.05),
    ],
)
def test_gpu_quantization_agrees_with_the_cpu(tiny_models, calib, method, dtype, settings, share):
    ref = resolve_model(str(tiny_models["tiny-qwen2"]))
    config = get_method(method).config_cls(bits=4, group_size=64, **settings)
    runs = {}
    for device in ("cpu", "cuda"):
        model = load_model(ref)
        runs[device] = quantize_model(
            model, ref.folder.arch, method, config, calib, calib_dtype=dtype, device=device,
            progress=False,
        )  # fmt: skip
        assert {p.device.type for p in model.parameters()} == {"cpu"}  # the master came back
    assert runs["cuda"].device.startswith("cuda")
    assert runs["cuda"].stage_peak_bytes  # measured per stage
    _agree(runs["cpu"], runs["cuda"], share)


def test_only_the_current_block_is_on_the_gpu(tiny_models, calib, monkeypatch):
    ref = resolve_model(str(tiny_models["tiny-llama"]))
    model = load_model(ref)
    blocks = list(model.get_submodule(ref.folder.arch.blocks))
    real = runner_mod.run_block
    checked = []

    def checking(spec, cfg, prefix, block, *args, **kwargs):
        for other in blocks:
            devices = {p.device.type for p in other.parameters()}
            assert devices == {"cpu"}, f"{prefix}: another block is on {devices}"
        ctx, hidden = real(spec, cfg, prefix, block, *args, **kwargs)
        assert {p.device.type for p in block.parameters()} == {"cuda"}  # fp32: moved itself
        checked.append(prefix)
        return ctx, hidden

    def sink(done):
        for qw in done.weights.values():
            assert qw.qweight.device.type == "cpu"

    monkeypatch.setattr(runner_mod, "run_block", checking)
    config = get_method("gptq").config_cls(bits=4, group_size=64)
    quantize_model(model, ref.folder.arch, "gptq", config, calib, device="cuda", sink=sink,
                   progress=False)  # fmt: skip
    assert len(checked) == len(blocks)


def test_a_full_gpu_gives_one_line_and_no_artifact(tiny_models, tmp_path, capsys):
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, 2**20 / total))  # 1 MiB
    try:
        out = tmp_path / "out"
        rc = main(
            ["quantize", str(tiny_models["tiny-llama"]), "--method", "gptq", "--format", "gptq",
             "--calib", "pydoc", "--split", "all", "--n-samples", "8", "--seq-len", "128",
             "--device", "cuda", "--out", str(out)]
        )  # fmt: skip
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    err = capsys.readouterr().err
    assert rc == 2
    assert "out of device memory on cuda:0" in err and "--offload" in err
    assert not out.exists()


def test_evaluation_on_the_gpu_measures_vram_and_matches_the_cpu(tiny_models, tmp_path, capsys):
    ref = str(tiny_models["tiny-llama"])
    out = tmp_path / "gptq"
    assert main(["quantize", ref, "--method", "gptq", "--format", "gptq", "--calib", "pydoc",
                 "--split", "all", "--n-samples", "8", "--seq-len", "128", "--device", "cuda",
                 "--out", str(out)]) == 0  # fmt: skip
    assert "stages on cuda:0" in capsys.readouterr().out
    config = EvalConfig(
        perplexity=(PerplexityConfig(corpus="pydoc", split="all", context=128, max_tokens=2048),),
        kld=True,
    )
    on = {d: evaluate(str(out), config, reference=ref, device=d) for d in ("cpu", "cuda")}
    memory = on["cuda"].memory
    assert memory.vram_bytes and memory.vram_bytes >= memory.cuda_peak_bytes > 0
    assert memory.device.startswith("cuda:0 (")
    assert on["cpu"].memory.vram_bytes is None
    assert on["cuda"].kld.mean == pytest.approx(on["cpu"].kld.mean, rel=0.05, abs=1e-4)
    assert on["cuda"].perplexity[0].ppl == pytest.approx(on["cpu"].perplexity[0].ppl, rel=1e-3)
