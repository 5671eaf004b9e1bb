"""Kernels against the torch reference: every registered kernel, random inputs drawn from a
seed (``pytest --seed N``, default 0, mixed with each test's id; a failure names it), outputs
poisoned with NaN beforehand (an element a kernel forgets to write stays NaN).

Without a GPU the Triton kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1);
the CUDA kernel is compiled with nvcc for sm_80 and sm_90 but not run. Tests marked ``gpu`` run
the kernels on a CUDA device and are skipped without one.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import zlib

import numpy as np
import pytest
import torch

from quantlab import kernels
from quantlab.errors import ConfigError
from quantlab.kernels import reference as ref
from quantlab.types import QuantizedWeight

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="needs triton (quantlab[kernels])"
)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _seed() -> int:
    """The current test's seed: the session's base seed (``--seed``) mixed with the test's id,
    so each test draws its own inputs and a failure replays with the same command."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    return zlib.crc32(f"{os.environ.get('QUANTLAB_TEST_SEED', '0')}:{test}".encode())


def _packed_gptq(seed, K, N, bits, group_size, act_order):
    """Random codes / zeros / fp16 scales, packed in the GPTQ layout."""
    from quantlab.formats.layouts import pack_gptq

    g = torch.Generator().manual_seed(seed)
    groups = -(-K // group_size)
    codes = torch.randint(0, 2**bits, (N, K), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 2**bits, (N, groups), generator=g, dtype=torch.uint8)
    scales = (torch.rand(N, groups, generator=g) * 0.1 + 1e-3).half().float()
    g_idx = torch.arange(K, dtype=torch.int32) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=g)].contiguous()
    qw = QuantizedWeight(codes, scales, zeros, g_idx, bits, group_size, False, torch.float16)
    p = pack_gptq("w", qw, "gptq_v2")
    return [p[k].to(DEVICE) for k in ("qweight", "qzeros", "scales", "g_idx")]


def _triton():
    from quantlab.kernels import triton_kernels

    return triton_kernels


def _assert_same(out: torch.Tensor, expected: torch.Tensor, seed: int) -> None:
    """Bit for bit; except bf16 in Triton's CPU interpreter, whose fp32 -> bf16 cast truncates
    where a GPU (and torch) rounds to nearest even: there, within one bf16 unit in the last
    place."""
    assert not torch.isnan(out).any(), f"seed {seed}: elements left unwritten"
    if out.dtype == torch.bfloat16 and out.device.type == "cpu":
        diff = (out.float() - expected.float()).abs()
        assert (diff <= expected.float().abs() * 2.0**-7).all(), f"seed {seed}"
    else:
        assert torch.equal(out, expected), f"seed {seed}"


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


# -- the registry ---------------------------------------------------------------------------------


def test_every_op_has_a_torch_reference_and_registration_is_checked():
    ops = {k.op for k in kernels.kernels()}
    assert ops == set(kernels.OPS)
    for op in ops:
        assert any(k.op == op and k.backend == "torch" for k in kernels.kernels())
    with pytest.raises(ValueError, match="already registered"):
        kernels.register_kernel(kernels.KernelSpec("dequant_gptq", "torch", "x:y"))


