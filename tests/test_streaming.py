"""Streaming quantization (#11): block by block from the shards, same checkpoint as in memory,
and a model larger than the memory limit the process runs under."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from quantlab.cli import main
from quantlab.data import CalibrationConfig, calibration_for
from quantlab.formats import WriteRequest, format_of_label, write_artifact
from quantlab.methods import get_method
from quantlab.methods.runner import quantize_model
from quantlab.methods.streaming import quantize_streaming
from quantlab.models import load_model, resolve_model
from quantlab.models.synthetic import synthetic_bytes, write_synthetic_model


def _stream(ref, method, config, calibration, label, out, **request):
    """Stream ``method`` from ``ref``'s shards into format ``label`` at ``out``."""
    fmt = format_of_label(label)
    options = fmt.options(**fmt.label_options(label))

    def walk(sink):
        return quantize_streaming(ref, method, config, calibration, sink, progress=False)

    return fmt.stream(WriteRequest(Path(out), ref, options, **request), walk)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118 (not a dict)
    return out


@pytest.fixture(scope="module")
def small_calibration(tiny_models):
    ref = resolve_model(str(tiny_models["tiny-llama"]))
    cfg = CalibrationConfig(corpus="pydoc", split="all", n_samples=4, seq_len=64, seed=0)
    return calibration_for(ref, cfg)[1]


