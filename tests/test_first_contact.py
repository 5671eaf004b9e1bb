"""What a newcomer meets (#19): offline in a second, one corpus load per sweep, a quiet
terminal, 16-bit checkpoints by default, model cards, one sweep per run and store at a time,
and the first commands."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from quantlab import net
from quantlab.cli import main
from quantlab.data import corpora
from quantlab.workbench.store import ResultStore


@pytest.fixture
def no_network(monkeypatch):
    """A machine whose resolver fails, offline mode not set, no data folder, nothing loaded."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "QUANTLAB_DATA"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(corpora, "_LOADED", {})

    def resolver_fails(*_args, **_kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", resolver_fails)
    import datasets

    def never(*_args, **_kwargs):
        raise AssertionError("the Hub was asked although it is unreachable")

    monkeypatch.setattr(datasets, "load_dataset", never)
    net.forget()
    yield
    net.forget()


def test_corpus_resolution_without_a_network_takes_under_two_seconds(no_network):
    """The demo's corpora (C4 calibration, WikiText-2 evaluation) on a machine without a
    network: one short check, no retries with back-off, the embedded fallback labelled."""
    start = time.perf_counter()
    calib = corpora.load_corpus("c4", fallback=True)
    evaluation = corpora.load_corpus("wikitext2", "test", fallback=True)
    assert time.perf_counter() - start < 2.0
    for corpus in (calib, evaluation):
        assert not corpus.standard and "[non-standard corpus]" in corpus.label
        assert "the Hub cannot be reached" in corpus.note
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # the Hub libraries will not retry either
    with pytest.raises(corpora.DataError, match="the Hub cannot be reached"):
        corpora.load_corpus("wikitext2", "test")  # without fallback: a clear error, at once


def test_a_resolver_that_hangs_costs_about_a_second(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def hangs(*_args, **_kwargs):
        time.sleep(3)
        raise TimeoutError("resolver timed out")

    monkeypatch.setattr(socket, "create_connection", hangs)
    net.forget()
    try:
        start = time.perf_counter()
        assert not net.hub_reachable()
        assert time.perf_counter() - start < 1.6
        start = time.perf_counter()
        assert not net.hub_reachable()  # decided once per process
        assert time.perf_counter() - start < 0.01
    finally:
        net.forget()


def _tiny_run(tiny_models, tmp_path, name="tiny", variants=None) -> Path:
    config = {
        "name": name,
        "model": str(tiny_models["tiny-llama"]),
        "calibration": {"corpus": "pydoc", "n_samples": 4, "seq_len": 64},
        "variants": variants
        or [
            {},
            {"method": "rtn", "bits": 4, "group_size": 64, "format": "gptq", "sym": True},
            {"method": "gptq", "bits": 4, "group_size": 64, "format": "awq"},
        ],
        "evaluation": {
            "perplexity": [{"corpus": "pydoc", "split": "all", "context": 64, "max_tokens": 256}],
            "kld": True,
            "speed": False,
        },
        "output": str(tmp_path / "out"),
        "store": str(tmp_path / "results.db"),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_sweep_loads_each_corpus_once(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "_LOADED", {})
    loads: list[tuple] = []
    real = corpora._load

    def counted(name, split, root, fallback):
        loads.append((name, split))
        return real(name, split, root, fallback)

    monkeypatch.setattr(corpora, "_load", counted)
    assert main(["run", str(_tiny_run(tiny_models, tmp_path))]) == 0
    assert loads == [("pydoc", "all")]  # calibration and every evaluation share one load


# what a third-party line looks like (library logs and warnings, llama.cpp, progress bars of
# libraries, optional native loads)
THIRD_PARTY = (
    "Loading weights",
    "Warning",
    "warn",
    "torchao",
    "Failed to load",
    "_pytree",
    "llama_",
    "INFO",
    "it/s]",
)


def test_the_terminal_holds_only_quantlab_lines(tiny_models, tmp_path):
    """A sweep in a fresh process: its stdout and stderr hold quantlab's own lines only; what
    the libraries said is in the run's log file."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "quantlab", "run", str(_tiny_run(tiny_models, tmp_path))],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    noise = [line for line in lines if any(marker in line for marker in THIRD_PARTY)]
    assert not noise, noise
    assert any(line.startswith("[3/3] ") for line in lines)  # the progress display
    log = (tmp_path / "out" / "tiny" / "quantlab.log").read_text()
    assert "Loading weights" in log  # transformers' own progress went there


def test_failures_show_the_end_of_the_log_and_verbose_shows_everything(tiny_models, tmp_path):
    bad = _tiny_run(tiny_models, tmp_path, "bad", [{}, {"method": "rtn", "format": "gptq"}])
    cmd = [sys.executable, "-m", "quantlab"]
    quiet = subprocess.run([*cmd, "run", str(bad)], capture_output=True, text=True)
    assert quiet.returncode == 0 and "Loading weights" not in quiet.stderr
    (tmp_path / "results.db").unlink()
    loud = subprocess.run([*cmd, "--verbose", "run", str(bad)], capture_output=True, text=True)
    assert loud.returncode == 0 and "Loading weights" in loud.stderr
    # a failure (a model whose tensors are missing) shows where the log is
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_models["tiny-llama"] / "config.json").read_text())
    for f in tiny_models["tiny-llama"].glob("tok*"):
        (broken / f.name).write_bytes(f.read_bytes())
    import torch
    from safetensors.torch import save_file

    save_file({"model.norm.weight": torch.ones(64)}, broken / "model.safetensors")
    failed = subprocess.run(
        [*cmd, "quantize", str(broken), "--method", "rtn", "--out", str(tmp_path / "q")],
        capture_output=True,
        text=True,
        env={**os.environ, "QUANTLAB_CACHE": str(tmp_path / "cache")},
    )
    assert failed.returncode != 0
    assert "quantize.log" in failed.stderr


def test_model_cards_say_what_the_artifact_is_and_get_the_measurements(tiny_models, tmp_path):
    assert main(["run", str(_tiny_run(tiny_models, tmp_path))]) == 0
    card = (tmp_path / "out" / "tiny" / "rtn-w4-g64-sym-gptq" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "transformers" and "quantlab" in front["tags"]
    assert front["quantization"]["method"] == "rtn"
    assert (
        front["quantization"]["config"]["bits"] == 4 and front["quantization"]["format"] == "gptq"
    )
    awq = (tmp_path / "out" / "tiny" / "gptq-w4-g64-awq" / "README.md").read_text()
    front = yaml.safe_load(awq.split("---\n")[1])
    assert len(front["quantization"]["calibration"]["sha256"]) == 64
    for text in (card, awq):
        assert (
            "## Evaluation" in text and "KL divergence from" in text and "Not evaluated" not in text
        )
    # the card is documentation: verify does not check it, the manifest does not list it
    assert main(["verify", str(tmp_path / "out" / "tiny" / "rtn-w4-g64-sym-gptq")]) == 0


def test_a_second_run_of_the_same_run_and_store_waits_or_stops(tiny_models, tmp_path, capsys):
    path = _tiny_run(tiny_models, tmp_path, variants=[{}, {"method": "rtn", "bits": 8}])
    store = ResultStore(tmp_path / "results.db")
    release = threading.Event()

    def hold() -> None:
        with store.run_lock("tiny"):
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.3)
    try:
        assert main(["run", str(path)]) == 2
        err = capsys.readouterr().err
        assert "run tiny is already running on" in err and f"pid {os.getpid()}" in err
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))
        threading.Timer(1.0, release.set).start()
        assert main(["run", str(path), "--wait"]) == 0  # waits, then runs
    finally:
        release.set()
        holder.join()
        store.close()
    assert "2 evaluated" in capsys.readouterr().out
    # the first run's rows are "done" for a run started after it
    assert main(["run", str(path), "--wait"]) == 0
    assert "0 evaluated, 2 already stored" in capsys.readouterr().out


def test_first_contact_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.count("\n  quantlab ") == 5 and "quantlab doctor" in out
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "llama.cpp", "Triton", "data folder", "cache", "network"):
        assert f" {name} " in out
