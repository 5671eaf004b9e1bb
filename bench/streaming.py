"""Peak memory of streaming vs in-memory quantization, over model sizes (issue #11).

Writes synthetic Llama models (random fp16 weights, one shard per block) of several depths and
widths, quantizes each with ``quantlab quantize --streaming`` and without, each in its own
process, and prints model size, peak RSS (the child's VmHWM) and wall time side by side.
Streaming's peak should follow the block size, not the model size; the in-memory path holds the
whole model in float32.

    python bench/streaming.py                          # GPTQ 4-bit g128, default sizes
    python bench/streaming.py --method rtn --sizes 1024x8,1024x64 --work /tmp/qlbench
    python bench/streaming.py --data-limit 1.1e9        # also run both under an RLIMIT_DATA cap
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quantlab.models.synthetic import synthetic_bytes, write_synthetic_model

SIZES = "1024x8,1024x16,1024x32,1024x64,2048x12"


def shape_of(spec: str) -> dict:
    hidden, layers = (int(x) for x in spec.split("x"))
    return {
        "hidden": hidden,
        "intermediate": hidden * 11 // 4 // 64 * 64,  # Llama-like 2.75x, a multiple of 64
        "layers": layers,
        "heads": hidden // 128,
        "kv_heads": max(1, hidden // 512),
    }


_CHILD = (
    "import resource, sys\n"
    "limit = int(sys.argv[1])\n"
    "if limit:\n"
    "    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))\n"
    "from quantlab.cli import main\n"
    "rc = main(sys.argv[2:])\n"
    "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]\n"
    "print(f'VmHWM {hwm}', file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def run(args: list[str], data_limit: int | None) -> tuple[int, float, float]:
    """(exit code, peak RSS GB, seconds) of ``quantlab ARGS`` in a fresh process. The child
    reports its own VmHWM (``ru_maxrss`` of a forked child also counts its parent's pages)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(data_limit or 0), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "TQDM_DISABLE": "1"},
        text=True,
        errors="replace",
    )
    seconds = time.perf_counter() - start
    peak = [int(x.split()[1]) for x in proc.stderr.splitlines() if x.startswith("VmHWM ")]
    return proc.returncode, (peak[0] / 1024**2 if peak else float("nan")), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=SIZES, help="HIDDENxLAYERS,... (default: %(default)s)")
    parser.add_argument("--method", default="gptq", choices=["rtn", "gptq", "awq"])
    parser.add_argument("--n-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--data-limit", type=float, help="RLIMIT_DATA bytes for every run")
    parser.add_argument("--work", help="folder for models and outputs (default: a temp folder)")
    parser.add_argument("--skip-in-memory", action="store_true")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="qlbench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "calib.txt"
    from pydoc_data.topics import topics  # any English text: the weights are random

    corpus.write_text("\n\n".join(topics.values())[:400_000])
    limit = int(args.data_limit) if args.data_limit else None
    rows = []
    for spec in args.sizes.split(","):
        shape = shape_of(spec)
        model = work / f"synth-{spec}"
        if not model.exists():
            write_synthetic_model(model, **shape)
        block_mb = (synthetic_bytes(**shape) - synthetic_bytes(**{**shape, "layers": 0})) / (
            shape["layers"] * 1e6
        )
        row = [spec, synthetic_bytes(**shape) / 1e9, block_mb]
        for mode in (["--streaming"], []):
            if not mode and args.skip_in_memory:
                row += [None, None, None]
                continue
            out = work / f"out-{spec}-{'s' if mode else 'm'}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = ["quantize", str(model), "--method", args.method, "--bits", "4"]
            cmd += ["--group-size", "128", "--format", "gptq", "--calib", str(corpus)]
            cmd += ["--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len)]
            if args.method == "rtn":
                cmd.append("--imatrix")
            rc, peak, secs = run([*cmd, *mode, "--out", str(out)], limit)
            row += [rc, peak, secs]
            shutil.rmtree(out, ignore_errors=True)
        rows.append(row)
        print(f"done {spec}: {row}", file=sys.stderr, flush=True)
    cap = f", RLIMIT_DATA {limit / 1e9:.2f} GB" if limit else ""
    print(
        f"\n{args.method} 4-bit g128 -> GPTQ checkpoint, calibration {args.n_samples} x "
        f"{args.seq_len} tokens{cap}; peak RSS = the process's VmHWM\n"
    )
    print(
        "| model (hidden x blocks) | fp16 GB | block MB | streaming peak RSS GB | streaming s "
        "| in-memory peak RSS GB | in-memory s | in-memory / streaming RSS |"
    )
    print("|---|---|---|---|---|---|---|---|")

    def cell(rc, value, fmt):
        if rc is None:
            return "-"
        return fmt.format(value) if rc == 0 else f"failed (exit {rc})"

    for spec, gb, block_mb, src, speak, ssec, mrc, mpeak, msec in rows:
        ratio = f"{mpeak / speak:.1f}x" if src == 0 and mrc == 0 else "-"
        print(
            f"| {spec} | {gb:.2f} | {block_mb:.0f} | {cell(src, speak, '{:.2f}')} | "
            f"{cell(src, ssec, '{:.0f}')} | {cell(mrc, mpeak, '{:.2f}')} | "
            f"{cell(mrc, msec, '{:.0f}')} | {ratio} |"
        )


if __name__ == "__main__":
    main()
