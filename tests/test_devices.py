"""One device setting everywhere (#21), tested on the CPU: resolution and its errors, the block
walk's placement logic (the GPU code path run with the CPU standing in for the device), stage
timing, out-of-memory errors that name the block and leave nothing behind, synthetic models with
real architectures' shapes, and measured VRAM in the report. The same checks on a real GPU are in
tests/test_gpu.py (skipped without one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantlab.cli import main
from quantlab.data import CalibrationConfig, calibration_for
from quantlab.devices import StageClock, check_device_spec, device_oom, resolve_device
from quantlab.errors import ConfigError, QuantlabError
from quantlab.methods import get_method
from quantlab.methods import runner as runner_mod
from quantlab.methods.runner import quantize_model
from quantlab.models import load_model, resolve_model
from quantlab.models.synthetic import SHAPES, synthetic_tensors, write_shape

NO_GPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def calib(tiny_models):
    ref = resolve_model(str(tiny_models["tiny-qwen2"]))
    cfg = CalibrationConfig(corpus="pydoc", split="all", n_samples=4, seq_len=64, seed=0)
    return calibration_for(ref, cfg)[1]


def test_device_settings_resolve_or_name_the_problem():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cpu" if NO_GPU else "cuda:0")
    for bad in ("gpu", "cuda:", "CUDA", "cuda:x", ""):
        with pytest.raises(ConfigError, match="device must be"):
            check_device_spec(bad)
    if NO_GPU:
        with pytest.raises(QuantlabError, match="no GPU is visible"):
            resolve_device("cuda")
    else:
        with pytest.raises(QuantlabError, match="GPU\\(s\\) are visible"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_the_stage_clock_counts_nested_stages_once(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("quantlab.devices.time.perf_counter", lambda: now[0])
    clock = StageClock("cpu")
    with clock.stage("forward"):
        now[0] += 1.0
        with clock.stage("solve"):
            now[0] += 5.0
        now[0] += 2.0
    with clock.stage("solve"):
        now[0] += 1.5
    assert clock.seconds == {"forward": 3.0, "solve": 6.5}
    assert clock.report() == {"seconds": {"forward": 3.0, "solve": 6.5}}


@pytest.mark.parametrize(("method", "dtype"), [("gptq", "float32"), ("awq", "bfloat16")])
def test_the_device_path_places_one_block_at_a_time_and_changes_nothing(
    tiny_models, calib, monkeypatch, method, dtype
):
    """The walk's GPU code path (the block moved to the device, or copied there in bf16, and
    everything the method made brought back), run with the CPU standing in for the device: the
    same tensors bit for bit, only the current block ever moved, the sink handed CPU tensors."""
    ref = resolve_model(str(tiny_models["tiny-qwen2"]))
    config = get_method(method).config_cls(bits=4, group_size=64)
    plain = quantize_model(
        load_model(ref), ref.folder.arch, method, config, calib, calib_dtype=dtype, progress=False
    )

    model = load_model(ref)
    blocks = list(model.get_submodule(ref.folder.arch.blocks))
    index = {id(b): i for i, b in enumerate(blocks)}
    moved, current, seen = [], [None], []
    original_to = torch.nn.Module.to

    def spy_to(self, *args, **kwargs):
        if id(self) in index:
            moved.append((current[0], index[id(self)]))
        return original_to(self, *args, **kwargs)

    original_run_block = runner_mod.run_block

    def tracking_run_block(spec, cfg, prefix, block, *args, **kwargs):
        current[0] = index[id(block)]
        return original_run_block(spec, cfg, prefix, block, *args, **kwargs)

    def sink(done):
        for qw in done.weights.values():
            seen.extend(t.device.type for t in (qw.qweight, qw.scales, qw.zeros, qw.g_idx))
        seen.extend(t.device.type for t in done.modified.values())
        kept.weights.update(done.weights)
        kept.modified.update(done.modified)

    kept = plain.__class__(method, config, {}, {}, {}, 0, {}, None, 0.0)
    monkeypatch.setattr(runner_mod, "is_gpu", lambda device: True)
    monkeypatch.setattr(runner_mod, "_activations_fit", lambda *args: True)  # (asks the GPU)
    monkeypatch.setattr(torch.nn.Module, "to", spy_to)
    monkeypatch.setattr(runner_mod, "run_block", tracking_run_block)
    result = quantize_model(
        model, ref.folder.arch, method, config, calib, calib_dtype=dtype, progress=False, sink=sink
    )
    monkeypatch.undo()
    if dtype == "float32":  # the block itself goes to the device (bf16: a compute copy does)
        assert moved, "the device path moved no block"
    assert all(at == which for at, which in moved), moved  # only the block being computed
    assert set(seen) == {"cpu"}
    assert result.device == "cpu"
    assert set(kept.weights) == set(plain.weights)
    for name, qw in plain.weights.items():
        other = kept.weights[name]
        for a, b in zip(
            (qw.qweight, qw.scales, qw.zeros, qw.g_idx),
            (other.qweight, other.scales, other.zeros, other.g_idx),
            strict=True,
        ):
            assert torch.equal(a, b), name
    for name, value in plain.modified.items():
        assert torch.equal(value, kept.modified[name]), name


def test_offloaded_activations_give_the_same_result(tiny_models, calib):
    """``offload``: the activations between blocks stay on the CPU and each chunk goes to the
    block's device; with the CPU as both, the result is unchanged bit for bit."""
    ref = resolve_model(str(tiny_models["tiny-qwen2"]))
    config = get_method("gptq").config_cls(bits=4, group_size=64, act_order=True)
    runs = [
        quantize_model(
            load_model(ref), ref.folder.arch, "gptq", config, calib, progress=False, offload=off
        )
        for off in (False, True)
    ]
    for name, qw in runs[0].weights.items():
        assert torch.equal(qw.qweight, runs[1].weights[name].qweight)
        assert torch.equal(qw.scales, runs[1].weights[name].scales)


