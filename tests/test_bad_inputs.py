"""Bad inputs give one clear line on stderr and exit status 2, never a traceback."""

import json
import shutil

import pytest

from quantlab.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("quantlab: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def llama_copy(tiny_models, tmp_path):
    dest = tmp_path / "model"
    shutil.copytree(tiny_models["tiny-llama"], dest)
    return dest


def test_nonexistent_folder(capsys, tmp_path):
    missing = tmp_path / "nope"
    code, _, err = run_cli(capsys, "info", str(missing))
    assert_one_line_error(code, err, str(missing), "does not exist")


def test_folder_without_config(capsys, llama_copy):
    (llama_copy / "config.json").unlink()
    code, _, err = run_cli(capsys, "info", str(llama_copy))
    assert_one_line_error(code, err, "no config.json")


def test_config_that_is_not_json(capsys, llama_copy):
    (llama_copy / "config.json").write_text("{not json")
    code, _, err = run_cli(capsys, "info", str(llama_copy))
    assert_one_line_error(code, err, "config.json", "not valid JSON")


def test_unsupported_architecture(capsys, llama_copy):
    cfg = json.loads((llama_copy / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (llama_copy / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "info", str(llama_copy))
    assert_one_line_error(code, err, "unsupported architecture 'GPT2LMHeadModel'", "Llama")


def test_truncated_safetensors(capsys, llama_copy):
    weights = llama_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    code, _, err = run_cli(capsys, "info", str(llama_copy))
    assert_one_line_error(code, err, "model.safetensors", "truncated")


def test_garbage_safetensors_header(capsys, llama_copy):
    weights = llama_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\xff" * 32
    weights.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "info", str(llama_copy))
    assert_one_line_error(code, err, "model.safetensors", "corrupt safetensors header")


def test_header_length_larger_than_file(capsys, llama_copy):
    weights = llama_copy / "model.safetensors"
    weights.write_bytes((2**60).to_bytes(8, "little") + b"{}")
    code, _, err = run_cli(capsys, "info", str(llama_copy))
    assert_one_line_error(code, err, "model.safetensors", "corrupt safetensors header")


def test_missing_shard_named_in_index(capsys, llama_copy):
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (llama_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = run_cli(capsys, "info", str(llama_copy))
    assert_one_line_error(code, err, "missing weight shard", "model-00002-of-00002.safetensors")


def test_pickle_weights_are_refused_unless_allowed(capsys, llama_copy):
    (llama_copy / "model.safetensors").unlink()
    # A pickle that would run a command if anything unpickled it.
    (llama_copy / "pytorch_model.bin").write_bytes(
        b"cos\nsystem\n(S'touch " + str(llama_copy / "PWNED").encode() + b"'\ntR."
    )
    code, _, err = run_cli(capsys, "info", str(llama_copy))
    assert_one_line_error(code, err, "pickle", "--allow-pickle")
    assert not (llama_copy / "PWNED").exists()


def test_remote_code_is_refused_unless_trusted(capsys, llama_copy):
    cfg = json.loads((llama_copy / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (llama_copy / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "info", str(llama_copy))
    assert_one_line_error(code, err, "auto_map", "--trust-remote-code")


def test_unknown_model_name(capsys):
    code, _, err = run_cli(capsys, "info", "no-such-model")
    assert_one_line_error(code, err, "'no-such-model' is not a known model", "smollm2-135m")


def test_hub_id_when_offline(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(capsys, "--cache", str(tmp_path), "info", "someorg/somemodel")
    assert_one_line_error(code, err, "someorg/somemodel", "Hub cannot be reached")


def test_bad_data_root(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--data-root", str(tmp_path / "nothing"), "corpora")
    assert_one_line_error(code, err, "nothing", "not a folder")
