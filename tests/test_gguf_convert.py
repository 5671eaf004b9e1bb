"""HF -> GGUF through llama.cpp's own converter, and clean errors for GGUF files quantlab cannot
run."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile

import numpy as np
import pytest

from quantlab.cli import main
from quantlab.errors import CorruptFileError, QuantlabError
from quantlab.formats.gguf_convert import SCRIPT, converter_dir
from quantlab.formats.gguf_file import check_gguf_architecture, gguf_writer

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python"
)


def _sdist(path, files: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_the_converter_is_taken_out_of_an_sdist(tmp_path):
    root = "llama_cpp_python-9.9.9/vendor/llama.cpp/"
    sdist = _sdist(
        tmp_path / "llama_cpp_python-9.9.9.tar.gz",
        {
            root + SCRIPT: b"print('converter')\n",
            root + "conversion/__init__.py": b"",
            root + "gguf-py/gguf/__init__.py": b"",
            root + "ggml/src/ggml.c": b"int x;\n",  # not needed: left out
            root + "conversion/../../../escape.py": b"evil",  # path traversal: ignored
            "llama_cpp_python-9.9.9/setup.py": b"",
        },
    )
    folder = converter_dir(tmp_path / "cache", sdist)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["conversion/__init__.py", SCRIPT, "gguf-py/gguf/__init__.py"]
    assert not list(tmp_path.rglob("escape.py"))
    assert converter_dir(tmp_path / "cache", sdist) == folder  # second call: the cached copy


def test_converter_sources_that_are_not_one_are_refused(tmp_path):
    empty = _sdist(tmp_path / "other-1.0.tar.gz", {"other-1.0/setup.py": b""})
    with pytest.raises(QuantlabError, match=f"holds no vendor/llama.cpp/{SCRIPT}"):
        converter_dir(tmp_path / "cache", empty)
    assert not (tmp_path / "cache" / "llama.cpp" / "converter-other-1.0").exists()
    with pytest.raises(QuantlabError, match="is not a llama.cpp checkout"):
        converter_dir(tmp_path / "cache", tmp_path)
    (tmp_path / "x.zip").write_bytes(b"PK")
    with pytest.raises(QuantlabError, match="neither a llama.cpp folder nor an sdist"):
        converter_dir(tmp_path / "cache", tmp_path / "x.zip")


def _small_gguf(path, arch: str):
    with gguf_writer(path, arch) as writer:
        writer.add_uint32(f"{arch}.block_count", 1)
        rng = np.random.default_rng()
        writer.add_tensor("token_embd.weight", rng.standard_normal((64, 32), dtype=np.float32))
    return path


@pytest.mark.parametrize("runtime", ["llama.cpp", "torch"])
def test_corrupt_truncated_and_alien_gguf_files_give_clean_errors(tmp_path, capsys, runtime):
    good = _small_gguf(tmp_path / "good.gguf", "llama")
    assert check_gguf_architecture(good, runtime) == "llama"
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:-1000])
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    for bad in (truncated, junk):
        with pytest.raises(CorruptFileError, match="truncated or corrupt"):
            check_gguf_architecture(bad, runtime)
    alien = _small_gguf(tmp_path / "alien.gguf", "not-an-arch")
    with pytest.raises(QuantlabError, match="architecture 'not-an-arch' is not one"):
        check_gguf_architecture(alien, runtime)
    # through the CLI: exit 2 and one line naming the file
    for bad in (truncated, alien):
        argv = ["eval", str(bad), "--ppl", "pydoc", "--allow-fallback", "--gguf-runtime", runtime]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(bad) in err[0]


def test_convert_refuses_an_unknown_outtype_and_an_existing_output(tiny_models, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"")
    assert main(["convert", str(tiny_models["tiny-llama"]), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(tiny_models["tiny-llama"]), "--out", str(tmp_path / "m")]) == 2
    assert "is a .gguf file path" in capsys.readouterr().err


@pytest.mark.slow
def test_a_tokenizer_llama_cpp_does_not_know_is_a_clean_error(tiny_models, tmp_path, capsys):
    """The tiny models' merge-free byte tokenizer is not one llama.cpp's converter recognises:
    the user is told so (with the hash the converter computed), and no file is left."""
    out = tmp_path / "tiny.gguf"
    assert main(["convert", str(tiny_models["tiny-qwen2"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not know this model's BPE pre-tokenizer (chkhsh " in err
    assert not list(tmp_path.glob("*tiny.gguf*"))


@pytest.mark.slow
@needs_llama_cpp
def test_default_model_as_f16_gguf_generates_and_scores_like_transformers(
    default_model, data_root, tmp_path
):
    """llama.cpp's converter on the default model: the written tokenizer is llama.cpp's gpt2/smollm
    one with identical ids, 32 greedy tokens are the same in llama.cpp and transformers, and the
    KLD of the F16 file against the fp32 model on 4k WikiText-2 tokens is <= 1e-4."""
    import torch
    from llama_cpp import Llama

    from quantlab.eval.harness import EvalConfig, evaluate
    from quantlab.eval.perplexity import PerplexityConfig
    from quantlab.models import load_model, load_tokenizer

    out = tmp_path / "smollm2-f16.gguf"
    assert main(["convert", "smollm2-135m", "--outtype", "f16", "--out", str(out)]) == 0
    manifest = json.loads((tmp_path / "smollm2-f16.gguf.manifest.json").read_text())
    conversion = manifest["conversion"]
    assert (conversion["tokenizer_model"], conversion["tokenizer_pre"]) == ("gpt2", "smollm")
    assert conversion["tokenizer_parity"].endswith("identical ids")
    assert manifest["type_mix"] == {"F16": 211, "F32": 61}

    tokenizer = load_tokenizer(default_model)
    messages = [{"role": "user", "content": "Name three uses of a paperclip."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    model = load_model(default_model)
    with torch.no_grad():
        hf = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
    hf_new = hf[0, len(ids) :].tolist()
    llm = Llama(str(out), n_ctx=256, logits_all=True, verbose=False)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    cpp_new = []
    for _ in range(32):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        cpp_new.append(token)
        llm.eval([token])
    llm.close()
    assert len(hf_new) == 32 and cpp_new == hf_new, (
        tokenizer.decode(hf_new),
        tokenizer.decode(cpp_new),
    )

    ppl = PerplexityConfig(corpus="wikitext2", split="test", context=512, max_tokens=4096)
    metrics = evaluate(str(out), EvalConfig(perplexity=(ppl,), kld=True), reference="smollm2-135m")
    assert metrics.kld.mean <= 1e-4
    assert metrics.kld.top1_agreement > 0.99