def test_the_walk_times_every_stage(tiny_models, calib):
    ref = resolve_model(str(tiny_models["tiny-llama"]))
    config = get_method("gptq").config_cls(bits=4, group_size=64)
    result = quantize_model(load_model(ref), ref.folder.arch, "gptq", config, calib, progress=False)
    stages = result.stage_seconds
    assert {"capture", "copy", "forward", "hessians", "solve", "write", "blocks"} <= set(stages)
    assert all(v >= 0 for v in stages.values())
    # exclusive stages add up to no more than the walk
    assert sum(v for k, v in stages.items() if k != "blocks") <= result.seconds + 1e-6
    assert result.stage_peak_bytes == {}  # peaks are device memory: none on the CPU


def test_out_of_memory_names_the_block_and_leaves_nothing(
    tiny_models, monkeypatch, tmp_path, capsys
):
    """An allocation failure inside a block (injected: what torch raises when a device is
    full) ends the run with one line - where, how much, what to lower - and no artifact."""
    from quantlab.methods import gptq

    calls = []
    real = gptq.gptq_quantize

    def failing(W, H, cfg, **kwargs):
        calls.append(1)
        if len(calls) > 4:  # the second block
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of "
                "23.6 GiB of which 1.2 GiB is free."
            )
        return real(W, H, cfg, **kwargs)

    monkeypatch.setattr(gptq, "gptq_quantize", failing)
    for streaming in ([], ["--streaming"]):
        out = tmp_path / f"out{len(streaming)}"
        calls.clear()
        rc = main(
            ["quantize", str(tiny_models["tiny-llama"]), "--method", "gptq", "--format", "gptq",
             "--calib", "pydoc", "--split", "all", "--n-samples", "4", "--seq-len", "64",
             "--device", "cpu", "--out", str(out), *streaming]
        )  # fmt: skip
        err = capsys.readouterr().err
        assert rc == 2
        line = [x for x in err.splitlines() if x.startswith("quantlab: error:")]
        assert len(line) == 1, err
        assert "out of host memory on cpu in block model.layers.1 (gptq)" in line[0]
        assert "2.50 GiB" in line[0] and "4 x 64" in line[0] and "bfloat16" in line[0]
        assert not out.exists()
        assert not list(tmp_path.glob(f".{out.name}*")), "a temporary folder was left behind"


def test_device_oom_passes_other_errors_through():
    with pytest.raises(ValueError, match="not memory"), device_oom("x", "cpu", "advice"):
        raise ValueError("not memory")


