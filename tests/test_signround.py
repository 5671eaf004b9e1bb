"""Signed-gradient rounding (quantlab.methods.signround): a grid every integer format stores,
offsets bounded as AutoRound bounds them, and a learned rounding that beats round-to-nearest on
the block's outputs."""

from __future__ import annotations

import pytest
import torch
from test_methods import first_block_errors

from quantlab.errors import ConfigError
from quantlab.methods.rtn import RTNConfig
from quantlab.methods.signround import SignRoundConfig, _Rounding
from quantlab.primitives import quantize_rtn


@pytest.fixture(scope="module")
def calibration(tiny_models):
    from quantlab.data import CalibrationConfig, build_calibration, load_corpus
    from quantlab.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(str(tiny_models["tiny-qwen2"])))
    return build_calibration(tok, load_corpus("pydoc"), CalibrationConfig("pydoc", "all", 4, 64))


def _weight(rows=16, cols=96, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.02


def test_bad_configs_are_refused():
    for bad in ({"iters": -1}, {"lr": -0.1}, {"batch_size": 0}, {"bits": 5}, {"group_size": 0}):
        with pytest.raises(ConfigError):
            SignRoundConfig(**bad)
    assert SignRoundConfig(iters=50).step == pytest.approx(0.02)  # AutoRound's 1 / iters
    assert SignRoundConfig(iters=50, lr=0.005).step == 0.005


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [32, -1, 40])  # 40: a shorter last group
def test_untrained_rounding_is_round_to_nearest_on_a_storable_grid(sym, group_size):
    w = _weight()
    r = _Rounding(w, 4, group_size, sym, minmax=True)
    qw = r.result(r.snapshot(), torch.float32)
    rtn = quantize_rtn(w, 4, group_size, sym)
    assert qw.qweight.shape == w.shape and qw.scales.shape == rtn.scales.shape
    assert torch.equal(qw.g_idx, rtn.g_idx)
    assert torch.equal(qw.scales, qw.scales.half().float())  # float16 scales, as formats store
    assert qw.zeros.dtype == torch.uint8 and int(qw.zeros.max()) <= 15
    if sym:
        assert (qw.zeros == 8).all()
    # the fake-quantized weight the loop trains is what the result dequantizes to
    torch.testing.assert_close(r.fake(), qw.dequantize(), rtol=0, atol=0)
    # round to nearest on RTN's range: the scales differ from RTN's (rounded up to float16)
    # by float16 rounding only, which moves a few weights sitting near a tie by one step
    torch.testing.assert_close(qw.scales, rtn.scales, rtol=1e-3, atol=0)
    diff = (qw.dequantize() - rtn.dequantize()).abs()
    step = rtn.scales[:, rtn.g_idx.long()]
    assert (diff <= 1.01 * step).all() and (diff > 0.5 * step).float().mean() < 0.02


def test_a_step_moves_each_offset_by_the_learning_rate_and_stays_in_bounds():
    w = _weight()
    r = _Rounding(w, 3, 32, False, minmax=True)
    target = torch.randn_like(w)
    for step in range(3):
        loss = (r.fake() - target).pow(2).sum()
        loss.backward()
        r.step(0.3)
        if step == 0:  # signed SGD: every offset moved by exactly the learning rate
            moved = torch.unique(r.v.detach().abs()).tolist()
            assert moved == pytest.approx([0.3]) or moved == pytest.approx([0.0, 0.3])
    assert r.v.abs().max() <= 0.5 and r.lo.max() <= 1 and r.hi.max() <= 1
    assert r.lo.min() >= 0 and r.hi.min() >= 0 and (r.v.abs() == 0.5).any()  # clamped


def test_learned_rounding_beats_round_to_nearest_on_block_outputs(tiny_models, calibration):
    variants = (("rtn", RTNConfig(3, 64)), ("signround", SignRoundConfig(3, 64, iters=60)))
    errors = first_block_errors(tiny_models, calibration, variants)
    assert errors["signround"] < 0.5 * errors["rtn"]


def test_the_best_parameters_are_kept_and_iters_zero_is_round_to_nearest(tiny_models, calibration):
    from quantlab.methods.runner import BlockContext, _capture_first_block_inputs
    from quantlab.methods.signround import learn_rounding
    from quantlab.models import arch_spec, load_model, resolve_model

    model = load_model(resolve_model(str(tiny_models["tiny-qwen2"])))
    arch = arch_spec("Qwen2ForCausalLM")
    ids = torch.as_tensor(calibration.input_ids)
    hidden, kwargs = _capture_first_block_inputs(model, arch, ids, torch.float32, "cpu")
    block = model.get_submodule(arch.blocks)[0]
    ctx = BlockContext("b", block, block, arch, hidden, kwargs, {})
    target = ctx.forward().clone()
    untrained = learn_rounding(ctx, SignRoundConfig(4, 32, iters=0), target)
    for name, qw in untrained.items():
        rtn = quantize_rtn(ctx.weight(name), 4, 32, False)
        assert torch.equal(qw.g_idx, rtn.g_idx) and (qw.scales - rtn.scales).abs().max() < 1e-3
    assert all(p.requires_grad for p in block.parameters())  # flags restored
    trained = learn_rounding(ctx, SignRoundConfig(4, 32, iters=30, batch_size=2), target)

    def error(weights) -> float:
        for name, qw in weights.items():
            block.get_submodule(name).weight.data.copy_(qw.dequantize())
        out = ctx.forward()
        return float((out - target).pow(2).mean())

    original = {n: block.get_submodule(n).weight.detach().clone() for n in ctx.linear_names}
    try:
        assert error(trained) < error(untrained)
    finally:
        for n, w in original.items():
            block.get_submodule(n).weight.data.copy_(w)
