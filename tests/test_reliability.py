"""Reliability: hostile inputs, full disks, interrupted sweeps, code in files, `quantlab verify`."""

from __future__ import annotations

import json
import random
import resource
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from quantlab.cli import main
from quantlab.errors import CorruptFileError
from quantlab.fuzz import TARGETS


@pytest.mark.parametrize("target", TARGETS)
def test_fuzzed_inputs_only_ever_give_clean_errors(target):
    """A short seeded pass of bench/fuzz.py (which runs 100k inputs), like it in a fresh process
    with an 8 GiB address-space limit (an unbounded allocation is a finding, not an OOM kill)."""
    code = (
        "import json, resource; resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30)); "
        "from quantlab.fuzz import fuzz; "
        f"r = fuzz({target!r}, 400, seed=12345); "
        "print(json.dumps([r.inputs, r.accepted, r.refused, [f for f, _ in r.findings]]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    inputs, accepted, refused, findings = json.loads(done.stdout.strip().splitlines()[-1])
    assert accepted + refused == inputs == 400
    assert not findings, findings[0]


@pytest.mark.parametrize(
    "header",
    [
        struct.pack("<4sIQQ", b"GGUF", 3, 1 << 60, 0),  # 2^60 tensors
        struct.pack("<4sIQQ", b"GGUF", 3, 0, 1 << 60),  # 2^60 key/values
        struct.pack("<4sIQQQ", b"GGUF", 3, 0, 1, 1 << 60) + b"general.architecture",  # huge key
        struct.pack("<4sIQQ", b"GGUF", 3, (1 << 64) - 1, (1 << 64) - 1),
        b"GGUF" + b"\xff" * 4,
    ],
)
def test_gguf_headers_claiming_huge_counts_fail_fast(tmp_path, header):
    from quantlab.formats.gguf_file import check_gguf_architecture

    path = tmp_path / "hostile.gguf"
    path.write_bytes(header + b"\0" * 64)
    start = time.perf_counter()
    with pytest.raises(CorruptFileError, match="hostile.gguf"):
        check_gguf_architecture(path)
    assert time.perf_counter() - start < 2.0


class _Evil:
    """Unpickling this creates a marker file: proof that code from a file ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_malicious_pickle_is_never_unpickled(tiny_models, tmp_path, capsys):
    import shutil

    import torch

    folder = tmp_path / "evil-model"
    shutil.copytree(tiny_models["tiny-llama"], folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": _Evil(marker)}, folder / "pytorch_model.bin")
    for argv in (["info", str(folder)], ["eval", str(folder), "--ppl", "pydoc"]):
        assert main(argv) == 2
        assert "pickle" in capsys.readouterr().err
    assert not marker.exists()


def _tiny_checkpoint(tiny_models, tmp_path, fmt="gptq"):
    out = tmp_path / "ckpt"
    argv = ["quantize", str(tiny_models["tiny-llama"]), "--method", "rtn", "--bits", "4"]
    assert main([*argv, "--group-size", "64", "--sym", "--format", fmt, "--out", str(out)]) == 0
    return out


def test_verify_passes_an_intact_artifact_and_names_what_is_wrong(tiny_models, tmp_path, capsys):
    out = _tiny_checkpoint(tiny_models, tmp_path)
    assert main(["verify", str(out)]) == 0
    assert "verified (gptq, 3 checks)" in capsys.readouterr().out
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["verify", str(out)]) == 2
    assert "model.safetensors does not match its checksum" in capsys.readouterr().err
    weights.unlink()
    assert main(["verify", str(out)]) == 2
    assert "listed in the manifest but missing" in capsys.readouterr().err
    temp = tmp_path / ".ckpt.tmp-123"
    temp.mkdir()
    assert main(["verify", str(temp)]) == 2
    assert "unfinished temporary" in capsys.readouterr().err


def test_verify_of_gguf_files(tmp_path, capsys):
    import json

    import numpy as np

    from quantlab.fingerprint import content_sha256
    from quantlab.formats.gguf_file import gguf_writer

    path = tmp_path / "m.gguf"
    with gguf_writer(path, "llama") as w:
        w.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    manifest = {"files": {"m.gguf": content_sha256(path)}, "tensor_types": {}}
    (tmp_path / "m.gguf.manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(path)]) == 2  # parses, checksum ok, but llama.cpp cannot run it
    captured = capsys.readouterr()
    assert "ok  checksum" in captured.out and "cannot load" in captured.err
    manifest["files"]["m.gguf"] = "0" * 64
    (tmp_path / "m.gguf.manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(path)]) == 2
    assert "does not match the sha256" in capsys.readouterr().err


def _limited(size: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return apply


@pytest.mark.parametrize("fmt", ["gptq", "awq", "native", "gptq-streaming"])
def test_a_full_disk_gives_an_error_naming_the_path_and_leaves_nothing(tiny_models, tmp_path, fmt):
    """The file-size limit makes every write past 200 kB fail, as a full disk would (also
    while a streaming run writes its shards block by block)."""
    fmt, _, streaming = fmt.partition("-")
    out = tmp_path / "out" / fmt
    cmd = [
        sys.executable,
        "-m",
        "quantlab",
        "quantize",
        str(tiny_models["tiny-llama"]),
        "--method",
        "rtn",
        "--group-size",
        "64",
        "--format",
        fmt,
        "--out",
        str(out),
        *(["--streaming"] if streaming else []),
    ]
    done = subprocess.run(cmd, preexec_fn=_limited(200_000), capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-500:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"quantlab: error: could not write {out}") and "File too large" in last
    assert not list((tmp_path / "out").iterdir())  # no artifact, no temporary folder


def test_a_real_full_file_system_when_tmpfs_can_be_mounted(tiny_models, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (needs privileges)")
    try:
        out = mnt / "ckpt"
        argv = ["quantize", str(tiny_models["tiny-llama"]), "--method", "rtn", "--format", "gptq"]
        assert main([*argv, "--group-size", "64", "--out", str(out)]) == 2
        assert not list(mnt.iterdir())
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.slow
def test_twenty_seeded_sigkills_of_a_sweep(tiny_models, tmp_path):
    """SIGKILL `quantlab run` 20 times at seeded random moments, restarting it each time: every
    stored row is complete, every artifact present verifies, and a last run completes the sweep
    with one row per variant."""
    from quantlab.verify import verify
    from quantlab.workbench.store import ResultStore

    data = {
        "name": "kills",
        "model": str(tiny_models["tiny-llama"]),
        "calibration": {"corpus": "pydoc", "n_samples": 4, "seq_len": 64},
        "variants": [
            {},
            {"method": "rtn", "bits": 4, "group_size": 64, "sym": True, "format": "gptq"},
            {"method": "gptq", "bits": 4, "group_size": 64, "format": "gptq"},
            {"method": "awq", "bits": 4, "group_size": 64, "format": "awq"},
            {"method": "gptq", "bits": 8, "group_size": 64, "format": "gptq"},
        ],
        "evaluation": {
            "perplexity": [{"corpus": "pydoc", "split": "all", "context": 64, "max_tokens": 512}],
            "kld": True,
            "speed": False,
        },
        "output": str(tmp_path / "out"),
        "store": str(tmp_path / "results.db"),
    }
    rng = random.Random(2026)

    def check(root: Path) -> None:  # every stored row is complete and its artifact verifies
        if (root / "results.db").is_file():
            with ResultStore(root / "results.db") as store:
                for row in store.results():
                    assert row.metrics.kld is not None and row.metrics.size is not None
                    if row.variant != "unquantized":
                        verify(row.artifact, log=lambda _: None)

    def sweep(root: Path) -> list[str]:
        config = root / "kills.yaml"
        if not config.is_file():
            root.mkdir(parents=True)
            config.write_text(
                yaml.safe_dump(
                    {**data, "output": str(root / "out"), "store": str(root / "results.db")}
                )
            )
        return [sys.executable, "-m", "quantlab", "run", str(config)]

    killed, rounds = 0, 0
    root = tmp_path / "round0"
    for _ in range(20):
        proc = subprocess.Popen(sweep(root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 8.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait()
        check(root)
        if proc.returncode == 0:  # that sweep finished: the next kills go to a fresh one
            rounds += 1
            root = tmp_path / f"round{rounds}"
    assert killed >= 15
    done = subprocess.run(sweep(root), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    check(root)
    db = sqlite3.connect(root / "results.db")
    counts = dict(db.execute("SELECT variant, COUNT(*) FROM results GROUP BY variant").fetchall())
    assert sorted(counts.values()) == [1] * 5, counts
    for (artifact,) in db.execute("SELECT artifact FROM results WHERE format != 'hf'"):
        verify(artifact, log=lambda _: None)


def test_a_gguf_header_claiming_a_huge_string_is_refused_without_reading_it(tmp_path):
    """A sparse file whose header holds a 400 MB key: refused by its length, nothing copied."""
    import struct

    from quantlab.errors import CorruptFileError
    from quantlab.formats.gguf_file import read_header

    path = tmp_path / "huge-key.gguf"
    with open(path, "wb") as fh:
        fh.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 400_000_000))
        fh.truncate(32 + 400_000_000 + 64)
    start = time.perf_counter()
    with pytest.raises(CorruptFileError, match="over 65536"):
        read_header(path)
    assert time.perf_counter() - start < 1.0
    with open(path, "r+b") as fh:  # a big-endian file says so
        fh.write(b"GGUF" + struct.pack(">I", 3))
    with pytest.raises(CorruptFileError, match="big-endian"):
        read_header(path)