def _kernel_case(spec, seed: int):
    """Inputs for ``spec`` and the ground truth it must reproduce (primitives' dequantization,
    the gguf package's): ``(args, expected, exact)``, one case per op (a new op needs one)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    from quantlab.formats.layouts import pack_awq, pack_gptq
    from quantlab.primitives import dequantize, quantize_rtn

    g = torch.Generator().manual_seed(seed)
    if spec.op == "dequant_gguf":
        layout = spec.layouts[seed % len(spec.layouts)]
        raw = _gguf_blocks(layout, seed)
        size = ref.GGUF_BLOCKS[layout][1]
        truth = gguf_dequantize(raw.numpy().reshape(-1, size), GGMLQuantizationType[layout])
        expected = torch.from_numpy(truth.reshape(-1).astype(np.float32))
        return (raw.to(DEVICE), layout, torch.float32), expected, True
    bits = spec.bits[seed % len(spec.bits)]
    sym = bool(seed & 1)
    if spec.op in ("matmul_int4pack", "matmul_int8pack"):  # PyTorch's CPU layouts
        from quantlab.kernels import cpu

        # int8: one symmetric group per row; int4: groups of 32, act-order on odd seeds
        qw = quantize_rtn(torch.randn(64, 128, generator=g), bits, -1 if bits == 8 else 32, True)
        if bits == 4 and seed & 1:
            perm = torch.randperm(128, generator=g)
            qw = QuantizedWeight(
                qw.qweight[:, perm], qw.scales, qw.zeros, qw.g_idx[perm].contiguous(), 4, 32, True
            )
        kind, t = cpu.pack(qw)
        x = torch.randn(3, 128, generator=g)
        if kind == "int8pack":
            args = (x, t["weight_int8"], t["scales"])
        else:
            args = (x, t["packed"], t["scales_zeros"], t["perm"], cpu.group_of(t, 128))
        return args, x @ dequantize(qw).T, False
    qw = quantize_rtn(torch.randn(64, 128, generator=g), bits, 32, sym)
    weight = dequantize(qw).T  # (K, N), float32
    if spec.op == "dequant_awq":
        p = {k: v.to(DEVICE) for k, v in pack_awq("w", qw).items()}
        return (p["qweight"], p["qzeros"], p["scales"], 32, torch.float32), weight, True
    p = pack_gptq("w", qw, "gptq_v2")
    packed = [p[k].to(DEVICE) for k in ("qweight", "qzeros", "scales", "g_idx")]
    if spec.op == "dequant_gptq":
        return (*packed, bits, torch.float32), weight, True
    assert spec.op == "matmul_gptq", f"no test inputs for op {spec.op}: add a case here"
    x = torch.randn(min(4, spec.max_batch or 4), 128, generator=g)
    return (x.to(DEVICE), *packed, bits), x @ weight, False


@pytest.mark.parametrize("spec", kernels.kernels(), ids=lambda k: k.name)
def test_every_registered_kernel_reproduces_the_ground_truth(spec):
    """Registry-driven: each kernel where it can run here (the torch reference anywhere, Triton
    in its interpreter on a CPU, CUDA on a GPU), on the op's inputs, against primitives'
    dequantization or the gguf package: bit for bit, matmuls within float32 summation order."""
    why = spec.unavailable(DEVICE)
    if why:
        pytest.skip(why)
    seed = _seed()
    args, expected, exact = _kernel_case(spec, seed)
    out = spec.load()(*args).float().cpu()
    if exact:
        assert torch.equal(out.reshape(expected.shape), expected), f"seed {seed}"
    else:
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4, msg=f"seed {seed}")


def test_selection_prefers_the_best_available_and_explains_a_refusal():
    # auto on a CPU: the torch reference (never the interpreter)
    assert kernels.select("matmul_gptq", device="cpu", bits=4, batch=1).backend == "torch"
    with pytest.raises(ConfigError, match="runs on cuda, not cpu"):
        kernels.select("matmul_gptq", device="cpu", backend="cuda", bits=4, batch=1)
    with pytest.raises(ConfigError, match="supports \\(4,\\) bits, not 8"):
        kernels.select("dequant_awq", device="cpu", backend="torch", bits=8)
    with pytest.raises(ConfigError, match="unknown kernel op"):
        kernels.select("gemm", device="cpu")
    spec = kernels.select("matmul_gptq", device="cpu", backend="torch", bits=4, batch=1)
    assert spec.load() is ref.matmul_gptq
    if torch.cuda.is_available():
        best = kernels.select("matmul_gptq", device="cuda", bits=4, batch=1)
        assert best.backend in ("cuda", "triton")
        assert kernels.select("matmul_gptq", device="cuda", bits=4, batch=16).backend == "triton"
        assert kernels.select("matmul_gptq", device="cuda", bits=4, batch=65).backend == "torch"


# -- Triton kernels vs the reference --------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize(
    "bits,K,N,group_size,act_order",
    [
        (4, 256, 96, 64, False),
        (4, 128, 200, 32, True),
        (8, 96, 64, 32, True),
        (2, 192, 48, 128, False),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_gptq_dequant_is_bit_exact(bits, K, N, group_size, act_order, dtype):
    seed = _seed()
    args = _packed_gptq(seed, K, N, bits, group_size, act_order)
    out = _poisoned((K, N), dtype)
    _triton().dequant_gptq(*args, bits, dtype, out=out)
    _assert_same(out, ref.dequant_gptq(*args, bits, dtype), seed)


@needs_triton
@pytest.mark.parametrize("K,N,group_size", [(128, 64, 32), (256, 200, 128), (64, 24, 64)])
def test_triton_awq_dequant_is_bit_exact(K, N, group_size):
    from quantlab.formats.layouts import pack_awq
    from quantlab.primitives import dequantize, quantize_rtn

    seed = _seed()
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    qw = quantize_rtn(w, 4, group_size, False)
    p = {k: v.to(DEVICE) for k, v in pack_awq("w", qw).items()}
    out = _poisoned((K, N), torch.float16)
    _triton().dequant_awq(p["qweight"], p["qzeros"], p["scales"], group_size, out=out)
    expected = ref.dequant_awq(p["qweight"], p["qzeros"], p["scales"], group_size)
    assert torch.equal(out, expected), f"seed {seed}"
    assert torch.equal(expected.cpu(), dequantize(qw).T.half())  # the reference is primitives'


@needs_triton
@pytest.mark.parametrize("M", [1, 4, 16, 33])
# bfloat16 on a GPU only: Triton's interpreter reads bfloat16 operands wrongly (no numpy bfloat16)
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.float32] + [torch.bfloat16] * (DEVICE != "cpu")
)
@pytest.mark.parametrize("split_k", [None, 1, 3])
@pytest.mark.parametrize("act_order,group_size", [(False, 64), (False, 128), (True, 64)])
@pytest.mark.parametrize("gemv", [False, True])
def test_triton_fused_matmul_matches_dequant_then_matmul(
    M, dtype, split_k, act_order, group_size, gemv
):
    """Tolerance: the same operands accumulated in fp32 in another order, then rounded once to
    ``dtype``: 2 units in the last place of fp16; in fp32, the classical bound on two summation
    orders of a K-term dot product, ``2 K u sum|x_k w_k|`` (u = 2^-24) per output."""
    seed = _seed()
    K, N = 352, 80  # not a multiple of the K tile (masked tail) nor of the group (partial group)
    args = _packed_gptq(seed, K, N, 4, group_size, act_order)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    out = _poisoned((M, N), dtype) if split_k == 1 else None
    y = _triton().matmul_gptq(x, *args, 4, split_k=split_k, out=out, config={"gemv": gemv})
    # the same operands (W rounded to x's dtype), accumulated in fp32
    W = ref.dequant_gptq(*args, 4, dtype).float()
    expected = x.float() @ W
    assert not torch.isnan(y).any(), f"seed {seed}"
    if dtype == torch.float32:
        bound = 2 * K * 2.0**-24 * (x.float().abs() @ W.abs())
        excess = ((y - expected).abs() - bound).max().item()
        assert excess <= 0, f"seed {seed}: error exceeds the summation-order bound by {excess}"
        return
    err = ((y.float() - expected).abs() / expected.abs().clamp_min(1.0)).max().item()
    ulp = 2.0**-10 if dtype == torch.float16 else 2.0**-7  # bfloat16
    assert err <= 2 * ulp, f"seed {seed}: relative error {err}"


def _gguf_blocks(gguf_type: str, seed: int) -> torch.Tensor:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    if gguf_type == "Q4_K":  # gguf cannot make k-quants: random bytes with valid fp16 d / dmin
        n = 9
        blocks = rng.integers(0, 256, size=(n, 144), dtype=np.uint8)
        halves = rng.uniform(1e-3, 0.1, 2 * n).astype(np.float16)
        blocks[:, 0:4] = halves.view(np.uint8).reshape(n, 4)
        return torch.from_numpy(blocks.reshape(-1))
    w = rng.standard_normal((24, 64)).astype(np.float32)
    raw = quantize(w, GGMLQuantizationType[gguf_type])
    return torch.from_numpy(raw.reshape(-1).view(np.uint8).copy())


@pytest.mark.parametrize("gguf_type", ["Q8_0", "Q4_0", "Q4_K"])
def test_gguf_reference_equals_the_gguf_package(gguf_type):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    seed = _seed()
    raw = _gguf_blocks(gguf_type, seed)
    size = ref.GGUF_BLOCKS[gguf_type][1]
    theirs = dequantize(raw.numpy().reshape(-1, size), GGMLQuantizationType[gguf_type])
    ours = ref.dequant_gguf(raw, gguf_type, torch.float32)
    assert np.array_equal(ours.numpy(), theirs.reshape(-1).astype(np.float32)), f"seed {seed}"


@needs_triton
@pytest.mark.parametrize("gguf_type", ["Q8_0", "Q4_0", "Q4_K"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_gguf_dequant_is_bit_exact(gguf_type, dtype):
    seed = _seed()
    raw = _gguf_blocks(gguf_type, seed).to(DEVICE)
    values, size = ref.GGUF_BLOCKS[gguf_type]
    out = _poisoned((raw.numel() // size * values,), dtype)
    _triton().dequant_gguf(raw, gguf_type, dtype, out=out)
    _assert_same(out, ref.dequant_gguf(raw, gguf_type, dtype), seed)


# -- the ops: declared once, traceable ------------------------------------------------------------


def test_ops_pass_torch_library_checks_and_trace_under_torch_compile():
    from quantlab.kernels import ops

    args = _packed_gptq(_seed(), 128, 64, 4, 32, False)
    torch.library.opcheck(ops.dequant_gptq, (*args, 4, torch.float16, "torch"))
    x = torch.randn(3, 128, device=DEVICE)
    torch.library.opcheck(ops.matmul_gptq, (x, *args, 4, "torch"))
    raw = _gguf_blocks("Q4_0", 0)
    torch.library.opcheck(ops.dequant_gguf, (raw, "Q4_0", torch.float16, "torch"))

    def f(x):
        return ops.gptq_linear(x, *args, 4, backend="torch") * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), f(x))


@needs_triton
def test_natural_groups_are_recognised_once_per_tensor():
    tk = _triton()
    natural = torch.arange(352, dtype=torch.int32) // 64  # partial last group
    assert tk.natural_group(natural) == 64
    assert tk._NATURAL[id(natural)][2] == 64  # remembered for this tensor
    with torch.inference_mode():  # no version counter: not cached, still right
        inference = torch.arange(128, dtype=torch.int32) // 32
    assert tk.natural_group(inference) == 32 and id(inference) not in tk._NATURAL
    assert tk.natural_group(torch.zeros(96, dtype=torch.int32)) == 96  # one group
    shuffled = natural[torch.randperm(352, generator=torch.Generator().manual_seed(0))]
    assert tk.natural_group(shuffled) == 0  # act-order: per-element groups
    natural[:64] = 1  # changed in place: recomputed, not taken from the cache
    assert tk.natural_group(natural) == 0
    assert tk._group(torch.arange(256) // 32, 64) == 0  # a 64-row tile spans two groups
    key = id(natural)
    del natural
    assert key not in tk._NATURAL  # forgotten with the tensor


# -- a whole model through the kernels ------------------------------------------------------------


def _checkpoint(tiny_models, tmp_path, name, fmt, bits, group_size):
    from quantlab.formats import write_artifact
    from quantlab.methods.rtn import RTNConfig
    from quantlab.methods.runner import quantize_model
    from quantlab.models import load_model, resolve_model

    source = resolve_model(str(tiny_models[name]))
    model = load_model(source)
    cfg = RTNConfig(bits, group_size, False)
    result = quantize_model(model, source.folder.arch, "rtn", cfg, None, progress=False)
    return write_artifact(fmt, tmp_path / "ckpt", source, result=result, model=model)


@needs_triton
@pytest.mark.parametrize(
    "name,fmt,bits,group_size,layout",
    [
        ("tiny-llama", "gptq_v2", 4, 32, "gptq"),
        ("tiny-qwen2", "gptq_v2", 8, 64, "gptq"),  # q/k/v biases
        ("tiny-mistral", "awq", 4, 64, "awq"),
    ],
)
def test_a_loaded_checkpoint_gives_identical_logits_through_triton(
    tiny_models, tmp_path, name, fmt, bits, group_size, layout
):
    from quantlab.formats.loader import load
    from quantlab.qlinear import use_kernels

    out = _checkpoint(tiny_models, tmp_path, name, fmt, bits, group_size)
    ids = torch.randint(0, 250, (2, 20), generator=torch.Generator().manual_seed(_seed()))
    ids = ids.to(DEVICE)
    reference, _ = load(out)
    with torch.no_grad():
        expected = reference.to(DEVICE)(ids).logits
    model, _ = load(out)
    assert use_kernels(model, backend="triton", layout=layout, fused=False) > 0
    model.to(DEVICE)  # packed on the CPU, then moved; the fused model below is packed on DEVICE
    with torch.no_grad():
        logits = model(ids).logits
    if DEVICE == "cpu":
        assert torch.equal(logits, expected)  # dequantization is bit-exact, the matmul the same
    else:  # cuBLAS runs x @ W with other kernels than F.linear(x, W^T): another summation order
        assert (logits - expected).abs().max() <= 1e-4 * expected.abs().max()
    if layout == "gptq":  # the fused matmul: a different summation order, same function
        fused, _ = load(out)
        fused.to(DEVICE)
        use_kernels(fused, backend="triton", layout=layout, fused=True)
        with torch.no_grad():
            logits = fused(ids).logits
        assert (logits - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_a_layer_switched_to_kernels_keeps_its_weight(tiny_models, tmp_path):
    from quantlab.formats.loader import load
    from quantlab.qlinear import QuantLinear

    out = _checkpoint(tiny_models, tmp_path, "tiny-llama", "gptq_v2", 4, 32)
    model, _ = load(out)
    layer = next(m for m in model.modules() if isinstance(m, QuantLinear))
    before = layer.quantized_weight().dequantize()
    layer.use_kernel("torch")
    assert not hasattr(layer, "zeros") and layer.qweight.dtype == torch.int32  # packed, 0.5 B/code
    assert torch.equal(layer.quantized_weight().dequantize(), before)
    with pytest.raises(ConfigError, match="already runs through a kernel"):
        layer.use_kernel("torch")


# -- CUDA: compiled here, run on a GPU ------------------------------------------------------------


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.slow  # a compiler run, not a unit test
@pytest.mark.parametrize("arch", ["80", "90"])
def test_the_cuda_kernel_compiles_with_nvcc(arch, tmp_path):
    from quantlab.kernels.cuda_ext import nvcc_command

    obj = tmp_path / f"gemv_sm{arch}.o"
    done = subprocess.run(nvcc_command(arch, obj), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert obj.stat().st_size > 0


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.slow  # a compiler run, not a unit test
def test_the_cuda_binding_compiles_against_this_torch(tmp_path):
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    from quantlab.kernels.cuda_ext import SOURCES

    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=quantlab_cuda"]
    cmd += [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]]
    done = subprocess.run([*cmd, str(SOURCES[0])], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("act_order", [False, True])
def test_cuda_gemv_matches_the_reference(act_order):
    from quantlab.kernels.cuda_ext import matmul_gptq

    seed = _seed()
    K, N = 4096, 1024
    args = _packed_gptq(seed, K, N, 4, 128, act_order)
    x = torch.randn(1, K, device="cuda", dtype=torch.float16)
    y = matmul_gptq(x, *args, 4)
    expected = ref.matmul_gptq(x.float(), *args, 4)
    err = ((y.float() - expected).abs() / expected.abs().clamp_min(1.0)).max().item()
    assert err <= 2 * 2.0**-10, f"seed {seed}: relative error {err}"
