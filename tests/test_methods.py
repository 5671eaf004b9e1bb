"""RTN, GPTQ and AWQ: the reference primitives, the solvers, and the calibration pipeline."""

import pytest
import torch

from quantlab.data import CalibrationConfig, build_calibration, load_corpus
from quantlab.errors import ConfigError
from quantlab.methods import get_method, method_names, register_method
from quantlab.methods.awq import AWQConfig, search_clip, search_scale
from quantlab.methods.gptq import GPTQConfig, accumulate_hessian, gptq_quantize
from quantlab.methods.rtn import RTNConfig
from quantlab.methods.runner import quantize_model
from quantlab.models import arch_spec, load_model, load_tokenizer, resolve_model
from quantlab.primitives import dequantize, fake_quantize, quantize_rtn


def correlated_inputs(n=2048, d=192, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen) / d**0.5
    x = torch.randn(n, d, generator=gen) @ mix + 0.1 * torch.randn(n, d, generator=gen)
    x[:, :4] *= 10  # a few outlier channels, as in real activations
    return x


def output_mse(W, Wq, X):
    return ((X @ (Wq - W).T) ** 2).mean().item()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_codes_round_trip_and_error_is_bounded(bits, group_size, sym):
    W = torch.randn(24, 192, generator=torch.Generator().manual_seed(bits))
    qw = quantize_rtn(W, bits, group_size, sym)
    assert qw.qweight.dtype == torch.uint8 and int(qw.qweight.max()) <= 2**bits - 1
    assert qw.n_groups == (1 if group_size == -1 else -(-192 // group_size))
    deq = dequantize(qw)
    # every value is within half a step of the original (the range always covers the group)
    step = qw.scales[:, qw.g_idx.long()]
    assert torch.all((deq - W).abs() <= step / 2 + 1e-6)
    assert torch.equal(deq, fake_quantize(W, bits, group_size, sym))


def test_all_zero_group_and_constant_row_are_exact():
    """Exact up to the float16 rounding of the scale (relative 2**-10), which every checkpoint
    format needs; an all-zero group stays exactly zero."""
    W = torch.zeros(3, 64)
    W[1] = 0.5
    W[2, 32:] = -1.25
    qw = quantize_rtn(W, 4, 32, sym=False)
    deq = qw.dequantize()
    torch.testing.assert_close(deq, W, rtol=2**-10, atol=0)
    assert torch.equal(deq[0], W[0]) and torch.equal(deq[2, :32], W[2, :32])
    assert torch.equal(qw.scales.half().float(), qw.scales)


def test_group_size_that_does_not_divide_leaves_a_short_last_group():
    W = torch.randn(4, 192)
    qw = quantize_rtn(W, 4, 128, sym=False)
    assert qw.n_groups == 2 and int((qw.g_idx == 1).sum()) == 64


def test_bad_configs_are_refused():
    for bad in (
        lambda: RTNConfig(bits=5),
        lambda: GPTQConfig(group_size=0),
        lambda: GPTQConfig(damp_percent=0),
        lambda: AWQConfig(n_grid=0),
    ):
        with pytest.raises(ConfigError):
            bad()
    with pytest.raises(ConfigError, match="unknown method 'no-such'; known: .*gptq"):
        get_method("no-such")
    assert {"awq", "gptq", "rtn"} <= set(method_names())
    with pytest.raises(ValueError, match="already registered"):
        register_method("gptq", GPTQConfig, needs_calibration=True)(lambda ctx, cfg: None)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("static_groups", [False, True])
def test_gptq_reconstruction_error_beats_rtn(act_order, static_groups):
    X = correlated_inputs()
    W = torch.randn(96, 192, generator=torch.Generator().manual_seed(1)) * 0.05
    H, n = accumulate_hessian(None, 0, X)
    assert n == X.shape[0]
    cfg = GPTQConfig(
        bits=4, group_size=64, sym=False, act_order=act_order, static_groups=static_groups
    )
    qw = gptq_quantize(W, H, cfg)
    gptq_err = output_mse(W, qw.dequantize(), X)
    rtn_err = output_mse(W, fake_quantize(W, 4, 64, sym=False), X)
    assert gptq_err < 0.7 * rtn_err
    assert qw.act_order == (act_order and not static_groups)
    # each group's codes use that group's own scale: g_idx values partition the columns
    assert sorted(torch.bincount(qw.g_idx.long()).tolist()) == [64, 64, 64]


def test_gptq_with_identity_hessian_is_rtn():
    W = torch.randn(16, 128)
    qw = gptq_quantize(W, torch.eye(128), GPTQConfig(bits=4, group_size=32, sym=False))
    assert torch.equal(qw.dequantize(), fake_quantize(W, 4, 32, sym=False))


def test_gptq_hessian_running_average_matches_one_shot():
    X = correlated_inputs(n=300)
    H1, _ = accumulate_hessian(None, 0, X)
    H2, n = accumulate_hessian(None, 0, X[:100])
    H2, n = accumulate_hessian(H2, n, X[100:])
    torch.testing.assert_close(H1, H2, rtol=1e-5, atol=1e-4)


def test_gptq_dead_inputs_get_zero_weight():
    X = correlated_inputs()
    X[:, 7] = 0
    W = torch.randn(8, 192)
    qw = gptq_quantize(W, accumulate_hessian(None, 0, X)[0], GPTQConfig(group_size=64))
    assert torch.all(qw.dequantize()[:, 7] == 0)


def test_awq_scale_search_never_loses_to_no_scaling():
    X = correlated_inputs()
    W = torch.randn(64, 192) * 0.05
    H = accumulate_hessian(None, 0, X)[0]
    cfg = AWQConfig(bits=3, group_size=64)
    s, alpha = search_scale([W], H, X.abs().mean(0), cfg)
    scaled = fake_quantize(W * s, 3, 64, False) / s
    assert output_mse(W, scaled, X) <= output_mse(W, fake_quantize(W, 3, 64, False), X) + 1e-9
    clip = search_clip(W * s, H / s[:, None] / s[None, :], cfg)
    assert clip.shape == (64, 3) and torch.all(clip <= (W * s).abs().reshape(64, 3, 64).amax(2))


@pytest.fixture(scope="module")
def calibration(tiny_models):
    tok = load_tokenizer(resolve_model(str(tiny_models["tiny-qwen2"])))
    return build_calibration(tok, load_corpus("pydoc"), CalibrationConfig("pydoc", "all", 4, 64))


def test_gptq_importance_matrix_from_its_hessian_equals_the_measured_one(tiny_models, calibration):
    """GPTQ records mean(x^2) as diag(H)/2 instead of a second pass over the inputs: the first
    block's inputs are the same for every method, so its imatrix must match RTN's measured one."""
    model_ref = resolve_model(str(tiny_models["tiny-llama"]))
    arch = arch_spec("LlamaForCausalLM")
    results = {}
    for method in ("rtn", "gptq"):
        config = get_method(method).config_cls(bits=4, group_size=64)
        model = load_model(model_ref)
        results[method] = quantize_model(model, arch, method, config, calibration, progress=False)
    for lin in ("self_attn.q_proj", "self_attn.k_proj"):  # later groups see quantized inputs
        name = f"{arch.blocks}.0.{lin}"
        torch.testing.assert_close(
            results["gptq"].imatrix[name], results["rtn"].imatrix[name], rtol=1e-5, atol=1e-7
        )
    assert results["gptq"].imatrix_tokens == results["rtn"].imatrix_tokens == 4 * 64


def first_block_errors(tiny_models, calibration, variants) -> dict[str, float]:
    """Mean squared error of block 0's output after each (method, config), same inputs."""
    from quantlab.methods.runner import _capture_first_block_inputs

    model_ref = resolve_model(str(tiny_models["tiny-llama"]))
    arch = arch_spec("LlamaForCausalLM")
    ids = torch.as_tensor(calibration.input_ids)
    errors = {}
    for method, config in variants:
        model, reference = load_model(model_ref), load_model(model_ref)
        hidden, kwargs = _capture_first_block_inputs(reference, arch, ids, torch.float32, "cpu")
        with torch.inference_mode():
            want = reference.model.layers[0](hidden, **kwargs)
        quantize_model(model, arch, method, config, calibration, progress=False)
        with torch.inference_mode():
            got = model.model.layers[0](hidden, **kwargs)
        errors[method] = float(((got - want) ** 2).mean())
    return errors


def test_gptq_beats_rtn_on_block_outputs(tiny_models, calibration):
    variants = (("rtn", RTNConfig(3, 64)), ("gptq", GPTQConfig(3, 64, sym=False)))
    errors = first_block_errors(tiny_models, calibration, variants)
    assert errors["gptq"] < errors["rtn"]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_folding_awq_scales_leaves_the_unquantized_block_unchanged(tiny_models, calibration, name):
    from quantlab.methods.runner import BlockContext, _capture_first_block_inputs

    model = load_model(resolve_model(str(tiny_models[name])))
    arch = arch_spec(model.config.architectures[0])
    ids = torch.as_tensor(calibration.input_ids)
    hidden, kwargs = _capture_first_block_inputs(model, arch, ids, torch.float32, "cpu")
    block = model.get_submodule(arch.blocks)[0]
    ctx = BlockContext("b", block, block, arch, hidden, kwargs, {})
    before = ctx.forward().clone()
    gen = torch.Generator().manual_seed(0)
    folded = 0
    for group in arch.input_groups:
        if ctx.can_fold(group):
            width = block.get_submodule(group.linears[0]).in_features
            ctx.fold_scale(group, torch.rand(width, generator=gen) + 0.5)
            folded += 1
    assert folded >= 3  # norms and up_proj (v_proj -> o_proj only without grouped-query heads)
    torch.testing.assert_close(ctx.forward(), before, rtol=1e-4, atol=1e-4)
    assert ctx.modified


def test_awq_beats_rtn_on_block_outputs(tiny_models, calibration):
    variants = (("rtn", RTNConfig(3, 64)), ("awq", AWQConfig(3, 64)))
    errors = first_block_errors(tiny_models, calibration, variants)
    assert errors["awq"] < errors["rtn"]


def test_collect_imatrix_is_the_mean_square_input_of_every_linear(tiny_models, calibration):
    from quantlab.methods.runner import collect_imatrix

    model = load_model(resolve_model(str(tiny_models["tiny-qwen2"])))
    arch = arch_spec("Qwen2ForCausalLM")
    imatrix, rows = collect_imatrix(model, arch, calibration, progress=False)
    expected, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith(arch.blocks):

            def grab(_m, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                expected[name] = (x.square().mean(dim=0).float(), x.shape[0])

            hooks.append(module.register_forward_pre_hook(grab))
    with torch.no_grad():
        model(torch.as_tensor(calibration.input_ids))
    for h in hooks:
        h.remove()
    assert set(imatrix) == set(expected) and rows == 4 * 64
    for name, (mean, n) in expected.items():
        assert n == rows
        torch.testing.assert_close(imatrix[name], mean, rtol=1e-5, atol=1e-8)


# -- the fast paths equal what they replace ------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("sym", [True, False])
def test_fake_quantize_is_bit_identical_to_dequantize_of_rtn(bits, group_size, sym):
    gen = torch.Generator().manual_seed(bits * 1000 + group_size)
    for shape in [(7, 576), (5, 130), (16, 64)]:
        w = torch.randn(*shape, generator=gen) * 0.05
        w[0, :40] = 0  # an all-zero group
        w[1] = 0.3  # a constant row
        expected = dequantize(quantize_rtn(w, bits, group_size, sym))
        assert torch.equal(fake_quantize(w, bits, group_size, sym), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_triangular_hessian_equals_the_full_product(dtype):
    x = correlated_inputs(n=3000, d=200).to(dtype)  # 3000 rows: two bf16 chunks, one short
    H, n = accumulate_hessian(None, 0, x)
    expected = 2 * x.double().T @ x.double() / n
    assert torch.allclose(H.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


@pytest.mark.parametrize("d", [160, 600])  # one and three levels of the recursive inverse
def test_inverse_cholesky_upper_is_the_cholesky_factor_of_the_inverse(d):
    from quantlab.methods.gptq import inverse_cholesky_upper

    x = correlated_inputs(n=4096, d=d)
    H = accumulate_hessian(None, 0, x)[0].double()
    H.diagonal().add_(0.01 * H.diagonal().mean())
    U = inverse_cholesky_upper(H)
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    assert torch.equal(U, torch.triu(U)) and bool((U.diagonal() > 0).all())
    assert torch.allclose(U, reference, rtol=1e-9, atol=1e-12)


def test_awq_output_error_and_mean_abs_equal_their_definitions():
    from quantlab.methods.awq import mean_abs, output_error

    x = correlated_inputs(n=5000, d=150)
    H = accumulate_hessian(None, 0, x)[0]
    dW = torch.randn(70, 150, generator=torch.Generator().manual_seed(1)) * 1e-3
    expected = torch.trace(dW.double() @ H.double() @ dW.double().T)
    assert output_error(dW, H).item() == pytest.approx(expected.item(), rel=1e-5)
    xb = x.bfloat16()
    assert torch.allclose(mean_abs(xb), xb.float().abs().mean(dim=0), rtol=1e-5)


def test_chunked_bit_packing_equals_one_pass(monkeypatch):
    from quantlab.formats import packing

    codes = torch.randint(0, 16, (37, 200), generator=torch.Generator().manual_seed(2))
    for bits in (2, 3, 4, 8):
        c = codes % (1 << bits)
        whole = packing.pack_bits(c, bits)
        monkeypatch.setattr(packing, "_CHUNK_CODES", 450)  # 2 rows per chunk
        assert torch.equal(packing.pack_bits(c, bits), whole)
        monkeypatch.undo()
        assert torch.equal(packing.unpack_bits(whole, bits, 200), c)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_calibration_forward_in_chunks_gives_the_same_quantization(
    tiny_models, calibration, monkeypatch, name, method
):
    """The calibration forward runs the batch in chunks that stop at every input group
    (`runner._chunked_forward`): the same codes, scales, AWQ changes and imatrix as one pass."""
    from quantlab.methods import runner

    model_ref = resolve_model(str(tiny_models[name]))
    config = get_method(method).config_cls(bits=4, group_size=64)
    chunks, results = [], []
    slices = runner._batch_slices
    monkeypatch.setattr(runner, "_batch_slices", lambda *a: chunks.append(slices(*a)) or chunks[-1])
    for tokens in (10**6, 64):  # one pass; then one chunk per 64-token sequence
        monkeypatch.setattr(runner, "CHUNK_TOKENS", tokens)
        model = load_model(model_ref)
        arch = arch_spec(model.config.architectures[0])
        results.append(quantize_model(model, arch, method, config, calibration, progress=False))
    assert {len(c) for c in chunks} == {1, 4}
    one, chunked = results
    assert set(one.weights) == set(chunked.weights)
    for key, qw in one.weights.items():
        other = chunked.weights[key]
        assert torch.equal(qw.qweight, other.qweight) and torch.equal(qw.scales, other.scales)
        assert torch.equal(qw.zeros, other.zeros)
    for key in one.imatrix:
        assert torch.equal(one.imatrix[key], chunked.imatrix[key])
    assert one.imatrix_tokens == chunked.imatrix_tokens == 4 * 64
    assert set(one.modified) == set(chunked.modified)
    for key in one.modified:
        assert torch.equal(one.modified[key], chunked.modified[key])


def test_an_error_at_a_stop_unwinds_every_chunk_and_leaves_no_hook(tiny_models, calibration):
    from quantlab.methods import runner

    model = load_model(resolve_model(str(tiny_models["tiny-llama"])))
    arch = arch_spec("LlamaForCausalLM")
    ids = torch.as_tensor(calibration.input_ids)
    hidden, kwargs = runner._capture_first_block_inputs(model, arch, ids, torch.float32, "cpu")
    block = model.model.layers[0]
    stops = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    seen = []

    def at_stop(name, xs):
        seen.append((name, len(xs), sum(len(x) for x in xs)))
        if name == "mlp.gate_proj":
            raise ValueError("boom")

    runner.CHUNK_TOKENS, before = 64, runner.CHUNK_TOKENS
    try:
        with pytest.raises(ValueError, match="boom"):
            runner._chunked_forward(block, hidden, kwargs, stops, at_stop)
        assert seen == [(name, 4, 4) for name in stops[:3]]  # 4 chunks, 4 sequences in all
        assert not any(m._forward_pre_hooks for m in block.modules())
        import gc
        import warnings

        import greenlet

        gc.collect()
        with warnings.catch_warnings():  # isinstance over every object touches deprecated ones
            warnings.simplefilter("ignore")
            paused = [g for g in gc.get_objects() if isinstance(g, greenlet.greenlet) and g.parent]
        assert not [g for g in paused if not g.dead]  # every chunk was unwound
        out = runner._chunked_forward(block, hidden, kwargs, [], lambda *a: None)
    finally:
        runner.CHUNK_TOKENS = before
    with torch.inference_mode():
        want = block(hidden, **kwargs)
    assert torch.equal(out, want[0] if isinstance(want, tuple) else want)
