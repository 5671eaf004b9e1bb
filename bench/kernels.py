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

Times are GPU times: ``fn`` captured 20 times in a CUDA graph, the replay timed (so Python's
launch overhead, which a graph-captured decode loop does not pay, is not counted); the eager time
(CUDA events around one call, launch overhead included) is printed beside it.

``--sweep`` first times the fused matmul's tile choices (``triton_kernels.matmul_config``'s knobs)
on every shape at batches 1, 4 and 16 and prints the best per shape and batch.

    python bench/kernels.py [--iters 100] [--sweep] [--json results/bench-kernels.json]
    python bench/kernels.py --cpu   # the CPU runtime instead (bench/kernels_cpu.py), no GPU needed
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


REPS = 20  # calls per captured graph


def timed(fn, iters: int, warmup: int = 10) -> float:
    """Median seconds of one ``fn()`` over ``iters`` runs, CUDA events, after ``warmup`` runs
    (eager: the CPU's launch overhead is inside the events when it exceeds the GPU's time)."""
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


def timed_graph(fn, iters: int) -> float:
    """Median seconds of one ``fn()``: ``REPS`` calls captured in a CUDA graph, each replay timed
    with CUDA events (GPU time only), after warm-up calls on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(5, iters // 4)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / REPS)
    del graph
    return statistics.median(times)


def measure(fn, iters: int) -> tuple[float, float]:
    """(graph seconds, eager seconds) of one ``fn()``."""
    eager = timed(fn, iters)
    return timed_graph(fn, iters), eager


def sweep(tk, iters: int) -> list[dict]:
    """The fused matmul's knobs on every shape at batches 1, 4, 16: each config's graph time."""
    gen = torch.Generator().manual_seed(1)
    found = []
    for K, N in SHAPES:
        qw, qz, sc, gi = packed_gptq(K, N, gen)
        for batch in (1, 4, 16, 64):
            x = torch.randn(batch, K, device="cuda", dtype=torch.float16)
            default = tk.matmul_config(batch, N, K, x.device)
            results = []
            if batch == 1:  # (bm, bn, bk, gemv, warps)
                tiles = [(1, n, k, True, w) for n in (64, 128) for k in (128, 256) for w in (4, 8)]
                tiles += [(16, n, 128, False, w) for n in (64, 128, 256) for w in (4, 8)]
            else:
                bm = 16 if batch <= 16 else 64
                tiles = [(bm, n, 128, False, w) for n in (64, 128, 256) for w in (4, 8)]
            for bm, bn, bk, gemv, warps in tiles:
                for split in (1, 2, 4, 8, 16):
                    cfg = dict(bm=bm, bn=bn, bk=bk, gemv=gemv, num_warps=warps)
                    cfg.update(split_k=split, num_stages=3)
                    try:
                        s = timed_graph(
                            lambda: tk.matmul_gptq(x, qw, qz, sc, gi, 4, config=cfg),  # noqa: B023
                            iters,
                        )
                    except Exception as exc:  # noqa: BLE001 - a config that fails to compile
                        print(f"  {cfg}: {type(exc).__name__}: {exc}"[:200])
                        continue
                    results.append((s, cfg))
            s_default = timed_graph(lambda: tk.matmul_gptq(x, qw, qz, sc, gi, 4), iters)  # noqa: B023
            results.sort(key=lambda r: r[0])
            if not results:
                print(f"sweep {K}x{N} batch {batch}: no config ran", flush=True)
                continue
            best_s, best = results[0]
            print(
                f"sweep {K}x{N} batch {batch}: default {s_default * 1e6:.1f} us {default}; "
                f"best {best_s * 1e6:.1f} us {best}; "
                f"next {[round(r[0] * 1e6, 1) for r in results[1:4]]}",
                flush=True,
            )
            found.append(
                dict(shape=f"{K}x{N}", batch=batch, default_us=s_default * 1e6, default=default,
                     best_us=best_s * 1e6, best=best,
                     top=[dict(us=r[0] * 1e6, **r[1]) for r in results[:8]])
            )  # fmt: skip
    return found


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
    if "--cpu" in sys.argv[1:]:  # the CPU runtime of quantized checkpoints: bench/kernels_cpu.py
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from kernels_cpu import main as cpu_main

        return cpu_main([a for a in sys.argv[1:] if a != "--cpu"])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--sweep", action="store_true", help="time the fused matmul's tile choices")
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
    swept = sweep(tk, args.iters) if args.sweep else []

    gen = torch.Generator().manual_seed(0)
    rows = []

    def add(kernel, shape, batch, fn, nbytes, flops, base=None, ok=True):
        try:
            seconds, eager = measure(fn, args.iters)
        except Exception as exc:  # noqa: BLE001 - report the row as failed, go on with the rest
            print(f"{kernel} {shape} batch {batch}: {type(exc).__name__}: {exc}"[:300], flush=True)
            seconds, eager, ok = float("nan"), float("nan"), False
        rows.append(
            dict(
                kernel=kernel,
                shape=shape,
                batch=batch,
                us=seconds * 1e6,
                eager_us=eager * 1e6,
                gbs=nbytes / seconds / 1e9,
                frac=nbytes / seconds / copy_bw,
                tflops=flops / seconds / 1e12 if flops else None,
                speedup=base / seconds if base else None,
                ok=ok,
            )
        )
        return seconds

    for K, N in SHAPES:
        shape = f"{K}x{N}"
        qw, qz, sc, gi = packed_gptq(K, N, gen)
        packed = qw.numel() * 4 + qz.numel() * 4 + sc.numel() * 2
        out_bytes = K * N * 2
        want = ref.dequant_gptq(qw, qz, sc, gi, 4)
        ok = torch.equal(tk.dequant_gptq(qw, qz, sc, gi, 4), want)
        fn = lambda: tk.dequant_gptq(qw, qz, sc, gi, 4)  # noqa: B023, E731
        add("triton dequant gptq int4", shape, "-", fn, packed + out_bytes, 0, ok=ok)
        perm = gi[torch.randperm(K, generator=gen).cuda()].contiguous()  # act-order g_idx
        ok = torch.equal(
            tk.dequant_gptq(qw, qz, sc, perm, 4), ref.dequant_gptq(qw, qz, sc, perm, 4)
        )
        fn = lambda: tk.dequant_gptq(qw, qz, sc, perm, 4)  # noqa: B023, E731
        add("triton dequant gptq act-order", shape, "-", fn, packed + out_bytes + K * 4, 0, ok=ok)
        aw = qw.view(K, N // 8)
        ok = torch.equal(tk.dequant_awq(aw, qz, sc, GROUP), ref.dequant_awq(aw, qz, sc, GROUP))
        fn = lambda: tk.dequant_awq(aw, qz, sc, GROUP)  # noqa: B023, E731
        add("triton dequant awq int4", shape, "-", fn, packed + out_bytes, 0, ok=ok)
        for gtype in ("Q8_0", "Q4_0", "Q4_K"):
            raw = gguf_raw(gtype, K * N, gen)
            ok = torch.equal(tk.dequant_gguf(raw, gtype), ref.dequant_gguf(raw, gtype))
            fn = lambda: tk.dequant_gguf(raw, gtype)  # noqa: B023, E731
            add(f"triton dequant gguf {gtype}", shape, "-", fn, raw.numel() + out_bytes, 0, ok=ok)
        w16 = want
        for batch in BATCHES:
            x = torch.randn(batch, K, device="cuda", dtype=torch.float16)
            io = batch * (K + N) * 2
            flops = 2 * batch * K * N
            fn = lambda: x @ w16  # noqa: B023, E731
            base = add("torch.matmul fp16 (baseline)", shape, batch, fn, out_bytes + io, flops)
            rows[-1]["speedup"] = 1.0
            expected = x.float() @ w16.float()

            def close(y, expected=expected):
                return bool(((y.float() - expected).abs() <= 2e-3 * expected.abs().clamp(1)).all())

            ok = close(tk.matmul_gptq(x, qw, qz, sc, gi, 4))
            expected_perm = x.float() @ ref.dequant_gptq(qw, qz, sc, perm, 4).float()
            # the CUDA GEMV multiplies by the float32 weight (no rounding to x's dtype first)
            expected_fp32 = x.float() @ ref.dequant_gptq(qw, qz, sc, gi, 4, torch.float32)
            fn = lambda: tk.matmul_gptq(x, qw, qz, sc, gi, 4)  # noqa: B023, E731
            add("triton fused w4a16", shape, batch, fn, packed + io, flops, base, ok)
            if batch <= 16:
                ok = close(tk.matmul_gptq(x, qw, qz, sc, perm, 4), expected_perm)
                fn = lambda: tk.matmul_gptq(x, qw, qz, sc, perm, 4)  # noqa: B023, E731
                add(
                    "triton fused act-order", shape, batch, fn, packed + io + K * 4, flops, base, ok
                )
            if cuda_gemv is not None and batch == 1:
                ok = close(cuda_gemv(x, qw, qz, sc, gi, 4), expected_fp32)
                fn = lambda: cuda_gemv(x, qw, qz, sc, gi, 4)  # noqa: B023, E731
                add("cuda gemv w4a16", shape, batch, fn, packed + io, flops, base, ok)

    header = (
        f"{'kernel':<30} {'shape':>11} {'batch':>5} {'us':>8} {'eager us':>8} {'GB/s':>6} "
        f"{'of copy':>7} {'TFLOP/s':>7} {'vs fp16':>7} {'ok':>3}"
    )
    print(f"\n{device}: copy bandwidth {copy_bw / 1e9:.0f} GB/s, fp16 matmul {tflops:.0f} TFLOP/s")
    print(header)
    print("-" * len(header))
    for r in rows:
        tf = f"{r['tflops']:.1f}" if r["tflops"] else "-"
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        print(
            f"{r['kernel']:<30} {r['shape']:>11} {r['batch']!s:>5} {r['us']:>8.1f} "
            f"{r['eager_us']:>8.1f} {r['gbs']:>6.0f} {r['frac']:>7.0%} {tf:>7} {sp:>7} "
            f"{'yes' if r['ok'] else 'NO':>3}"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    record = {
        "device": device,
        "copy_GBs": copy_bw / 1e9,
        "fp16_TFLOPs": tflops,
        "rows": rows,
        "sweep": swept,
    }
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
