"""The CPU runtime (`quantlab.kernels.cpu`): PyTorch's int4 / int8 CPU kernels behind QuantLinear.

What must hold: the packing round-trips exactly (codes, scales, zero points, ``g_idx``); the
weight the kernel applies equals the reference dequantization bit for bit wherever the layout is
declared exact (read back by multiplying the identity); what it cannot represent is refused with
the reason and stays on the reference path; a loaded checkpoint's logits through the kernels
match the reference's to float32 summation order. Speed is measured in `bench/kernels.py --cpu`.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

from quantlab.errors import ConfigError
from quantlab.kernels import cpu
from quantlab.qlinear import QuantLinear, use_fast_kernels, use_kernels
from quantlab.types import QuantizedWeight

pytestmark = pytest.mark.skipif(cpu.available() is not None, reason=str(cpu.available()))


def _seed() -> int:
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    return zlib.crc32(f"{os.environ.get('QUANTLAB_TEST_SEED', '0')}:{test}".encode())


def _weight(seed, n, k, bits, group_size, act_order=False, sym=False) -> QuantizedWeight:
    """Random codes, zero points and float16-valued scales (as every checkpoint stores them)."""
    g = torch.Generator().manual_seed(seed)
    groups = -(-k // group_size) if group_size > 0 else 1
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    if sym:
        zeros = torch.full((n, groups), 2 ** (bits - 1), dtype=torch.uint8)
    else:
        zeros = torch.randint(0, 2**bits, (n, groups), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, groups, generator=g) * 0.1 + 1e-3).half().float()
    size = group_size if group_size > 0 else k
    g_idx = torch.arange(k, dtype=torch.int32) // size
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)].contiguous()
    return QuantizedWeight(codes, scales, zeros, g_idx, bits, group_size, sym, torch.float16)


def _applied_weight(layer: QuantLinear) -> torch.Tensor:
    """The (N, K) weight the layer's kernel applies: the identity through its forward."""
    eye = torch.eye(layer.in_features)
    with torch.no_grad():
        return layer(eye).t()


EXACT = [  # (N, K, bits, group size, act-order, sym): every layout the kernels take exactly
    (96, 576, 4, 128, False, False),  # group 128 on a width of 576: kernel groups of 64
    (64, 576, 4, 32, False, False),
    (48, 1536, 4, 64, False, True),
    (64, 256, 4, 64, True, False),  # act-order: columns permuted once into group order
    (48, 512, 4, -1, False, False),  # one group per row
    (32, 192, 8, -1, False, True),  # int8, symmetric per channel
]


@pytest.mark.parametrize("n,k,bits,group_size,act_order,sym", EXACT)
def test_the_packing_round_trips_and_the_applied_weight_is_bit_exact(
    n, k, bits, group_size, act_order, sym
):
    seed = _seed()
    qw = _weight(seed, n, k, bits, group_size, act_order, sym)
    assert cpu.refusal(qw) is None
    layer = QuantLinear(qw)
    layer.use_kernel()
    assert layer.kernel["backend"] == "cpu"
    assert layer.kernel["layout"] == ("int8pack" if bits == 8 else "int4pack")
    assert not hasattr(layer, "zeros")  # the byte-per-code buffers are gone
    back = layer.quantized_weight()
    for name in ("qweight", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(back, name), getattr(qw, name)), f"seed {seed}: {name}"
    assert torch.equal(_applied_weight(layer), qw.dequantize()), f"seed {seed}"


@pytest.mark.parametrize("n,k,bits,group_size,act_order,sym", EXACT)
@pytest.mark.parametrize("rows", [1, 7])
def test_the_layer_output_matches_the_reference(n, k, bits, group_size, act_order, sym, rows):
    seed = _seed()
    qw = _weight(seed, n, k, bits, group_size, act_order, sym)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    reference, layer = QuantLinear(qw, bias), QuantLinear(qw, bias)
    layer.use_kernel("cpu")
    x = torch.randn(2, rows, k, generator=torch.Generator().manual_seed(seed + 1))
    out = torch.full((2, rows, n), float("nan"))
    with torch.no_grad():
        out[:] = layer(x)
        expected = reference(x)
    # the same weights, another summation order: float32 rounding of a K-term sum
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max(), f"seed {seed}"
    # bfloat16 activations: scales and zeros rounded to bf16, so only close
    with torch.no_grad():
        y = layer(x.bfloat16()).float()
    assert (y - expected).abs().max() <= 0.05 * expected.abs().max(), f"seed {seed}"


@pytest.mark.parametrize(
    "bits,group_size,sym,reason",
    [
        (3, 64, False, "4-bit codes, not 3-bit"),
        (2, 32, False, "4-bit codes, not 2-bit"),
        (4, 16, False, "groups of a multiple of 32"),
        (4, 96, False, "groups of a multiple of 32"),  # 96 = 3 x 32 divides 576: fine below
        (8, 64, True, "one scale per output row"),
        (8, -1, False, "symmetric"),
        (4, 64, False, "multiple of 16 output features"),
    ],
)
def test_what_the_kernels_cannot_hold_is_refused_and_stays_on_the_reference(
    bits, group_size, sym, reason
):
    k = 576 if group_size != 96 else 600  # 600 is not a multiple of 32
    n = 24 if "16 output" in reason else 32
    qw = _weight(_seed(), n, k, bits, group_size, sym=sym)
    assert reason in cpu.refusal(qw)
    layer = QuantLinear(qw)
    with pytest.raises(ConfigError, match=reason.split(",")[0]):
        layer.use_kernel("cpu")
    model = torch.nn.Sequential(QuantLinear(qw), QuantLinear(_weight(1, 32, 576, 4, 64)))
    assert use_fast_kernels(model) == {"reference": 1, "cpu": 1}
    assert model[0].kernel is None and model[1].kernel["backend"] == "cpu"


