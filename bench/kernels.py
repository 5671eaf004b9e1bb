"""Kernel benchmark on a CUDA GPU: time, bytes moved, fraction of the measured copy bandwidth, and
speedup over fp16 ``torch.matmul``, in one table.

Measured in the same run: the device's copy bandwidth (``dst.copy_(src)`` of 1 GiB, read + write)
and its fp16 matmul rate (8192^3). Every kernel is first checked against the torch reference on
the benchmark's own inputs; then timed with CUDA events after warm-up (median of ``--iters``).

Shapes ``K x N`` (Llama-3 8B): 4096x4096, 4096x14336, 14336x4096; int4, group size 128.
- dequantization (GPTQ and AWQ layouts -> fp16; GGUF Q8_0 / Q4_0 / Q4_K blocks -> fp16): bytes =
  packed weight + scales + zeros + fp16 output; target >= 85 % of the copy bandwidth;
- fused W4A16 matmul (Triton; CUDA GEMV at batch 1) at batches 1, 4, 16, 64: bytes = packed weight
  + scales + zeros + activations + output; speedup over ``x @ W`` with ``W`` in fp16; targets
  >= 3.5x at batch 1 and >= 2.5x at batch 16 on 4096x14336.

    python bench/kernels.py [--iters 100] [--json results/bench-kernels.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))
BATCHES = (1, 4, 16, 64)
GROUP = 128


def timed(fn, iters: int, warmup: int = 10) -> float:
    """Median seconds of ``fn()`` over ``iters`` runs, CUDA events, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def packed_gptq(K: int, N: int, gen: torch.Generator):
    qweight = torch.randint(-(2**31), 2**31 - 1, (K // 8, N), dtype=torch.int32, generator=gen)
    qzeros = torch.randint(
        -(2**31), 2**31 - 1, (K // GROUP, N // 8), dtype=torch.int32, generator=gen
    )
    scales = (torch.rand(K // GROUP, N, generator=gen) * 0.01 + 1e-3).half()
    g_idx = torch.arange(K, dtype=torch.int32) // GROUP
    return [t.cuda() for t in (qweight, qzeros, scales, g_idx)]


def gguf_raw(gguf_type: str, n_values: int, gen: torch.Generator) -> torch.Tensor:
    from quantlab.kernels.reference import GGUF_BLOCKS

    values, size = GGUF_BLOCKS[gguf_type]
    raw = torch.randint(0, 256, (n_values // values, size), dtype=torch.uint8, generator=gen)
    d = (torch.rand(raw.shape[0], 2, generator=gen) * 0.01 + 1e-3).half()  # d (and dmin)
    raw[:, : 2 * d.shape[1]] = d.view(torch.uint8)
    return raw.reshape(-1).cuda()


def device_limits() -> tuple[float, float]:
    """Measured copy bandwidth (bytes/s, read + write of 1 GiB) and fp16 matmul TFLOP/s."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_bw = 2 * src.numel() / timed(lambda: dst.copy_(src), 20)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    return copy_bw, 2 * 8192**3 / timed(lambda: a @ a, 20) / 1e12


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--json", default=str(ROOT / "results" / "bench-kernels.json"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2

    from quantlab.kernels import reference as ref
    from quantlab.kernels import triton_kernels as tk

    cuda_gemv = None
    try:
        from quantlab.kernels import cuda_ext

        cuda_ext.extension()
        cuda_gemv = cuda_ext.matmul_gptq
    except Exception as exc:  # no compiler / ninja on this machine: report and go on
        print(f"CUDA extension not built: {exc}", file=sys.stderr)

    device = torch.cuda.get_device_name()
    copy_bw, tflops = device_limits()
    print(f"{device}: copy {copy_bw / 1e9:.0f} GB/s, fp16 matmul {tflops:.0f} TFLOP/s", flush=True)

    gen = torch.Generator().manual_seed(0)
    rows = []

    def add(kernel, shape, batch, seconds, nbytes, flops, base=None, ok=True):
        rows.append(
            dict(
                kernel=kernel,
                shape=shape,
                batch=batch,
                us=seconds * 1e6,
                gbs=nbytes / seconds / 1e9,
                frac=nbytes / seconds / copy_bw,
                tflops=flops / seconds / 1e12 if flops else None,
                speedup=base / seconds if base else None,
                ok=ok,
            )
        )

    for K, N in SHAPES:
        shape = f"{K}x{N}"
        qw, qz, sc, gi = packed_gptq(K, N, gen)
        packed = qw.numel() * 4 + qz.numel() * 4 + sc.numel() * 2
        out_bytes = K * N * 2
        want = ref.dequant_gptq(qw, qz, sc, gi, 4)
        ok = torch.equal(tk.dequant_gptq(qw, qz, sc, gi, 4), want)
        s = timed(lambda: tk.dequant_gptq(qw, qz, sc, gi, 4), args.iters)  # noqa: B023
        add(
            "triton dequant gptq int4", shape, "-", s, packed + out_bytes + gi.numel() * 4, 0, ok=ok
        )
        ok = torch.equal(
            tk.dequant_awq(qw.view(K, N // 8), qz, sc, GROUP),
            ref.dequant_awq(qw.view(K, N // 8), qz, sc, GROUP),
        )
        s = timed(lambda: tk.dequant_awq(qw.view(K, N // 8), qz, sc, GROUP), args.iters)  # noqa: B023
        add("triton dequant awq int4", shape, "-", s, packed + out_bytes, 0, ok=ok)
        for gtype in ("Q8_0", "Q4_0", "Q4_K"):
            raw = gguf_raw(gtype, K * N, gen)
            ok = torch.equal(tk.dequant_gguf(raw, gtype), ref.dequant_gguf(raw, gtype))
            s = timed(lambda: tk.dequant_gguf(raw, gtype), args.iters)  # noqa: B023
            add(f"triton dequant gguf {gtype}", shape, "-", s, raw.numel() + out_bytes, 0, ok=ok)
        w16 = want
        for batch in BATCHES:
            x = torch.randn(batch, K, device="cuda", dtype=torch.float16)
            base = timed(lambda: x @ w16, args.iters)  # noqa: B023
            io = batch * (K + N) * 2
            add(
                "torch.matmul fp16 (baseline)",
                shape,
                batch,
                base,
                out_bytes + io,
                2 * batch * K * N,
                base,
            )
            expected = x.float() @ w16.float()
            y = tk.matmul_gptq(x, qw, qz, sc, gi, 4)
            ok = bool(((y.float() - expected).abs() <= 2e-3 * expected.abs().clamp_min(1)).all())
            s = timed(lambda: tk.matmul_gptq(x, qw, qz, sc, gi, 4), args.iters)  # noqa: B023
            add("triton fused w4a16", shape, batch, s, packed + io, 2 * batch * K * N, base, ok)
            if cuda_gemv is not None and batch == 1:
                y = cuda_gemv(x, qw, qz, sc, gi, 4)
                ok = bool(
                    ((y.float() - expected).abs() <= 2e-3 * expected.abs().clamp_min(1)).all()
                )
                s = timed(lambda: cuda_gemv(x, qw, qz, sc, gi, 4), args.iters)  # noqa: B023
                add("cuda gemv w4a16", shape, batch, s, packed + io, 2 * batch * K * N, base, ok)

    header = (
        f"{'kernel':<30} {'shape':>11} {'batch':>5} {'us':>9} {'GB/s':>7} {'of copy':>7} "
        f"{'TFLOP/s':>7} {'vs fp16':>7} {'ok':>3}"
    )
    print(f"\n{device}: copy bandwidth {copy_bw / 1e9:.0f} GB/s, fp16 matmul {tflops:.0f} TFLOP/s")
    print(header)
    print("-" * len(header))
    for r in rows:
        tf = f"{r['tflops']:.1f}" if r["tflops"] else "-"
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        print(
            f"{r['kernel']:<30} {r['shape']:>11} {r['batch']!s:>5} {r['us']:>9.1f} "
            f"{r['gbs']:>7.0f} {r['frac']:>7.0%} {tf:>7} {sp:>7} {'yes' if r['ok'] else 'NO':>3}"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    record = {"device": device, "copy_GBs": copy_bw / 1e9, "fp16_TFLOPs": tflops, "rows": rows}
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
