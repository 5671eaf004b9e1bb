"""quantlab quantize -> native artifact -> quantlab eval, with checksums and corrupt inputs."""

import json

import pytest
import torch

from quantlab.cli import main
from quantlab.errors import CorruptFileError
from quantlab.eval.harness import EvalConfig, evaluate, open_runner
from quantlab.eval.perplexity import PerplexityConfig
from quantlab.formats.native import MANIFEST, apply_native, read_native


@pytest.fixture(scope="module")
def artifact(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "gptq"
    code = main(
        [
            "quantize",
            str(tiny_models["tiny-qwen3"]),
            "--method",
            "gptq",
            "--bits",
            "4",
            "--group-size",
            "64",
            "--act-order",
            "--no-static-groups",  # act-order's g_idx (static groups, the default, has none)
            "--calib",
            "pydoc",
            "--n-samples",
            "4",
            "--seq-len",
            "64",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out


def test_artifact_round_trips_the_quantized_tensors(artifact, tiny_models):
    art = read_native(artifact)
    manifest = json.loads((artifact / MANIFEST).read_text())
    assert manifest["method"] == "gptq" and manifest["config"]["act_order"] is True
    assert (
        manifest["calibration"]["n_samples"] == 4 and len(manifest["calibration"]["sha256"]) == 64
    )
    assert len(art.weights) == 2 * 7 and all(qw.act_order for qw in art.weights.values())
    runner, _ = open_runner(str(artifact))
    for name, qw in art.weights.items():
        torch.testing.assert_close(runner.model.get_parameter(f"{name}.weight"), qw.dequantize())


def test_evaluating_an_artifact_equals_evaluating_the_tensors_in_memory(
    artifact, tiny_models, tmp_path
):
    from quantlab.data import load_corpus
    from quantlab.eval.perplexity import make_windows, perplexity
    from quantlab.eval.runners import HFRunner
    from quantlab.models import load_model, load_tokenizer, resolve_model

    config = EvalConfig(perplexity=(PerplexityConfig("pydoc", "all", "gptq", 64, 512),), kld=True)
    metrics = evaluate(
        str(artifact), config, reference=str(tiny_models["tiny-qwen3"]), cache=tmp_path
    )
    source = resolve_model(str(tiny_models["tiny-qwen3"]))
    model = load_model(source)
    apply_native(model, read_native(artifact))
    runner = HFRunner(model, load_tokenizer(source), "mem")
    w = make_windows(
        load_corpus("pydoc"),
        runner.tokenize,
        config.perplexity[0],
        "t",
        runner.add_bos,
        runner.bos_id,
    )
    assert metrics.perplexity[0].ppl == perplexity(runner, w).ppl
    assert metrics.kld.mean > 0 and metrics.kld.top1_agreement < 1
    assert metrics.size.bits_per_weight == pytest.approx(4 + 20 / 64)


def test_corrupt_artifacts_are_refused(artifact, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    data = bytearray((broken / "quantized.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (broken / "quantized.safetensors").write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="checksum"):
        read_native(broken)
    (broken / MANIFEST).unlink()
    with pytest.raises(CorruptFileError, match="not a complete quantlab artifact"):
        read_native(broken)


def test_quantize_refuses_gptq_options_for_other_methods(tiny_models, tmp_path, capsys):
    code = main(
        [
            "quantize",
            str(tiny_models["tiny-llama"]),
            "--method",
            "rtn",
            "--act-order",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert code == 2 and "--act-order" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
