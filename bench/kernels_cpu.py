"""The CPU runtime of quantized checkpoints, side by side in one run (`bench/kernels.py --cpu`).

Writes 4-bit checkpoints of the default model (GPTQ v2 at group sizes 32, 64 and 128 and an
AWQ GEMM checkpoint at 64, all with zero points; RTN codes - the speed does not depend on how
the codes were chosen) and llama.cpp's Q4_0 of the same model, then measures each through
transformers twice - the torch reference path (every weight dequantized at every forward) and
PyTorch's int4 CPU kernels (`quantlab.qlinear.use_fast_kernels`) - beside the fp32 model and
llama.cpp, with the same threads, prompt and decode length as the evaluation harness. Checks
first that the kernels' logits match the reference's on the same tokens.

    python bench/kernels.py --cpu [--runs 3] [--threads N] [--json results/bench-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
CHECKPOINTS = (  # (name, quantize flags)
    ("gptq-w4-g32", ["--format", "gptq", "--group-size", "32"]),
    ("gptq-w4-g64", ["--format", "gptq", "--group-size", "64"]),
    ("gptq-w4-g128", ["--format", "gptq", "--group-size", "128"]),
    ("awq-w4-g64", ["--format", "awq", "--group-size", "64"]),
)


def quantize(out: Path, flags: list[str]) -> Path:
    cmd = [sys.executable, "-m", "quantlab.cli", "quantize", MODEL, "--out", str(out), *flags]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"quantize failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return out


def speed(runner, prompt: np.ndarray, decode: int, runs: int) -> tuple[float, float]:
    from quantlab.eval.measure import measure_speed

    s = measure_speed(runner, prompt, decode, runs)
    return s.prefill_tokens_per_s, s.decode_tokens_per_s


def logits_gap(reference, kernels, ids: np.ndarray) -> float:
    """Largest |difference| of the two runners' logits, relative to the largest |logit|."""
    a, b = reference.logits(ids), kernels.logits(ids)
    return float(np.abs(a - b).max() / np.abs(a).max())


def main(argv: list[str] | None = None) -> int:
    from quantlab.eval.harness import open_runner

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="timed runs (median) after a warm-up")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill)")
    p.add_argument("--decode", type=int, default=32, help="decoded tokens")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", default=str(ROOT / "results" / "bench-cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 20000, args.prompt)
    check_ids = rng.integers(100, 20000, 256)
    rows: list[dict] = []

    def add(name, runtime, runner, base=None, gap=None):
        prefill, decode = speed(runner, prompt, args.decode, args.runs)
        row = {"artifact": name, "runtime": runtime, "prefill": prefill, "decode": decode}
        if base:
            row["decode_x"], row["prefill_x"] = decode / base["decode"], prefill / base["prefill"]
        row["logits_gap"] = gap
        rows.append(row)
        print(
            f"{name:14s} {runtime:52s} prefill {prefill:8.1f} tok/s  decode {decode:7.1f} tok/s"
            + (f"  ({row['decode_x']:.2f}x fp32 decode)" if base else ""),
            flush=True,
        )
        return row

    with tempfile.TemporaryDirectory() as tmp:
        fp32, _ = open_runner(MODEL)
        base = add("fp32", fp32.runtime, fp32)
        del fp32
        for name, flags in CHECKPOINTS:
            path = quantize(Path(tmp) / name, ["--method", "rtn", "--bits", "4", *flags])
            reference, _ = open_runner(str(path), kernels=False)
            add(name, reference.runtime, reference, base)
            fast, _ = open_runner(str(path), kernels=True)
            gap = logits_gap(reference, fast, check_ids)
            del reference
            add(name, fast.runtime, fast, base, gap)
            del fast
        gguf = quantize(Path(tmp) / "q4_0.gguf", ["--format", "gguf", "--gguf-type", "Q4_0"])
        llama, _ = open_runner(str(gguf))
        add("gguf-Q4_0", llama.runtime, llama, base)
        llama.close()

    q4_0 = rows[-1]["decode"]
    print()
    print(f"{args.threads} threads, {args.prompt}-token prompt, {args.decode} decoded, median of")
    print(f"{args.runs}; logits gap: max |kernels - reference| / max |reference| on 256 tokens")
    print()
    header = "| artifact | runtime | prefill tok/s | decode tok/s | decode vs fp32 | "
    print(header + "prefill vs fp32 | Q4_0 decode / this | logits gap |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        x = f"{r['decode_x']:.2f}x" if "decode_x" in r else "-"
        px = f"{r['prefill_x']:.2f}x" if "prefill_x" in r else "-"
        gap = f"{r['logits_gap']:.1e}" if r["logits_gap"] is not None else "-"
        print(
            f"| {r['artifact']} | {r['runtime']} | {r['prefill']:.1f} | {r['decode']:.1f} | {x} "
            f"| {px} | {q4_0 / r['decode']:.2f} | {gap} |"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
