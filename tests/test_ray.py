"""`quantlab run --executor ray` (#11) on a local Ray cluster of 2 CPUs: the same rows as the
local executor, and a task killed mid-way is retried without duplicate rows."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import torch

from quantlab.workbench.config import parse_run_config
from quantlab.workbench.pipeline import run_sweep
from quantlab.workbench.ray_executor import TaskResources
from quantlab.workbench.store import ResultStore

pytestmark = pytest.mark.ray

ray = pytest.importorskip("ray")


def _numbers(row) -> dict:
    m = row.metrics
    return {
        "ppl": m.perplexity[0].ppl,
        "kld": m.kld.mean,
        "top1": m.kld.top1_agreement,
        "bits_per_weight": m.size.bits_per_weight,
        "tensor_bytes": m.size.tensor_bytes,
    }


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _config(tiny_models, tmp_path: Path, name: str):
    return parse_run_config(
        {
            "name": name,
            "model": str(tiny_models["tiny-llama"]),
            "calibration": {"corpus": "pydoc", "split": "all", "n_samples": 4, "seq_len": 64},
            "variants": [
                {},
                {"method": "rtn", "bits": 4, "group_size": 64, "sym": False},
                {"method": "gptq", "bits": 4, "group_size": 64, "format": "gptq"},
                {"method": "awq", "bits": 4, "group_size": 64, "format": "awq"},
            ],
            "evaluation": {
                "perplexity": [
                    {"corpus": "pydoc", "split": "all", "context": 64, "max_tokens": 512}
                ],
                "kld": True,
                "speed": False,
            },
            "output": str(tmp_path / "out"),
            "store": str(tmp_path / f"{name}.db"),
        }
    )


def _rows(store: Path) -> dict[str, dict]:
    with ResultStore(store) as s:
        rows = s.results()
    names = [r.variant for r in rows]
    assert len(names) == len(set(names)), f"duplicate rows: {names}"
    return {r.variant: r for r in rows}


def _ray_worker_pids(task_prefix: str) -> list[int]:
    """Processes running a Ray task whose name starts with ``task_prefix`` (Ray titles a worker
    process ``ray::<task name>`` while it runs that task)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if cmdline.startswith(f"ray::{task_prefix}"):
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_ray_sweep_matches_the_local_executor_and_survives_a_killed_task(
    ray_cluster, tiny_models, tmp_path, monkeypatch
):
    # the same torch thread count in both runs (Ray gives a task ``num_cpus`` threads): with it
    # the arithmetic, and so every number, is the same
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    local = _config(tiny_models, tmp_path / "local", "local")
    try:
        run_sweep(local, store_path=local.store)
    finally:
        torch.set_num_threads(threads)
    expected = _rows(Path(local.store))
    assert len(expected) == 4

    on_ray = _config(tiny_models, tmp_path / "ray", "onray")
    killed: list[int] = []

    def kill_one_quantize_task():
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            for pid in _ray_worker_pids("quantize:"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_quantize_task, daemon=True)
    killer.start()
    report = run_sweep(
        on_ray,
        store_path=on_ray.store,
        executor="ray",
        resources=TaskResources(cpus=2, max_retries=2),
    )
    killer.join()
    assert killed, "no quantize task was seen running"
    assert sorted(report.done) == sorted(expected)
    got = _rows(Path(on_ray.store))
    assert sorted(got) == sorted(expected)
    with sqlite3.connect(on_ray.store) as db:  # one row per result key, nothing else
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM results").fetchone() == (4, 4)
    for name, row in expected.items():
        assert got[name].key == row.key  # same settings, calibration, evaluation, model, code
        assert got[name].calibration_sha256 == row.calibration_sha256
        assert _numbers(got[name]) == _numbers(row), name
    # every artifact the Ray run wrote is complete (a retried task removed what its killed
    # attempt left)
    out = Path(on_ray.output) / "onray"
    assert not list(out.glob(".*tmp-*"))


def test_tasks_no_node_can_hold_are_refused_instead_of_waiting_forever(
    ray_cluster, tiny_models, tmp_path
):
    from quantlab.errors import QuantlabError

    config = _config(tiny_models, tmp_path, "toobig")
    with pytest.raises(QuantlabError, match="declares 1 GPU.* lower --task-gpus"):
        run_sweep(config, executor="ray", resources=TaskResources(cpus=1, gpus=1))
    with pytest.raises(QuantlabError, match="declares 64 CPU.* lower --task-cpus"):
        run_sweep(config, executor="ray", resources=TaskResources(cpus=64))


def test_ray_options_are_refused_for_the_local_executor(tiny_models, tmp_path, capsys):
    from quantlab.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: x\nmodel: {tiny_models['tiny-llama']}\nvariants: [{{}}]\n")
    assert main(["run", str(cfg), "--task-cpus", "2"]) == 2
    assert "--task-cpus apply to --executor ray only" in capsys.readouterr().err
