"""GGUF quantization through llama.cpp with quantlab's importance matrix."""

from __future__ import annotations

import dataclasses
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


@pytest.mark.parametrize(
    "bits,sym,expected", [(4, True, "Q4_0"), (8, True, "Q8_0"), (4, False, "Q4_1")]
)
def test_lossless_blocks_dequantize_exactly_with_gguf(bits, sym, expected):
    """gguf's own dequantization of the packed blocks gives the QuantizedWeight's values bit for
    bit (Q4_1 only where -scale*zero is a float16 value: scales made powers of two here)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from quantlab.formats.gguf_lossless import (
        lossless_type,
        pack_blocks,
        permute_rows,
        rotary_permute,
    )
    from quantlab.types import QuantizedWeight

    gen = torch.Generator().manual_seed(bits)
    rows, cols = 48, 96
    maxq = 2**bits - 1
    scales = torch.rand(rows, cols // 32, generator=gen).add(0.01).half().float()
    if not sym:
        scales = torch.exp2(torch.round(torch.log2(scales)))
    zeros = torch.full_like(scales, (maxq + 1) // 2) if sym else torch.randint(0, 16, scales.shape)
    qw = QuantizedWeight(
        torch.randint(0, maxq + 1, (rows, cols), generator=gen).to(torch.uint8),
        scales,
        zeros.to(torch.uint8),
        torch.arange(cols, dtype=torch.int32) // 32,
        bits,
        32,
        sym,
    )
    assert lossless_type("w", qw) == expected
    raw = pack_blocks(qw, expected)
    values = dequantize(raw, GGMLQuantizationType[expected])
    np.testing.assert_array_equal(values, qw.dequantize().numpy())
    # codes, scales and zeros move together: the permuted result is the permuted matrix
    assert torch.equal(permute_rows(qw, 3).dequantize(), rotary_permute(qw.dequantize(), 3))


def test_lossless_refuses_what_no_block_type_holds():
    from quantlab.errors import FormatError
    from quantlab.formats.gguf_lossless import lossless_type
    from quantlab.primitives import quantize_rtn

    w = torch.randn(8, 64)
    with pytest.raises(FormatError, match="group size 128"):
        lossless_type("w", quantize_rtn(w, 4, 128, True))
    with pytest.raises(FormatError, match="3-bit symmetric has no exact GGUF block type"):
        lossless_type("w", quantize_rtn(w, 3, 32, True))


@pytest.mark.slow
@needs_llama_cpp
def test_lossless_gguf_of_a_gptq_result_computes_the_same_function(
    default_model, data_root, tmp_path
):
    """GPTQ 4-bit symmetric group 32 -> Q4_0 blocks: the file's tensors dequantize (by gguf) to the
    GPTQ result's values exactly, and llama.cpp's perplexity of it matches the torch perplexity of
    the same result up to llama.cpp's arithmetic (it multiplies Q4_0 with 8-bit-quantized
    activations: 0.6% here), far closer than llama.cpp's own re-quantization to Q4_0 gets."""
    from gguf.quants import dequantize

    from quantlab.cli import main
    from quantlab.eval.harness import EvalConfig, evaluate
    from quantlab.eval.perplexity import PerplexityConfig
    from quantlab.formats.gguf_file import open_gguf
    from quantlab.formats.gguf_lossless import rotary_permute
    from quantlab.formats.native import read_native

    calib = ["--calib", "c4", "--n-samples", "8", "--seq-len", "256", "--calib-dtype", "bfloat16"]
    base = ["quantize", "smollm2-135m", "--method", "gptq", "--bits", "4", "--group-size", "32"]
    assert main([*base, "--sym", *calib, "--format", "native", "--out", str(tmp_path / "n")]) == 0
    assert (
        # --keep-dtype: the unquantized tensors in F32, as the native artifact has them
        main(
            [
                *base,
                "--sym",
                *calib,
                "--format",
                "gguf",
                "--keep-dtype",
                "--out",
                str(tmp_path / "q.gguf"),
            ]
        )
        == 0  # fmt: skip
    )
    native = read_native(tmp_path / "n")
    tensors = {t.name: t for t in open_gguf(tmp_path / "q.gguf").tensors}
    for name, qw in native.weights.items():
        t = tensors[gguf_tensor_name(name)]
        assert t.tensor_type.name == "Q4_0"
        values = torch.from_numpy(dequantize(np.array(t.data), t.tensor_type).copy())
        expected = qw.dequantize()
        if name.endswith("q_proj"):
            expected = rotary_permute(expected, 9)
        elif name.endswith("k_proj"):
            expected = rotary_permute(expected, 3)
        assert torch.equal(values, expected), name
    # llama.cpp's own Q4_0 of the full-precision file, for comparison
    assert main(["quantize", "smollm2-135m", "--format", "gguf", "--gguf-type", "Q4_0",
                 "--out", str(tmp_path / "requant.gguf")]) == 0  # fmt: skip
    ppl = PerplexityConfig(corpus="wikitext2", split="test", protocol="llamacpp", max_tokens=4096)
    cfg = EvalConfig(perplexity=(ppl,), kld=True)
    torch_result = str(tmp_path / "n")
    lossless = evaluate(str(tmp_path / "q.gguf"), cfg, reference=torch_result)
    requant = evaluate(str(tmp_path / "requant.gguf"), cfg, reference=torch_result)
    ratio = lossless.kld.ppl_ratio
    print(f"lossless: ppl ratio {ratio:.5f}, KLD {lossless.kld.mean:.6f}; requantized: "
          f"ppl ratio {requant.kld.ppl_ratio:.5f}, KLD {requant.kld.mean:.6f}")  # fmt: skip
    # measured: ppl ratio 1.0059 and KLD 0.0029 (llama.cpp's 8-bit activations), against
    # KLD 0.63 for llama.cpp's own Q4_0 of the full-precision weights
    # read back by a third party (transformers' GGUF loader, gguf's dequantization): the same
    # weights, so the very same perplexity as the GPTQ result itself
    plain = EvalConfig(perplexity=(ppl,))
    in_torch = evaluate(str(tmp_path / "q.gguf"), dataclasses.replace(plain, gguf_runtime="torch"))
    assert in_torch.perplexity[0].ppl == evaluate(torch_result, plain).perplexity[0].ppl
    assert abs(ratio - 1) < 1e-2
    assert lossless.kld.mean < 0.01 and lossless.kld.mean < requant.kld.mean / 20