@pytest.mark.parametrize(
    ("model", "method", "fmt", "options"),
    [
        ("tiny-llama", "gptq", "gptq", {"bits": 4, "group_size": 64, "sym": False}),
        ("tiny-qwen2", "awq", "awq", {"bits": 4, "group_size": 32}),
        ("tiny-qwen3", "rtn", "gptq_v2", {"bits": 3, "group_size": -1, "sym": True}),
        ("tiny-mistral", "gptq", "gptq", {"bits": 8, "group_size": 128, "act_order": True}),
    ],
)
def test_streaming_writes_the_same_checkpoint_as_the_in_memory_path(
    tiny_models, small_calibration, tmp_path, model, method, fmt, options
):
    ref = resolve_model(str(tiny_models[model]))
    spec = get_method(method)
    config = spec.config_cls(**options)
    calibration = small_calibration if spec.needs_calibration else None
    hf = load_model(ref)
    result = quantize_model(hf, ref.folder.arch, method, config, calibration, progress=False)
    write_artifact(fmt, tmp_path / "memory", ref, result=result, model=hf)
    # a small shard limit: several shards and an index, as for a large model
    _, done = _stream(
        ref, method, config, calibration, fmt, tmp_path / "stream", max_shard_bytes=60_000
    )
    assert done.linears == 14 and not done.weights  # the writer holds no tensor
    a, b = _tensors(tmp_path / "memory"), _tensors(tmp_path / "stream")
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    index = json.loads((tmp_path / "stream/model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and set(index["weight_map"]) == set(b)
    assert shards == sorted(p.name for p in (tmp_path / "stream").glob("model-*.safetensors"))
    ma, mb = (
        json.loads((tmp_path / d / "quantlab_manifest.json").read_text())
        for d in ("memory", "stream")
    )
    for key in ma.keys() - {"files", "quantize_seconds"}:
        assert ma[key] == mb[key], key
    assert main(["verify", str(tmp_path / "stream")]) == 0
    assert not list(tmp_path.glob(".*tmp-*"))


@pytest.mark.parametrize("keep", [False, True])
def test_streaming_writes_like_the_in_memory_path_when_the_config_names_no_dtype(tmp_path, keep):
    """fp16 shards, config without dtype: both paths write float16 by default, and with
    keep_dtype the float32 the model loads as."""
    src = write_synthetic_model(
        tmp_path / "synth", hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2
    )
    config = json.loads((src / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (src / "config.json").write_text(json.dumps(config))
    ref = resolve_model(str(src))
    rtn = get_method("rtn").config_cls(bits=4, group_size=64)
    hf = load_model(ref)
    result = quantize_model(hf, ref.folder.arch, "rtn", rtn, None, progress=False)
    write_artifact("gptq", tmp_path / "memory", ref, result=result, model=hf, keep_dtype=keep)
    fmt = format_of_label("gptq")

    def walk(sink):
        return quantize_streaming(ref, "rtn", rtn, None, sink, progress=False)

    options = fmt.options(keep_dtype=keep)
    fmt.stream(WriteRequest(tmp_path / "stream", ref, options), walk)
    a, b = _tensors(tmp_path / "memory"), _tensors(tmp_path / "stream")
    want = torch.float32 if keep else torch.float16
    assert a["model.embed_tokens.weight"].dtype == want
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_streaming_refuses_what_it_cannot_write_before_any_work(tiny_models, tmp_path, capsys):
    model = str(tiny_models["tiny-llama"])
    args = ["quantize", model, "--method", "rtn", "--streaming", "--out", str(tmp_path / "o")]
    assert main(args) == 2  # native (the default format) stores deltas against a loaded model
    assert (
        "streaming applies to quantlab's methods with a format written block by block "
        "(awq, compressed-tensors, gptq)" in capsys.readouterr().err
    )
    assert not (tmp_path / "o").exists()


def test_a_missing_tensor_mid_model_is_named_and_leaves_nothing(tmp_path, capsys):
    from safetensors.torch import save_file

    src = write_synthetic_model(
        tmp_path / "synth", hidden=128, intermediate=256, layers=3, heads=4, kv_heads=2
    )
    shard = src / "model-00002-of-00004.safetensors"
    with safe_open(shard, framework="pt") as fh:
        kept = {k: fh.get_tensor(k) for k in fh.keys() if "mlp.up_proj" not in k}  # noqa: SIM118
    save_file(kept, shard)
    out = tmp_path / "q"
    args = ["quantize", str(src), "--method", "rtn", "--format", "gptq", "--streaming"]
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "model.layers.1 lacks tensor(s) mlp.up_proj.weight" in err
    assert not out.exists() and not list(tmp_path.glob(".q.tmp-*"))


# The child sets its own limit and reports its own peak (VmHWM): ``ru_maxrss`` of a child forked
# from this (large) pytest process would include the pages it shared with it before exec.
_LIMITED = (
    "import resource, sys\n"
    "limit = int(sys.argv[1])\n"
    "resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))\n"
    "from quantlab.cli import main\n"
    "rc = main(sys.argv[2:])\n"
    "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]\n"
    "print(f'VmHWM {hwm}', file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def _run_limited(args: list[str], data_limit: int) -> tuple[int, int, str]:
    """Run the CLI in a child whose private memory (RLIMIT_DATA) is capped; return its exit code,
    its peak RSS in bytes (0 if it died before reporting) and its stderr's tail."""
    proc = subprocess.run(
        [sys.executable, "-c", _LIMITED, str(data_limit), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "TQDM_DISABLE": "1"},
        text=True,
        errors="replace",
    )
    peak = [
        int(line.split()[1]) * 1024
        for line in proc.stderr.splitlines()
        if line.startswith("VmHWM ")
    ]
    return proc.returncode, (peak[0] if peak else 0), proc.stderr[-2000:]


@pytest.mark.slow
def test_a_model_larger_than_the_memory_limit_is_quantized_by_streaming(tmp_path):
    """1.4 GB of fp16 weights (2.9 GB as the float32 the in-memory path loads) quantized inside
    a 1.1 GB cap on the process's private memory (heap, anonymous and private file mappings:
    every tensor torch allocates). The in-memory path fails under the same cap, so the cap binds."""
    shape = {"hidden": 1024, "intermediate": 2816, "layers": 64, "heads": 8, "kv_heads": 2}
    limit = 1_100_000_000
    assert synthetic_bytes(**shape) > 1.25 * limit
    src = write_synthetic_model(tmp_path / "synth", **shape)
    corpus = tmp_path / "calib.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 2000)
    common = ["quantize", str(src), "--method", "rtn", "--imatrix", "--group-size", "128"]
    common += ["--calib", str(corpus), "--n-samples", "4", "--seq-len", "128", "--format", "gptq"]
    rc, peak, err = _run_limited([*common, "--streaming", "--out", str(tmp_path / "s")], limit)
    assert rc == 0, err
    assert 0 < peak < limit
    manifest = json.loads((tmp_path / "s/quantlab_manifest.json").read_text())
    assert len(manifest["linears"]) == 64 * 7 and manifest["imatrix_tokens"] == 4 * 128
    assert main(["verify", str(tmp_path / "s")]) == 0
    rc, _, err = _run_limited([*common, "--out", str(tmp_path / "m")], limit)
    assert rc != 0 and not (tmp_path / "m").exists()
