"""Fit to a budget: settings' sizes, the allocation, the sensitivity model, per-module GPTQ
checkpoints, and `quantlab fit` end to end (tiny models; the default model in the slow tier)."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch

from quantlab.cli import main
from quantlab.errors import ConfigError, QuantlabError
from quantlab.fit import FitTarget, Option, Setting, allocate
from quantlab.fit.allocate import lower_hull
from quantlab.fit.candidates import GGUF_FIT_TYPES, Unit, candidate_settings
from quantlab.fit.sensitivity import spearman


# --- settings -------------------------------------------------------------------------------
@pytest.mark.parametrize("type_name", GGUF_FIT_TYPES)
def test_gguf_setting_sizes_are_ggml_block_arithmetic(type_name):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    s = Setting.from_key(type_name)
    assert s.family == "ggml" and s.key == type_name
    assert s.nbytes(64, 1536) == 64 * 1536 // block * size
    assert s.fits(8, 1536) and s.fits(8, 576) == (576 % block == 0)


@pytest.mark.parametrize("bits,group", [(2, 32), (3, 64), (4, 128), (8, 64), (4, -1)])
def test_int_setting_sizes_match_the_packed_gptq_tensors(bits, group):
    from quantlab.formats.layouts import pack_gptq
    from quantlab.primitives import quantize_rtn

    out, cols = 64, 192
    qw = quantize_rtn(torch.randn(out, cols), bits, group, True)
    packed = pack_gptq("x", qw, "gptq")
    nbytes = sum(t.numel() * t.element_size() for t in packed.values())
    s = Setting("int", bits=bits, group_size=group)
    assert Setting.from_key(s.key) == s
    # the writer stores scales in fp16: the packed scales may be float32 here
    scales = packed["scales"]
    nbytes -= scales.numel() * (scales.element_size() - 2)
    assert s.nbytes(out, cols) == nbytes


def test_candidates_skip_what_a_width_cannot_hold():
    narrow = Unit("model.layers.0.self_attn.q_proj", "attn_q", 0, (576, 576), "blk.0.attn_q.weight")
    wide = Unit("model.layers.0.mlp.down_proj", "ffn_down", 0, (576, 1536), "blk.0.ffn_down.weight")
    narrow_types = {s.key for s in candidate_settings(narrow, "ggml")}
    assert "Q4_K" not in narrow_types and {"Q4_0", "IQ4_NL", "Q8_0"} <= narrow_types
    assert {"Q2_K", "Q4_K", "Q6_K", "Q4_0"} <= {s.key for s in candidate_settings(wide, "ggml")}
    assert [s.key for s in candidate_settings(narrow, "int", group_sizes=(64, 32))][:5] == [
        "w2g64",
        "w3g64",
        "w4g64",
        "w8g64",
        "w2g32",
    ]
    with pytest.raises(ConfigError, match="unknown setting family"):
        candidate_settings(narrow, "fp8")


# --- allocation -----------------------------------------------------------------------------
def test_lower_hull_drops_dominated_and_concave_points():
    options = [Option("a", 10, 1.0), Option("b", 20, 0.5), Option("c", 30, 0.45),
               Option("d", 40, 0.05), Option("e", 25, 0.9), Option("f", 50, 0.06)]  # fmt: skip
    assert [o.key for o in lower_hull(options)] == ["a", "b", "d"]


def _brute_force(curves, budget):
    best = None
    names = list(curves)
    for combo in itertools.product(*(curves[n] for n in names)):
        size = sum(o.nbytes for o in combo)
        cost = sum(o.cost for o in combo)
        if size <= budget and (best is None or cost < best):
            best = cost
    return best


def test_allocation_fits_and_is_near_the_exact_optimum():
    rng = random.Random(0)
    gaps = []
    for _ in range(60):
        curves = {}
        for u in range(4):
            sizes = sorted(rng.sample(range(10, 100), 4))
            costs = sorted((rng.random() for _ in sizes), reverse=True)
            curves[f"t{u}"] = [
                Option(f"s{i}", b, c) for i, (b, c) in enumerate(zip(sizes, costs, strict=True))
            ]
        lo = sum(min(o.nbytes for o in c) for c in curves.values())
        hi = sum(max(o.nbytes for o in c) for c in curves.values())
        budget = rng.randint(lo, hi)
        got = allocate(curves, budget)
        assert got.nbytes <= budget
        best = _brute_force(curves, budget)
        assert got.predicted >= best - 1e-12
        gaps.append(got.predicted - best)
        # never worse than the best uniform choice that fits
        for i in range(4):
            if sum(c[i].nbytes for c in curves.values()) <= budget:
                assert got.predicted <= sum(c[i].cost for c in curves.values()) + 1e-12
    assert sum(g < 1e-12 for g in gaps) >= 50  # exact in most cases, near it in the rest


def test_an_allocation_that_cannot_fit_says_how_small_the_smallest_is():
    curves = {"a": [Option("x", 2**20, 1.0)], "b": [Option("x", 2**20, 1.0)]}
    with pytest.raises(QuantlabError, match=r"nothing fits: the smallest settings need 2\.0 MiB"):
        allocate(curves, 2**20)


def test_spearman_matches_its_definition():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    a, b = [1, 2, 2, 3, 5], [2, 1, 4, 3, 5]
    ra, rb = [1, 2.5, 2.5, 4, 5], [2, 1, 4, 3, 5]
    assert spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1])


# --- targets --------------------------------------------------------------------------------
def test_fit_targets_take_exactly_one_budget():
    assert FitTarget(bpw=4.5).name() == "bpw4.5"
    assert FitTarget(vram="8GiB", context=8192).name() == "vram8GiB-ctx8192"
    for bad, match in (
        ({}, "exactly one of"),
        ({"bpw": 4.5, "size": "1GiB"}, "exactly one of"),
        ({"bpw": 0}, "bpw must be"),
        ({"size": "lots"}, "cannot read the memory size"),
        ({"vram": "8GiB", "context": 0}, "context and batch"),
    ):
        with pytest.raises(ConfigError, match=match):
            FitTarget(**bad)


def test_run_configs_hold_fit_variants():
    from quantlab.workbench.config import parse_variant

    v = parse_variant({"fit": {"bpw": 4.5}, "format": "gguf"})
    assert v.name == "fit-gguf-bpw4.5" and v.fit == FitTarget(bpw=4.5) and v.needs_calibration
    assert parse_variant(v.to_dict()) == v  # a variant round-trips through its mapping
    other = parse_variant({"fit": {"bpw": 4.5, "group_size": 64}, "format": "gptq"})
    assert other.settings_key() != v.settings_key()
    for bad, match in (
        ({"fit": {"bpw": 4.5}}, "a fit needs a format"),
        ({"fit": {"bpw": 4.5}, "format": "awq"}, "cannot hold a fit"),
        ({"fit": {"bpw": 4.5}, "format": "gguf", "bits": 3}, "'bits' does not go with fit"),
        ({"fit": {"bpx": 4}, "format": "gguf"}, "unknown key 'bpx'"),
        ({"fit": {"bpw": "many"}, "format": "gguf"}, "is not a valid float"),
        ({"fit": 4.5, "format": "gguf"}, "expected a mapping"),
    ):
        with pytest.raises(ConfigError, match=match):
            parse_variant(bad)


# --- the dry run on a config alone ----------------------------------------------------------
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 32,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "head_dim": 128,
}


@pytest.mark.parametrize("fmt", ["gguf", "gptq"])
def test_dry_run_for_a_llama3_8b_config_targets_the_vram_left_after_the_kv_cache(
    tmp_path, capsys, fmt
):
    from quantlab.fit.build import config_units, plan_fit
    from quantlab.workbench.plan import GIB, RUNTIME_BYTES, Shapes

    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA3_8B))
    args = ["fit", str(config), "--format", fmt, "--vram", "8GiB", "--context", "8192"]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    shapes = Shapes.from_config(LLAMA3_8B)
    kv = shapes.kv_bytes(8192, 1)
    assert kv == 2**30  # 32 layers x 8 KV heads x 128 x 8192 x 2 (K, V) x 2 bytes
    assert "KV cache 1.00 GiB" in out and "dry run" in out and "per kind of tensor" in out
    from quantlab.formats import get_format

    family = get_format(fmt).fit_family
    units, arch, fixed = config_units(LLAMA3_8B, family)
    target = FitTarget(vram="8GiB", context=8192)
    plan = plan_fit(units, family, target, arch=arch, config=LLAMA3_8B, fixed_bytes=fixed)
    budget = 8 * GIB - kv - shapes.compute_bytes(8192, 1) - RUNTIME_BYTES - fixed
    assert plan.allocation.budget == budget
    assert budget - 2**24 < plan.allocation.nbytes <= budget  # the budget is used, not exceeded
    assert len(plan.settings()) == (7 * 32 + 2 if fmt == "gguf" else 7 * 32)
    assert f"{plan.bits_per_weight:.3f} bits/weight" in out


def test_fit_refuses_formats_that_cannot_hold_one(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA3_8B))
    assert main(["fit", str(config), "--format", "awq", "--bpw", "4", "--dry-run"]) == 2
    assert "cannot hold a fit; use one of gguf, gptq" in capsys.readouterr().err
    assert main(["fit", str(config), "--format", "gguf", "--bpw", "1", "--dry-run"]) == 2
    assert "nothing fits" in capsys.readouterr().err


# --- per-module GPTQ checkpoints ------------------------------------------------------------
def _mixed_result(tiny_models):
    from quantlab.methods.rtn import RTNConfig
    from quantlab.methods.runner import quantize_model
    from quantlab.models import load_model, resolve_model

    source = resolve_model(str(tiny_models["tiny-llama"]))
    model = load_model(source)
    base = RTNConfig(bits=4, group_size=64, sym=True)
    overrides = {
        "model.layers.0.self_attn.q_proj": RTNConfig(bits=8, group_size=32, sym=True),
        "model.layers.0.self_attn.k_proj": RTNConfig(bits=8, group_size=32, sym=True),
        "model.layers.0.self_attn.v_proj": RTNConfig(bits=8, group_size=32, sym=True),
        "model.layers.1.mlp.down_proj": RTNConfig(bits=2, group_size=64, sym=True),
    }
    result = quantize_model(
        model, source.folder.arch, "rtn", base, None, progress=False, overrides=overrides
    )
    return source, model, result, overrides


def test_per_module_bits_are_written_as_gptqmodel_dynamic_and_read_back(tiny_models, tmp_path):
    from quantlab.formats import get_format, write_artifact
    from quantlab.formats.gptq import module_setting
    from quantlab.formats.loader import load

    source, model, result, overrides = _mixed_result(tiny_models)
    assert result.weights["model.layers.0.self_attn.q_proj"].bits == 8
    assert result.weights["model.layers.1.mlp.down_proj"].bits == 2
    assert result.weights["model.layers.1.mlp.up_proj"].bits == 4
    path = write_artifact("gptq", tmp_path / "mixed", source, result=result, model=model)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"]) == (4, 64)
    assert qc["dynamic"] == {
        r"+:^model\.layers\.0\.self_attn\.(q_proj|k_proj|v_proj|qkv_proj)$": {
            "bits": 8,
            "group_size": 32,
        },
        r"+:^model\.layers\.1\.mlp\.down_proj$": {"bits": 2, "group_size": 64},
    }
    # what GPTQModel and vLLM resolve (re.match on module names, vLLM's fused ones too)
    assert module_setting(qc, "model.layers.0.self_attn.qkv_proj") == (8, 32)
    assert module_setting(qc, "model.layers.0.self_attn.o_proj") == (4, 64)
    assert module_setting(qc, "model.layers.10.mlp.down_proj") == (4, 64)
    manifest = json.loads((path / "quantlab_manifest.json").read_text())
    assert manifest["overrides"]["model.layers.1.mlp.down_proj"]["bits"] == 2
    loaded, _ = load(path)
    for name, qw in result.weights.items():
        got = loaded.get_submodule(name).quantized_weight()
        assert got.bits == qw.bits and got.group_size == qw.group_size
        torch.testing.assert_close(
            got.dequantize().float(), qw.dequantize().float(), rtol=0, atol=0
        )
    size = get_format("gptq").size(path)
    weights = sum(q.qweight.numel() for q in result.weights.values())
    assert size.linear_weights == weights  # each module's codes counted at its own bits
    packed = sum(
        Setting("int", bits=q.bits, group_size=q.group_size).nbytes(*q.shape)
        for q in result.weights.values()
    )
    assert size.linear_bytes == packed


def test_methods_without_per_module_settings_refuse_overrides(tiny_models):
    from quantlab.methods.awq import AWQConfig
    from quantlab.methods.runner import quantize_model
    from quantlab.models import load_model, resolve_model

    source = resolve_model(str(tiny_models["tiny-llama"]))
    overrides = {"model.layers.0.mlp.down_proj": AWQConfig(bits=8)}
    with pytest.raises(QuantlabError, match="does not take per-module settings"):
        quantize_model(
            load_model(source), source.folder.arch, "awq", AWQConfig(), None, overrides=overrides
        )


def test_a_corrupt_dynamic_is_a_clean_error():
    from quantlab.errors import CorruptFileError
    from quantlab.formats.gptq import module_setting

    with pytest.raises(CorruptFileError, match="dynamic"):
        module_setting({"bits": 4, "dynamic": {"+:(": {"bits": 8}}}, "x")
    with pytest.raises(CorruptFileError, match="not a mapping"):
        module_setting({"bits": 4, "dynamic": ["x"]}, "x")


# --- the sensitivity on a tiny model --------------------------------------------------------
def _calibration(n=4, seq=64):
    from quantlab.data.calibration import CalibrationConfig, CalibrationSet, hash_token_ids

    ids = np.random.default_rng(0).integers(0, 250, size=(n, seq), dtype=np.int64)
    config = CalibrationConfig("random", None, n, seq)
    return CalibrationSet(ids, config, "random", "-", ids.size, hash_token_ids(ids))


def _sensitivity(tiny_models, tmp_path, **kwargs):
    from quantlab.fit import SensitivityConfig, measure_sensitivity
    from quantlab.methods.runner import collect_imatrix
    from quantlab.models import load_model, resolve_model

    source = resolve_model(str(tiny_models["tiny-llama"]))
    calib = _calibration()
    imatrix, _ = collect_imatrix(load_model(source), source.folder.arch, calib)
    config = SensitivityConfig(families=("int",), group_sizes=(32, 64), tokens=128, swaps=15)
    return (
        source,
        calib,
        imatrix,
        measure_sensitivity(
            source, calib, imatrix, config, cache=tmp_path, progress=False, **kwargs
        ),
    )


def test_sensitivity_measures_each_tensor_and_checks_its_prediction(tiny_models, tmp_path):
    from quantlab.fit import Sensitivity
    from quantlab.fit.sensitivity import OutputProbe
    from quantlab.models import load_model
    from quantlab.primitives import fake_quantize

    source, calib, _, sens = _sensitivity(tiny_models, tmp_path)
    layers = source.folder.config["num_hidden_layers"]
    assert len(sens.units) == 7 * layers and sens.tokens == 128
    assert all(u.probe_kld > 0 and u.probe_error > 0 for u in sens.units.values())
    some = sens.units["model.layers.1.mlp.down_proj"]
    # fewer bits, more error; the prediction is the measured coefficient times the error
    assert some.errors["w2g64"] > some.errors["w3g64"] > some.errors["w4g64"] > some.errors["w8g64"]
    assert some.predicted("w4g64") == pytest.approx(some.coefficient * some.errors["w4g64"])
    # the check swaps are real measurements: one of them again, by hand
    assert len(sens.swaps) == 15 and sens.spearman is not None and sens.spearman > 0.5
    swap = sens.swaps[0]
    model = load_model(source)
    probe = OutputProbe(model, source.folder.arch, torch.as_tensor(calib.input_ids[:2]))
    unit = sens.units[swap["unit"]].unit
    s = Setting.from_key(swap["setting"])
    again = probe.kld(unit, fake_quantize(probe.weight(unit), s.bits, s.group_size, True))
    assert again == pytest.approx(swap["measured"], rel=1e-6)
    # a KLD recomputed the long way (log-softmax of both; float32 noise ~1e-8): same number
    w = probe.weight(unit)
    wq = fake_quantize(w, 2, 64, False)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.as_tensor(calib.input_ids[:2])).logits, -1)
        model.get_submodule(unit.name).weight.copy_(wq)
        got = torch.log_softmax(model(torch.as_tensor(calib.input_ids[:2])).logits, -1)
        model.get_submodule(unit.name).weight.copy_(w)
    long_way = float((ref.exp() * (ref - got)).sum(-1).mean())
    assert long_way > 1e-5 and probe.kld(unit, wq) == pytest.approx(long_way, rel=5e-3)
    # stored, and read back instead of measured again
    files = list((tmp_path / "sensitivity").glob("*.json"))
    assert len(files) == 1 and Sensitivity.load(files[0]).units.keys() == sens.units.keys()


def test_an_interrupted_sensitivity_resumes_where_it_stopped(tiny_models, tmp_path, monkeypatch):
    from quantlab.fit import sensitivity as module

    calls = {"n": 0}
    real = module.OutputProbe.kld

    def dying(self, unit, weight):
        calls["n"] += 1
        if calls["n"] > 12:
            raise KeyboardInterrupt
        return real(self, unit, weight)

    monkeypatch.setattr(module.OutputProbe, "kld", dying)
    with pytest.raises(KeyboardInterrupt):
        _sensitivity(tiny_models, tmp_path / "a")
    partial = list((tmp_path / "a" / "sensitivity").glob("*.partial.json"))
    assert len(partial) == 1
    assert len(module.Sensitivity.load(partial[0]).units) == 10  # saved every 10 tensors
    monkeypatch.setattr(module.OutputProbe, "kld", real)
    resumed = _sensitivity(tiny_models, tmp_path / "a")[3]
    fresh = _sensitivity(tiny_models, tmp_path / "b")[3]
    assert not list((tmp_path / "a" / "sensitivity").glob("*.partial.json"))
    for name, u in fresh.units.items():
        assert resumed.units[name].probe_kld == pytest.approx(u.probe_kld, rel=1e-9)
        assert resumed.units[name].errors == u.errors


def test_quantlab_fit_gptq_on_a_tiny_model_end_to_end(tiny_models, data_root, tmp_path, capsys):
    from quantlab.formats.loader import load
    from quantlab.workbench.store import ResultStore

    model = str(tiny_models["tiny-llama"])
    store = tmp_path / "r.db"
    common = ["--calib", "wikitext2", "--n-samples", "4", "--seq-len", "64"]
    args = ["fit", model, "--format", "gptq", "--bpw", "5", "--group-size", "32", *common]
    assert main([*args, "--max-tokens", "512", "--out", str(tmp_path), "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "fit-gptq-bpw5" in out and "predicted KLD" in out
    with ResultStore(store) as s:
        (row,) = s.results()
    assert row.variant == "fit-gptq-bpw5" and row.metrics.kld is not None
    manifest = json.loads(
        (tmp_path / "fit" / "fit-gptq-bpw5" / "quantlab_manifest.json").read_text()
    )
    fit = manifest["fit"]
    assert fit["bits_per_weight"] <= 5 and len(set(fit["settings"].values())) > 1  # a real mix
    assert fit["allocated_bytes"] <= fit["budget_bytes"]
    loaded, _ = load(row.artifact)
    for name, key in fit["settings"].items():
        qw = loaded.get_submodule(name).quantized_weight()
        assert Setting("int", bits=qw.bits, group_size=qw.group_size).key == key
    # the report plots it beside the uniform rows, with its prediction
    from quantlab.workbench.report import row_values, write_report

    values = row_values(row)
    assert values["fit"] and values["predicted_kld"] == pytest.approx(fit["predicted_kld"])
    write_report([row], tmp_path / "report", title="fit")
    assert (tmp_path / "report" / "kld_vs_size.png").is_file()
    # the same fit again: nothing is measured or built twice (the row is in the store)
    assert main([*args, "--max-tokens", "512", "--out", str(tmp_path), "--store", str(store)]) == 0
    with ResultStore(store) as s:
        (again,) = s.results()
    assert again.key == row.key and again.created == row.created


@pytest.mark.slow
def test_quantlab_fit_gguf_on_the_default_model_end_to_end(
    default_model, data_root, tmp_path, capsys
):
    """`quantlab sensitivity` then `quantlab fit smollm2-135m --bpw 4.5 --format gguf` (a small
    measurement, to keep the test short): a GGUF file with llama.cpp's types per tensor, within
    the budget, evaluated in llama.cpp and stored."""
    from quantlab.formats.gguf_quant import tensor_types
    from quantlab.workbench.store import ResultStore

    calib = ["--calib", "c4", "--n-samples", "4", "--seq-len", "256"]
    measure = ["sensitivity", "smollm2-135m", *calib, "--tokens", "256", "--swaps", "10"]
    assert main([*measure, "--families", "ggml"]) == 0
    out = capsys.readouterr().out
    assert "211 tensors" in out and "Spearman" in out
    store = tmp_path / "r.db"
    args = ["fit", "smollm2-135m", "--format", "gguf", "--bpw", "4.5", *calib]
    assert main([*args, "--max-tokens", "1024", "--out", str(tmp_path), "--store", str(store)]) == 0
    assert "predicted KLD" in capsys.readouterr().out
    with ResultStore(store) as s:
        (row,) = s.results()
    assert row.format == "gguf" and row.metrics.runtime.startswith("llama.cpp")
    manifest = json.loads((tmp_path / "fit" / "fit-gguf-bpw4.5.gguf.manifest.json").read_text())
    fit = manifest["fit"]
    assert fit["bits_per_weight"] <= 4.5 and fit["measured_sensitivity"]
    written = tensor_types(row.artifact)
    assert len(fit["settings"]) == 211 and len(set(fit["settings"].values())) > 2
    assert sorted(written.values()).count("F32") == 61  # the norms stay F32
    mix = {t for t in written.values() if t != "F32"}
    assert mix == set(fit["settings"].values())
    assert row.metrics.kld.mean > 0


def test_size_of_finds_the_artifact_not_the_files_beside_it(tmp_path):
    from quantlab.fit.build import resolve_size_of

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "gguf-Q5_K_M.imatrix.gguf").write_bytes(b"GGUF" + b"\0" * 60)  # beside it
    (folder / "gguf-Q5_K_M.gguf").write_bytes(b"GGUF" + b"\0" * 1000)
    target = resolve_size_of(FitTarget(size_of="gguf-Q5_K_M"), folder / "fit.gguf")
    assert target.size == "1004B" and target.size_of is None
    with pytest.raises(QuantlabError, match="no artifact of that name"):
        resolve_size_of(FitTarget(size_of="gguf-Q9"), folder / "fit.gguf")