def test_every_synthetic_shape_matches_its_architecture():
    """The synthetic writer's tensors for every shape are exactly what transformers builds from
    the same config (names and shapes; checked on the meta device, nothing written)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for name, spec in SHAPES.items():
        config = AutoConfig.for_model(
            spec.model_type,
            hidden_size=spec.hidden,
            intermediate_size=spec.intermediate,
            num_hidden_layers=2,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads,
            vocab_size=spec.vocab,
            tie_word_embeddings=spec.tie,
        )
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if spec.tie:
            expected.pop("lm_head.weight")
        block = synthetic_tensors(spec.hidden, spec.intermediate, spec.heads, spec.kv_heads,
                                  spec.bias)  # fmt: skip
        ours = {f"model.layers.{i}.{k}": v for i in range(2) for k, v in block.items()}
        ours["model.embed_tokens.weight"] = (spec.vocab, spec.hidden)
        ours["model.norm.weight"] = (spec.hidden,)
        if not spec.tie:
            ours["lm_head.weight"] = (spec.vocab, spec.hidden)
        assert ours == expected, name
    # the parameter counts of the real models (their model cards / config totals)
    assert SHAPES["llama-3-8b"].parameters() == 8_030_261_248
    assert SHAPES["qwen2.5-0.5b"].parameters() == 494_032_768
    assert SHAPES["mistral-7b"].parameters() == 7_248_023_552
    assert SHAPES["llama-3-70b"].parameters() == 70_553_706_496


def test_a_synthetic_shape_streams_through_gptq(tmp_path, capsys):
    """A real shape (Qwen2.5-0.5B's, one block: its 152k-token vocabulary and q/k/v biases)
    written by `quantlab synthetic` and quantized by streaming on --device cpu, stages printed."""
    src = tmp_path / "q05"
    assert main(["synthetic", "qwen2.5-0.5b", "--layers", "1", "--out", str(src)]) == 0
    config = json.loads((src / "config.json").read_text())
    assert config["vocab_size"] == 151936 and config["tie_word_embeddings"] is True
    assert main(["synthetic", "qwen2.5-0.5b", "--out", str(src)]) == 2  # exists: refused
    capsys.readouterr()
    out = tmp_path / "q05-gptq"
    rc = main(
        ["quantize", str(src), "--method", "gptq", "--format", "gptq", "--streaming",
         "--calib", "pydoc", "--split", "all", "--n-samples", "2", "--seq-len", "32",
         "--device", "cpu", "--out", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "stages on cpu: capture" in printed and "solve" in printed
    from quantlab.verify import verify

    verify(out)
    with pytest.raises(QuantlabError, match="layers must be"):
        write_shape("qwen2.5-0.5b", tmp_path / "x", layers=99)


def test_run_configs_take_a_device(tmp_path):
    from quantlab.workbench.config import parse_run_config

    base = {"name": "r", "model": "tiny-llama", "variants": [{}]}
    assert parse_run_config(base).device == "auto"
    assert parse_run_config({**base, "device": "cuda:1", "offload": True}).device == "cuda:1"
    with pytest.raises(ConfigError, match="device must be"):
        parse_run_config({**base, "device": "gpu0"})
    with pytest.raises(ConfigError, match="offload"):
        parse_run_config({**base, "offload": "yes"})


@pytest.mark.skipif(not NO_GPU, reason="checks the message of a machine without a GPU")
def test_asking_for_a_gpu_without_one_is_one_line(tiny_models, tmp_path, capsys):
    rc = main(["eval", str(tiny_models["tiny-llama"]), "--ppl", "pydoc", "--split", "all",
               "--max-tokens", "64", "--context", "32", "--device", "cuda"])  # fmt: skip
    assert rc == 2
    assert "no GPU is visible" in capsys.readouterr().err


def test_measured_vram_shows_in_the_report_with_the_planners_error(tiny_models):
    """A GPU evaluation's measured VRAM goes into the results table beside the planner's
    estimate for the artifact, with the error; CPU rows have no such column."""
    from quantlab.eval.measure import MemoryResult
    from quantlab.workbench.plan import planned_vram
    from quantlab.workbench.report import results_table

    class Row:
        def __init__(self, memory):
            from quantlab.eval.harness import Metrics

            self.metrics = Metrics("t", "transformers", "0" * 64, memory=memory)
            self.variant, self.format, self.timings, self.variant_config = "v", "gptq", {}, {}
            self.artifact = None

    header, _ = results_table([Row(MemoryResult(peak_rss_bytes=2**30))])
    assert not any("VRAM" in h for h in header)
    config = json.loads((Path(tiny_models["tiny-llama"]) / "config.json").read_text())
    planned = planned_vram(config, 50 * 2**20, 2048)
    measured = MemoryResult(
        peak_rss_bytes=2**30,
        cuda_peak_bytes=300 * 2**20,
        cuda_reserved_bytes=400 * 2**20,
        device="cuda:0 (NVIDIA H200)",
        planned_bytes=planned,
    )
    assert measured.vram_bytes == 400 * 2**20
    header, body = results_table([Row(measured)])
    column = header.index("VRAM MiB (planned, error)")
    error = 100 * (planned / (400 * 2**20) - 1)
    assert body[0][column] == f"400 ({planned / 2**20:,.0f}, {error:+.0f}%)"
