"""GGUF quantization through llama.cpp with quantlab's importance matrix."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from quantlab.errors import ConfigError, CorruptFileError, QuantlabError
from quantlab.formats.gguf_quant import (
    gguf_imatrix,
    gguf_tensor_name,
    quantize_gguf,
    tensor_types,
    write_imatrix_gguf,
)

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python"
)


def test_hf_linear_names_map_to_gguf_tensor_names():
    assert gguf_tensor_name("model.layers.0.self_attn.q_proj") == "blk.0.attn_q.weight"
    assert gguf_tensor_name("model.layers.29.mlp.down_proj") == "blk.29.ffn_down.weight"
    assert gguf_tensor_name("model.layers.3.self_attn.o_proj") == "blk.3.attn_output.weight"
    with pytest.raises(QuantlabError, match="no GGUF tensor name"):
        gguf_tensor_name("lm_head")


def test_imatrix_file_holds_sums_and_counts(tmp_path):
    from gguf import GGUFReader

    means = {
        "model.layers.0.self_attn.q_proj": torch.tensor([0.5, 2.0, 0.25]),
        "model.layers.0.mlp.down_proj": torch.tensor([1.0, 3.0]),
    }
    path = write_imatrix_gguf(tmp_path / "m.imatrix.gguf", means, 512, ["c4/train"], 256)
    reader = GGUFReader(path)
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight.in_sum2"], [256.0, 1024.0, 128.0])
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight.counts"], [512.0])
    assert reader.fields["general.type"].contents() == "imatrix"
    assert reader.fields["imatrix.datasets"].contents() == ["c4/train"]
    assert reader.fields["imatrix.chunk_count"].contents() == 2
    assert set(gguf_imatrix(means)) == {"blk.0.attn_q.weight", "blk.0.ffn_down.weight"}


def test_bad_requests_are_refused_before_llama_cpp_runs(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(ConfigError, match="not one of"):
        quantize_gguf(junk, tmp_path / "o.gguf", "Q4_K_X")
    with pytest.raises(ConfigError, match="IQ2_XS needs an importance matrix"):
        quantize_gguf(junk, tmp_path / "o.gguf", "IQ2_XS")
    with pytest.raises(CorruptFileError, match="not a readable GGUF file"):
        quantize_gguf(junk, tmp_path / "o.gguf", "Q8_0")
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.slow
@needs_llama_cpp
def test_q4_k_m_with_the_shared_imatrix_beats_q4_k_m_without(default_model, data_root, tmp_path):
    """The default model (width 576: k-quants fall back per tensor, reported), Q4_K_M with and
    without the imatrix of a C4 calibration set, KLD against the fp32 model on WikiText-2."""
    from quantlab.cli import main
    from quantlab.eval.harness import EvalConfig, evaluate
    from quantlab.eval.perplexity import PerplexityConfig

    base = ["quantize", "smollm2-135m", "--format", "gguf", "--gguf-type", "Q4_K_M"]
    calib = ["--calib", "c4", "--n-samples", "16", "--seq-len", "512", "--calib-dtype", "bfloat16"]
    assert main([*base, "--out", str(tmp_path / "plain.gguf")]) == 0
    assert main([*base, "--imatrix", *calib, "--out", str(tmp_path / "imat.gguf")]) == 0
    manifest = json.loads((tmp_path / "imat.gguf.manifest.json").read_text())
    assert manifest["imatrix"] and manifest["calibration"]["n_samples"] == 16
    assert {"Q4_K", "Q5_0", "Q6_K"} <= set(manifest["type_mix"])
    assert tensor_types(tmp_path / "imat.gguf")["blk.0.attn_q.weight"] in ("Q5_0", "Q4_K")
    assert (tmp_path / "imat.imatrix.gguf").is_file()
    from gguf import GGUFReader

    fields = GGUFReader(tmp_path / "imat.gguf").fields
    assert fields["quantlab.calibration.sha256"].contents() == manifest["calibration"]["sha256"]
    ppl = PerplexityConfig(corpus="wikitext2", split="test", protocol="llamacpp", max_tokens=8192)
    cfg = EvalConfig(perplexity=(ppl,), kld=True)
    kld = {
        name: evaluate(str(tmp_path / f"{name}.gguf"), cfg, reference="smollm2-135m").kld.mean
        for name in ("plain", "imat")
    }
    assert kld["imat"] < kld["plain"]
    # IQ2_XS needs the imatrix: refused without it (exit 2), nothing written
    assert main([*base[:-1], "IQ2_XS", "--out", str(tmp_path / "iq2.gguf")]) == 2
    assert not (tmp_path / "iq2.gguf").exists()
