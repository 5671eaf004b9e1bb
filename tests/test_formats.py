"""Checkpoint formats: packing round trips, exact write -> load, refusals, corrupt checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab.errors import CorruptFileError, FormatError
from quantlab.formats import detect_format, layouts, load, write_artifact
from quantlab.formats.packing import (
    awq_deinterleave,
    awq_interleave,
    pack_bits,
    packed_length,
    unpack_bits,
)
from quantlab.methods.rtn import RTNConfig
from quantlab.methods.runner import quantize_model
from quantlab.models import load_model, resolve_model
from quantlab.qlinear import QuantLinear
from quantlab.types import QuantizedWeight

BITS = st.sampled_from([2, 3, 4, 8])


def _random_qw(gen, out, cols, bits, group_size, sym, act_order, zero_floor=0):
    maxq = 2**bits - 1
    size = group_size if group_size > 0 else cols
    groups = -(-cols // size)
    if act_order:
        g_idx = (torch.arange(cols) // size)[torch.randperm(cols, generator=gen)]
    else:
        g_idx = torch.arange(cols) // size
    zeros = (
        torch.full((out, groups), (maxq + 1) // 2)
        if sym
        else torch.randint(zero_floor, maxq + 1, (out, groups), generator=gen)
    )
    scales = torch.rand(out, groups, generator=gen).add(1e-3).half().float()
    return QuantizedWeight(
        torch.randint(0, maxq + 1, (out, cols), generator=gen).to(torch.uint8),
        scales,
        zeros.to(torch.uint8),
        g_idx.to(torch.int32),
        bits,
        group_size,
        sym,
    )


def _same(a: QuantizedWeight, b: QuantizedWeight) -> None:
    for part in ("qweight", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(a, part), getattr(b, part)), part
    assert (a.bits, a.group_size, a.sym) == (b.bits, b.group_size, b.sym)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(1, 8),
    lead=st.integers(1, 3),
    count=st.integers(1, 200),
    seed=st.integers(0, 2**16),
)
def test_pack_bits_round_trips(bits, lead, count, seed):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (lead, count), generator=gen)
    words = pack_bits(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (lead, packed_length(count, bits))
    assert torch.equal(unpack_bits(words, bits, count), codes)


def test_pack_bits_layout_by_hand():
    # 4-bit: lowest code in the lowest nibble
    assert (
        pack_bits(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]]), 4).item()
        == int("0xF7654321", 16) - 2**32
    )
    # 3-bit: codes 10 and 21 straddle words (AutoGPTQ's layout): 32 codes of value 7 -> all ones
    assert torch.equal(
        pack_bits(torch.full((1, 32), 7), 3), torch.full((1, 3), -1, dtype=torch.int32)
    )
    codes = torch.zeros(1, 32, dtype=torch.int64)
    codes[0, 10] = 0b110  # bits 30..32: word 0 gets 0b10 << 30, word 1 gets 0b1
    assert pack_bits(codes, 3).tolist() == [[-(2**31), 1, 0]]
    assert torch.equal(
        awq_deinterleave(awq_interleave(torch.arange(16)[None])), torch.arange(16)[None]
    )
    assert awq_interleave(torch.arange(8)[None]).tolist() == [[0, 2, 4, 6, 1, 3, 5, 7]]  # fmt: skip


def test_pack_bits_matches_third_party_packers():
    """The same words as compressed-tensors' and GPTQModel's own packers (when installed)."""
    gen = torch.Generator().manual_seed(1)
    checked = 0
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError:
        pack_to_int32 = None
    try:
        from gptqmodel.quantization.awq.utils.packing_utils import _pack_contiguous
    except ImportError:
        _pack_contiguous = None
    for bits in (2, 3, 4, 8):
        codes = torch.randint(0, 2**bits, (6, 96), generator=gen)
        ours = pack_bits(codes, bits)
        if pack_to_int32 is not None:
            signed = (codes - 2 ** (bits - 1)).to(torch.int8)
            assert torch.equal(pack_to_int32(signed, bits), ours)
            checked += 1
        if _pack_contiguous is not None:
            assert torch.equal(_pack_contiguous(codes, bits), ours)
            checked += 1
    if not checked:
        pytest.skip("neither compressed-tensors nor gptqmodel is installed")


@settings(max_examples=40, deadline=None)
@given(
    bits=BITS,
    out_words=st.integers(1, 3),
    in_words=st.integers(1, 4),
    group=st.sampled_from([-1, 16, 32, 40, 64, 128]),
    sym=st.booleans(),
    act_order=st.booleans(),
    v2=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gptq_layout_round_trips(bits, out_words, in_words, group, sym, act_order, v2, seed):
    out, cols = 32 * out_words, 32 * in_words  # 3-bit needs multiples of 32
    fmt = "gptq_v2" if v2 else "gptq"
    gen = torch.Generator().manual_seed(seed)
    qw = _random_qw(gen, out, cols, bits, group, sym, act_order, zero_floor=0 if v2 else 1)
    packed = layouts.pack_gptq("w", qw, fmt)
    assert packed["qweight"].shape == (cols * bits // 32, out)
    assert packed["qzeros"].shape == (qw.n_groups, out * bits // 32)
    assert packed["scales"].dtype == torch.float16 and packed["scales"].shape == (qw.n_groups, out)
    back = layouts.unpack_gptq(
        "w", packed, out, cols, bits=bits, group_size=group, sym=sym, checkpoint_format=fmt
    )
    _same(qw, back)


@settings(max_examples=30, deadline=None)
@given(
    out8=st.integers(1, 6),
    groups=st.integers(1, 4),
    group=st.sampled_from([32, 64, 128]),
    seed=st.integers(0, 2**16),
)
def test_awq_layout_round_trips(out8, groups, group, seed):
    gen = torch.Generator().manual_seed(seed)
    qw = _random_qw(gen, 8 * out8, group * groups, 4, group, False, False)
    packed = layouts.pack_awq("w", qw)
    assert packed["qweight"].shape == (group * groups, out8)
    back = layouts.unpack_awq("w", packed, 8 * out8, group * groups, group_size=group)
    _same(dataclass_sym(qw, False), back)


def dataclass_sym(qw, sym):
    import dataclasses

    return dataclasses.replace(qw, sym=sym)


def test_layouts_refuse_what_they_cannot_hold():
    gen = torch.Generator().manual_seed(0)
    qw = _random_qw(gen, 32, 64, 4, 32, False, False)
    qw.zeros[0, 0] = 0
    with pytest.raises(FormatError, match="zero point 0.*gptq_v2"):
        layouts.pack_gptq("layer.q", qw, "gptq")
    layouts.pack_gptq("layer.q", qw, "gptq_v2")  # v2 stores it
    with pytest.raises(FormatError, match="in_features=40 x 3 bits"):
        layouts.pack_gptq("w", _random_qw(gen, 32, 40, 3, 8, True, False))
    with pytest.raises(FormatError, match="not a multiple of group size 128"):
        layouts.pack_awq("w", _random_qw(gen, 32, 576, 4, 128, False, False))
    with pytest.raises(FormatError, match="4-bit only"):
        layouts.pack_awq("w", _random_qw(gen, 32, 64, 8, 32, False, False))
    with pytest.raises(FormatError, match="act-order"):
        layouts.pack_awq("w", _random_qw(gen, 32, 64, 4, 32, False, True))
    bad = _random_qw(gen, 32, 64, 4, 32, True, False)
    bad.scales[0, 0] = 0.1  # not a float16 value
    with pytest.raises(FormatError, match="float16"):
        layouts.pack_gptq("w", bad)


def _quantized_tiny(tiny_models, name, bits=4, group_size=32, sym=True):
    source = resolve_model(str(tiny_models[name]))
    model = load_model(source)
    result = quantize_model(
        model, source.folder.arch, "rtn", RTNConfig(bits, group_size, sym), None, progress=False
    )
    return source, model, result


@pytest.mark.parametrize(
    "name,fmt,bits,group_size,sym",
    [
        ("tiny-llama", "gptq", 4, 32, True),
        ("tiny-llama", "gptq", 3, 64, True),
        ("tiny-qwen2", "gptq", 8, 128, True),  # 192 = 128 + a partial group of 64
        ("tiny-qwen3", "gptq", 2, -1, True),
        ("tiny-mistral", "gptq_v2", 4, 64, False),
        ("tiny-qwen2", "awq", 4, 64, False),
        ("tiny-llama", "awq", 4, 128, True),
    ],
)
def test_written_checkpoint_loads_to_identical_logits(
    tiny_models, tmp_path, name, fmt, bits, group_size, sym
):
    source, model, result = _quantized_tiny(tiny_models, name, bits, group_size, sym)
    # keep_dtype: the source's float32 for the unquantized tensors, so the logits are identical
    out = write_artifact(
        fmt, tmp_path / "ckpt", source, result=result, model=model, keep_dtype=True
    )
    assert detect_format(out) == fmt
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == fmt[:4]
    assert (out / "tokenizer.json").is_file() and (out / "quantlab_manifest.json").is_file()
    loaded, checkpoint = load(out)
    assert len(checkpoint.weights) == len(result.weights)
    for lname, qw in result.weights.items():
        _same(dataclass_sym(qw, checkpoint.weights[lname].sym), checkpoint.weights[lname])
        assert isinstance(loaded.get_submodule(lname), QuantLinear)
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_unquantized_tensors_are_written_in_16_bits_unless_kept(tiny_models, tmp_path, fmt):
    """As the toolkits do: the float32 source's embeddings, head and norms go in as float16 (the
    config says so), the quantized linears are the same; keep_dtype writes float32."""
    from safetensors import safe_open

    source, model, result = _quantized_tiny(tiny_models, "tiny-llama", 4, 64, False)
    paths = {
        keep: write_artifact(
            fmt, tmp_path / f"k{keep}", source, result=result, model=model, keep_dtype=keep
        )
        for keep in (False, True)
    }
    with safe_open(paths[False] / "model.safetensors", framework="pt") as fh:
        assert fh.get_tensor("model.embed_tokens.weight").dtype == torch.float16
        assert fh.get_tensor("model.norm.weight").dtype == torch.float16
    with safe_open(paths[True] / "model.safetensors", framework="pt") as fh:
        assert fh.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert json.loads((paths[False] / "config.json").read_text())["dtype"] == "float16"
    size = {k: (p / "model.safetensors").stat().st_size for k, p in paths.items()}
    assert size[False] < size[True]
    (a, ca), (b, cb) = load(paths[False]), load(paths[True])
    for name in ca.weights:
        _same(ca.weights[name], cb.weights[name])
    ids = torch.arange(20)[None]
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, atol=2e-3, rtol=0)


def test_sharded_checkpoint_loads(tiny_models, tmp_path):
    source, model, result = _quantized_tiny(tiny_models, "tiny-llama")
    out = write_artifact(
        "gptq",
        tmp_path / "ckpt",
        source,
        result=result,
        model=model,
        max_shard_bytes=50_000,
        keep_dtype=True,
    )
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2
    loaded, _ = load(out)
    ids = torch.arange(20)[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_a_refused_write_leaves_nothing(tiny_models, tmp_path):
    source, model, result = _quantized_tiny(tiny_models, "tiny-qwen2", group_size=128)
    with pytest.raises(FormatError, match="in_features=192 is not a multiple of group size 128"):
        write_artifact("awq", tmp_path / "ckpt", source, result=result, model=model)
    assert not any(tmp_path.iterdir())


@pytest.fixture()
def gptq_checkpoint(tiny_models, tmp_path):
    source, model, result = _quantized_tiny(tiny_models, "tiny-llama")
    return write_artifact("gptq", tmp_path / "ckpt", source, result=result, model=model)


def _rewrite_tensors(folder, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "quantlab_manifest.json").unlink()  # like a third-party checkpoint


def test_corrupt_checkpoints_are_refused_naming_the_tensor(gptq_checkpoint, tmp_path):
    ck = gptq_checkpoint
    with open(ck / "model.safetensors", "r+b") as fh:  # flip one byte of the data
        fh.seek(-3, 2)
        byte = fh.read(1)
        fh.seek(-3, 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptFileError, match="model.safetensors does not match its checksum"):
        load(ck)

    def variant(change):
        target = tmp_path / f"v{len(list(tmp_path.iterdir()))}"
        shutil.copytree(ck, target)
        _rewrite_tensors(target, change)
        return target

    q = "model.layers.0.self_attn.q_proj"
    missing = variant(lambda t: t.pop(f"{q}.scales"))
    with pytest.raises(CorruptFileError, match=f"tensor {q}.scales is missing"):
        load(missing)
    missing_norm = variant(lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CorruptFileError, match="tensor model.norm.weight is missing"):
        load(missing_norm)
    wrong = variant(lambda t: t.__setitem__(f"{q}.qweight", t[f"{q}.qweight"][:-1].clone()))
    with pytest.raises(CorruptFileError, match=f"tensor {q}.qweight has shape"):
        load(wrong)
    extra = variant(lambda t: t.__setitem__("model.layers.0.surprise", torch.zeros(3)))
    with pytest.raises(CorruptFileError, match="model.layers.0.surprise does not belong"):
        load(extra)
    disagree = tmp_path / "disagree"
    shutil.copytree(ck, disagree)
    (disagree / "quantlab_manifest.json").unlink()
    config = json.loads((disagree / "config.json").read_text())
    config["quantization_config"]["bits"] = 8
    (disagree / "config.json").write_text(json.dumps(config))
    with pytest.raises(CorruptFileError, match="qweight has shape"):
        load(disagree)


def test_cli_exports_gptq_and_refuses_what_awq_cannot_hold(tiny_models, tmp_path, capsys):
    from quantlab.cli import main

    base = ["quantize", str(tiny_models["tiny-qwen2"]), "--method", "rtn", "--group-size", "128"]
    assert main([*base, "--sym", "--format", "gptq", "--out", str(tmp_path / "g")]) == 0
    assert detect_format(tmp_path / "g") == "gptq"
    assert (
        "note: in_features [192, 576] are not multiples of group size 128"
        in capsys.readouterr().out
    )
    assert main([*base, "--format", "awq", "--out", str(tmp_path / "a")]) == 2
    assert "not a multiple of group_size 128" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    # asymmetric RTN may produce a zero point of 0, which v1 refuses and v2 stores
    rc = main(
        [*base, "--asym", "--format", "gptq", "--gptq-format", "v2", "--out", str(tmp_path / "v2")]
    )
    assert rc == 0 and detect_format(tmp_path / "v2") == "gptq_v2"


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_v1_zeros_written_by_word_arithmetic_read_back(bits):
    """GPTQModel writes v1 zeros by subtracting 0x11111111 (4-bit) from each whole int32 word, so a
    zero point of 0 borrows from its neighbour field; quantlab adds the constant back per word."""
    gen = torch.Generator().manual_seed(bits)
    zeros = torch.randint(0, 2**bits, (3, 64), generator=gen)
    zeros[0, :8] = 0  # fields that borrow
    ones = sum(1 << (k * bits) for k in range(32 // bits))
    words = (pack_bits(zeros, bits).to(torch.int64) & 0xFFFFFFFF) - ones
    stored = ((words & 0xFFFFFFFF) - (((words & 0xFFFFFFFF) >> 31) << 32)).to(torch.int32)
    assert torch.equal(layouts._v1_zeros(stored, bits, 64), zeros)
