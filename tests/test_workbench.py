"""The workbench: run configs, the sweep, the results store, reports and the fit planner."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from quantlab.cli import main
from quantlab.errors import ConfigError, QuantlabError
from quantlab.workbench.config import load_run_config
from quantlab.workbench.plan import GIB, Shapes, candidates, gguf_weight_bytes, parse_size
from quantlab.workbench.store import ResultStore

ROOT = Path(__file__).resolve().parent.parent
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "vocab_size": 128256, "tie_word_embeddings": False, "model_type": "llama",
}  # fmt: skip


def _tiny_config(tiny_models, tmp_path, variants=None, name="tiny") -> dict:
    return {
        "name": name,
        "model": str(tiny_models["tiny-llama"]),
        "calibration": {"corpus": "pydoc", "n_samples": 4, "seq_len": 64},
        "variants": variants
        or [
            {},
            {"method": "rtn", "bits": 4, "group_size": 64, "sym": False},
            {"method": "gptq", "bits": 4, "group_size": 64, "format": "gptq", "gptq_format": "v2"},
            {"method": "awq", "bits": 4, "group_size": 64, "format": "awq"},
        ],
        "evaluation": {
            "perplexity": [{"corpus": "pydoc", "split": "all", "context": 64, "max_tokens": 512}],
            "kld": True,
            "speed": False,
        },
        "output": str(tmp_path / "out"),
        "store": str(tmp_path / "results.db"),
    }


# -- configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["demo", "compare-methods", "gguf-ladder"])
def test_shipped_configs_load(name):
    config = load_run_config(ROOT / "configs" / f"{name}.yaml")
    assert config.variants[0].is_reference
    assert len({v.name for v in config.variants}) == len(config.variants)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: c.update(colour="red"), "run config: unknown key 'colour'; allowed: name"),
        (lambda c: c["variants"][1].update(bitz=4), "variants[1]: unknown key 'bitz'"),
        (lambda c: c["variants"][1].update(bits=5), "variants[1]: bits must be 2, 3, 4 or 8"),
        (lambda c: c["variants"][1].update(bits="4"), "variants[1].bits: '4' is not a valid int"),
        (
            lambda c: c["variants"][1].update(format="exl2"),
            "format must be one of awq, compressed-tensors, gguf, gptq, native",
        ),
        (lambda c: c["variants"].append({"gguf_type": "IQ2_XS"}), "needs imatrix: true"),
        (lambda c: c["variants"].append({"gguf_type": "Q9_K"}), "gguf_type must be one of"),
        (lambda c: c["variants"].append({"method": "awq", "bits": 3, "format": "awq"}), "4-bit"),
        (lambda c: c["variants"].append({}), "names must be unique, repeated: unquantized"),
        (
            lambda c: c["calibration"].update(n_samples=0),
            "calibration: calibration n_samples must be >= 1",
        ),
        (lambda c: c["evaluation"].update(kld=True, perplexity=[]), "kld needs a perplexity"),
        (lambda c: c["evaluation"]["perplexity"][0].update(protocol="x"), "protocol must be"),
        (lambda c: c.pop("model"), "model: required"),
        (lambda c: c["variants"].append({"method": "gptq", "impl": "autogptq"}), "impl must be"),
        (lambda c: c["variants"].append({"method": ""}), "method is empty"),
        (lambda c: c["variants"].append({"method": "gptq", "format": ""}), "format is empty"),
        (
            lambda c: c["variants"].append({"method": "gptq", "impl": "gptqmodel", "n_grid": 5}),
            "unknown key 'n_grid'",
        ),
        (
            lambda c: c["variants"].append(
                {"method": "gptq", "impl": "gptqmodel", "block_size": 64}
            ),
            "'block_size' does not reach the gptqmodel toolkit",
        ),
        (lambda c: c.update(name="../escape"), "run name '../escape': use letters"),
        (lambda c: c["variants"][1].update(streaming=True), "streaming applies to quantlab's"),
        (lambda c: c["variants"].append({"method": "rtn", "name": ".."}), "variant name '..'"),
        (
            lambda c: c["variants"].append(
                {"method": "rtn", "bits": 4, "group_size": 64, "sym": False, "name": "again"}
            ),
            "the same settings",
        ),
        (lambda c: c["evaluation"]["perplexity"][0].update(context="x"), "context: 'x' is not"),
        (lambda c: c["evaluation"].update(kld="no"), "evaluation.kld: 'no' is not a valid bool"),
    ],
)
def test_bad_configs_fail_before_any_work_naming_the_key(tiny_models, tmp_path, change, message):
    data = _tiny_config(tiny_models, tmp_path)
    change(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message.replace("[", "\\[").replace("]", "\\]")):
        load_run_config(path)
    assert main(["run", str(path)]) == 2
    assert not (tmp_path / "out").exists() and not (tmp_path / "results.db").exists()


def test_a_format_that_cannot_hold_the_model_is_refused_before_work(tiny_models, tmp_path):
    data = _tiny_config(tiny_models, tmp_path)
    data["model"] = str(tiny_models["tiny-qwen2"])  # intermediate 576
    data["variants"].append({"method": "awq", "bits": 4, "group_size": 128, "format": "awq"})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(
        QuantlabError,
        match="down_proj has in_features=576, not a multiple of group_size 128",
    ):
        from quantlab.workbench.pipeline import run_sweep

        run_sweep(load_run_config(path))
    assert not (tmp_path / "out").exists() and not (tmp_path / "results.db").exists()


# -- the sweep -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_sweep_stores_every_variant_once_and_reports_it(tiny_models, tmp_path, capsys):
    data = _tiny_config(tiny_models, tmp_path)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "unquantized" in out and "awq-w4-g64-awq" in out and "report:" in out
    with ResultStore(tmp_path / "results.db") as store:
        rows = store.results(run_name="tiny")
    assert [r.variant for r in rows] == [
        "unquantized", "rtn-w4-g64-asym", "gptq-w4-g64-gptq", "awq-w4-g64-awq"
    ]  # fmt: skip
    by = {r.variant: r for r in rows}
    assert by["unquantized"].metrics.kld.mean < 1e-6  # the reference against itself
    for name in ("rtn-w4-g64-asym", "gptq-w4-g64-gptq", "awq-w4-g64-awq"):
        m = by[name].metrics
        assert m.kld.mean > 0 and m.size.bits_per_weight < 16
        assert Path(by[name].artifact).is_dir()
    assert by["gptq-w4-g64-gptq"].format == "gptq_v2"
    assert by["gptq-w4-g64-gptq"].calibration_sha256 == by["awq-w4-g64-awq"].calibration_sha256
    assert by["rtn-w4-g64-asym"].calibration_sha256 is None
    report = tmp_path / "out" / "tiny" / "report"
    for name in ("report.md", "report.html", "size_vs_ppl.png", "kld.png"):
        assert (report / name).is_file(), name
    text = (report / "report.md").read_text()
    assert "gptq protocol, ctx 64, 504 tokens" in text and "| gptq-w4-g64-gptq |" in text
    assert "native artifacts hold only the quantized linears" in text

    # a second run finds every key in the store and evaluates nothing
    assert main(["run", str(path)]) == 0
    assert "0 evaluated, 4 already stored" in capsys.readouterr().out
    db = sqlite3.connect(tmp_path / "results.db")
    assert db.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM results").fetchone() == (4, 4)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # the report command rebuilds it from the store alone
    assert (
        main(["report", "--store", str(tmp_path / "results.db"), "--out", str(tmp_path / "r")]) == 0
    )
    assert (tmp_path / "r" / "report.html").is_file()


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_duplicate_or_partial_rows(tiny_models, tmp_path):
    """SIGKILL the sweep at seeded random moments (mid-quantization or mid-evaluation), then run
    it to the end: every variant has exactly one row, each artifact verifies against its
    manifest."""
    import random

    data = _tiny_config(tiny_models, tmp_path, name="killed")
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(data))
    cmd = [sys.executable, "-m", "quantlab", "run", str(path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rng = random.Random(1234)
    db = tmp_path / "results.db"

    def stored() -> int:
        if not db.is_file():
            return 0
        with sqlite3.connect(db) as conn:
            try:
                return conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
            except sqlite3.OperationalError:  # the schema is not there yet
                return 0

    interrupted = 0
    for trial in range(3):  # kill after `trial` rows are stored, at a random moment after that
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and stored() < trial:
            time.sleep(0.1)
        time.sleep(rng.uniform(0.0, 2.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            interrupted += 1
        proc.wait()
        with ResultStore(db) as store:  # whatever is stored is complete
            for row in store.results():
                assert row.metrics.kld is not None and row.metrics.size is not None
    assert interrupted >= 2  # the kills landed while there was work left
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    db = sqlite3.connect(tmp_path / "results.db")
    rows = db.execute("SELECT variant, COUNT(*) FROM results GROUP BY variant").fetchall()
    assert sorted(rows) == sorted((v, 1) for v in (
        "unquantized", "rtn-w4-g64-asym", "gptq-w4-g64-gptq", "awq-w4-g64-awq"))  # fmt: skip
    from quantlab.formats.loader import load

    for (artifact,) in db.execute("SELECT artifact FROM results WHERE variant LIKE '%gptq%'"):
        load(artifact)  # checks every file against the manifest's checksums
    leftovers = [p.name for p in (tmp_path / "out" / "killed").iterdir() if ".tmp-" in p.name]
    assert all(p.startswith(".") for p in leftovers)  # temporaries are hidden, never results


@pytest.mark.slow
def test_demo_config_gguf_variants_on_the_default_model(default_model, data_root, tmp_path):
    """The GGUF paths of the sweep (llama.cpp quantization with the shared imatrix) on the default
    model, with a short evaluation, in a fresh process: llama.cpp's per-tensor log and the
    libraries' output go to the run's log file, not the terminal."""
    pytest.importorskip("llama_cpp")
    data = {
        "name": "gguf",
        "model": "smollm2-135m",
        "calibration": {"corpus": "c4", "n_samples": 4, "seq_len": 256, "dtype": "bfloat16"},
        "variants": [{}, {"gguf_type": "Q8_0"}, {"gguf_type": "Q4_K_M", "imatrix": True}],
        "evaluation": {
            "perplexity": [{"corpus": "wikitext2", "context": 256, "max_tokens": 1024}],
            "kld": True,
            "speed": True,
            "tasks": ["piqa"],
            "limit": 10,
        },  # fmt: skip
        "output": str(tmp_path / "out"),
        "store": str(tmp_path / "r.db"),
    }
    path = tmp_path / "gguf.yaml"
    path.write_text(yaml.safe_dump(data))
    done = subprocess.run(
        [sys.executable, "-m", "quantlab", "run", str(path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    terminal = done.stdout + done.stderr
    for marker in ("llama_model_loader", "Loading weights", "torchao", "_pytree", "llama_"):
        assert marker not in terminal, marker
    assert "llama_model_loader" in (tmp_path / "out" / "gguf" / "quantlab.log").read_text()
    with ResultStore(tmp_path / "r.db") as store:
        rows = {r.variant: r for r in store.results()}
    q8, q4 = rows["gguf-Q8_0"].metrics, rows["gguf-Q4_K_M-imatrix"].metrics
    assert q8.runtime == q4.runtime == "llama.cpp"
    assert q8.kld.mean < q4.kld.mean < 1.0
    assert q4.size.bytes_on_disk < q8.size.bytes_on_disk
    assert all(m.tasks and m.speed for m in (q8, q4))
    manifest = json.loads(
        (tmp_path / "out/gguf/gguf-Q4_K_M-imatrix.gguf.manifest.json").read_text()
    )
    assert (
        manifest["imatrix"]
        and manifest["calibration"]["sha256"] == rows["gguf-Q4_K_M-imatrix"].calibration_sha256
    )
    for name in ("size_vs_ppl.png", "kld.png", "speed_vs_ppl.png", "accuracy.png"):
        assert (tmp_path / "out/gguf/report" / name).is_file()


# -- the planner ---------------------------------------------------------------------------------


def test_a_report_never_replaces_a_folder_that_is_not_a_report(tiny_models, tmp_path):
    from quantlab.errors import QuantlabError
    from quantlab.workbench.report import write_report

    keep = tmp_path / "results"
    keep.mkdir()
    (keep / "quantlab.db").write_text("precious")
    with pytest.raises(QuantlabError, match="is not a report folder"):
        write_report([object()], keep, title="x")
    assert (keep / "quantlab.db").read_text() == "precious"


def test_a_leftover_gguf_is_removed_without_touching_its_neighbours(tmp_path):
    from quantlab.formats import get_format
    from quantlab.workbench.produce import remove_artifact

    names = [
        "gguf-Q6_K.gguf",
        "gguf-Q6_K.gguf.manifest.json",
        "gguf-Q6_K.imatrix.gguf",
        "gguf-Q6_K-imatrix.gguf",
        "gguf-Q6_K-imatrix.gguf.manifest.json",
    ]
    for name in names:
        (tmp_path / name).write_text("x")
    remove_artifact(tmp_path / "gguf-Q6_K.gguf", get_format("gguf"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[3:])


# measured with llama.cpp's llama-quantize on the default model (bench/gguf_convert.py), MB
MEASURED_GGUF_MB = {
    "Q8_0": 144.8,
    "Q6_K": 138.4,
    "Q5_K_M": 112.1,
    "Q5_K_S": 110.0,
    "Q4_K_M": 105.5,
    "Q4_K_S": 102.0,
    "Q4_0": 91.7,
    "IQ4_NL": 92.1,
    "IQ4_XS": 91.3,
    "Q3_K_M": 93.5,
    "Q2_K": 88.2,
}


@pytest.mark.parametrize("gguf_type", sorted(MEASURED_GGUF_MB))
def test_planner_gguf_sizes_match_llama_cpp_files_of_the_default_model(gguf_type):
    cfg = {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_hidden_layers": 30,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    }
    size, _ = gguf_weight_bytes(Shapes.from_config(cfg), gguf_type)
    measured = MEASURED_GGUF_MB[gguf_type] * 1e6
    assert abs(size - measured) <= 0.025 * measured


def test_sizes_are_read_in_binary_and_decimal_units():
    assert parse_size("24GiB") == 24 * GIB
    assert parse_size("16 GB") == 16 * 10**9
    assert parse_size("8g") == 8 * GIB
    for bad in ("lots", "1.2.3GiB"):
        with pytest.raises(ConfigError, match="cannot read the memory size"):
            parse_size(bad)


def test_planner_reproduces_llama_cpp_type_mix_on_smollm2():
    """Width 576 is not a multiple of 256: the planner's rules give exactly the per-tensor types
    llama.cpp chose for the default model's Q4_K_M (166 Q5_0, 16 Q4_K, 15 Q8_0, 14 Q6_K)."""
    cfg = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
           "num_hidden_layers": 30, "num_key_value_heads": 3, "vocab_size": 49152,
           "tie_word_embeddings": True}  # fmt: skip
    size, mix = gguf_weight_bytes(Shapes.from_config(cfg), "Q4_K_M")
    assert mix == {"Q5_0": 166, "Q4_K": 16, "Q8_0": 15, "Q6_K": 14}
    assert abs(size - 105.5e6) < 0.01 * 105.5e6  # the measured file: 105.5 MB