def test_act_order_groups_of_unequal_sizes_are_refused():
    qw = _weight(_seed(), 16, 128, 4, 32)
    g_idx = qw.g_idx.clone()
    g_idx[0], g_idx[40] = 1, 0  # still 4 groups, but one column moved: sizes stay equal...
    g_idx[1] = 1  # ...until group 0 loses another column
    bad = QuantizedWeight(qw.qweight, qw.scales, qw.zeros, g_idx, 4, 32, False)
    assert "unequal sizes" in cpu.refusal(bad)


def test_a_forced_torch_backend_keeps_the_gptq_layout():
    layer = QuantLinear(_weight(_seed(), 32, 128, 4, 32))
    layer.use_kernel("torch")
    assert layer.kernel["layout"] == "gptq"


@pytest.mark.parametrize(
    "name,fmt,group_size",
    [("tiny-llama", "gptq_v2", 32), ("tiny-qwen2", "gptq", 64), ("tiny-mistral", "awq", 64)],
)
def test_a_loaded_checkpoint_runs_through_the_cpu_kernels(
    tiny_models, tmp_path, name, fmt, group_size
):
    from quantlab.eval.runners import runtime_of
    from quantlab.formats import write_artifact
    from quantlab.formats.loader import load
    from quantlab.methods.rtn import RTNConfig
    from quantlab.methods.runner import quantize_model
    from quantlab.models import load_model, resolve_model

    source = resolve_model(str(tiny_models[name]))
    model = load_model(source)
    result = quantize_model(
        model, source.folder.arch, "rtn", RTNConfig(4, group_size, False), None, progress=False
    )
    out = write_artifact(fmt, tmp_path / "ckpt", source, result=result, model=model)
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(_seed()))
    reference, _ = load(out)
    fast, _ = load(out)
    assert runtime_of(reference) == "transformers+reference dequant"
    counts = use_fast_kernels(fast)
    assert set(counts) == {"cpu"} and counts["cpu"] > 0
    assert runtime_of(fast) == "transformers+cpu kernels"
    with torch.no_grad():
        expected, logits = reference(ids).logits, fast(ids).logits
    assert (logits - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert use_kernels(reference) > 0  # use_kernels on a CPU picks the same kernels
    assert runtime_of(reference) == "transformers+cpu kernels"


def test_the_harness_measures_the_kernels_and_names_them(tiny_models, tmp_path):
    from quantlab.eval.harness import open_runner
    from quantlab.formats import write_artifact
    from quantlab.methods.rtn import RTNConfig
    from quantlab.methods.runner import quantize_model
    from quantlab.models import load_model, resolve_model

    source = resolve_model(str(tiny_models["tiny-llama"]))
    model = load_model(source)
    result = quantize_model(
        model, source.folder.arch, "rtn", RTNConfig(3, 32, False), None, progress=False
    )
    out = write_artifact("gptq_v2", tmp_path / "w3", source, result=result, model=model)
    runner, _ = open_runner(str(out), kernels=True)  # 3-bit: nothing the CPU kernels take
    assert runner.runtime == "transformers+reference dequant"
    assert not runner.use_fast_runtime()
    result = quantize_model(
        model, source.folder.arch, "rtn", RTNConfig(4, 32, False), None, progress=False
    )
    out = write_artifact("gptq_v2", tmp_path / "w4", source, result=result, model=model)
    # the CPU kernels' fast path takes bf16 activations: the float32 model runs in bf16
    runner = open_runner(str(out), kernels=True)[0]
    assert runner.runtime == "transformers+cpu kernels, bfloat16"
    ids = torch.randint(0, 250, (24,), generator=torch.Generator().manual_seed(_seed()))
    exact = open_runner(str(out))[0]
    assert exact.runtime == "transformers+reference dequant"
    a, b = exact.logits(ids.numpy()), runner.logits(ids.numpy())
    assert abs(a - b).max() <= 0.05 * abs(a).max()  # bf16 activations: close, not equal
    # the harness: quality on the exact weights, speed through the kernels
    from quantlab.eval.harness import EvalConfig, evaluate
    from quantlab.eval.perplexity import PerplexityConfig

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    ppl = (PerplexityConfig(corpus=str(text), split="all", context=64, max_tokens=512),)
    speed = {"speed": True, "speed_runs": 1, "speed_prompt_tokens": 8, "speed_decode_tokens": 4}
    m = evaluate(str(out), EvalConfig(perplexity=ppl, **speed))
    assert m.runtime == "transformers+reference dequant"
    assert m.speed.runtime == "transformers+cpu kernels, bfloat16"
    ref = evaluate(str(out), EvalConfig(perplexity=ppl, kernels=False, **speed))
    assert ref.speed.runtime == "transformers+reference dequant"
    assert ref.perplexity[0].ppl == m.perplexity[0].ppl  # quality: the same exact weights