def test_plan_for_llama3_8b_from_its_config_alone(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    rows = {r.name: r for r in candidates(Shapes.from_config(LLAMA3_8B), 8192, 1)}
    q4km = rows["gguf Q4_K_M"]
    assert 4.9e9 < q4km.weights < 4.95e9  # the published Q4_K_M file is 4.92 GB
    assert q4km.kv == 2**30  # 32 layers x 8 kv heads x 128 x 8192 x 2 (K, V) x 2 bytes
    assert 5 * GIB < q4km.total < 6.5 * GIB
    assert 14.9 * GIB < rows["fp16 / bf16"].weights < 15.0 * GIB
    assert main(["plan", str(tmp_path / "config.json"), "--vram", "8GiB", "--context", "8192"]) == 0
    out = capsys.readouterr().out
    assert "gguf Q4_K_M" in out and "most bits that fit: gguf Q6_K" in out
    assert "quantlab fit" in out and "--vram 8GiB --context 8192" in out


def test_result_keys_ignore_streaming_but_not_the_method_code_version(
    tiny_models, tmp_path, monkeypatch
):
    """Streaming writes the same tensors, so it shares the in-memory result; a change of the
    methods' arithmetic (METHODS_VERSION) must not reuse rows of the older code."""
    from quantlab.workbench import pipeline
    from quantlab.workbench.config import parse_run_config

    def key(variant: dict) -> str:
        config = parse_run_config(_tiny_config(tiny_models, tmp_path, variants=[variant]))
        return pipeline.result_key(config.variants[0], config, "sha")

    gptq = {"method": "gptq", "bits": 4, "group_size": 64, "format": "gptq"}
    before = key(gptq)
    assert before == key({**gptq, "streaming": True})
    unquantized = key({})
    monkeypatch.setattr(pipeline, "METHODS_VERSION", pipeline.METHODS_VERSION + 1)
    assert key(gptq) != before and key({}) == unquantized
