"""Time and memory from 135M to 8B: quantize (streaming) and evaluate a ladder of model sizes.

The 135M rung is the embedded default model (real weights); the others are synthetic models with
real architectures' shapes (`quantlab.models.synthetic.SHAPES`: random bf16 weights, exact
tensor shapes and vocabularies), written once into ``--work``. Each (size, method) runs
``quantlab quantize --streaming`` in a fresh process, then ``quantlab eval`` of the artifact on a
few perplexity windows in another; each process reports its own peak RSS (VmHWM). Prints one
table per size and method with the time of each stage of the block walk (capture, read, copy,
forward, hessians, solve, search, write), and the growth exponent ``b`` of time ~ params^b fitted
over the sizes.

    python bench/scale.py                                   # the default ladder, rtn + gptq
    python bench/scale.py --sizes llama-3-8b --methods gptq --n-samples 4 --seq-len 256
    python bench/scale.py --device cuda --n-samples 128 --seq-len 2048 --calib-dtype bfloat16

Quality numbers of synthetic models mean nothing (random weights); the time and memory are real.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LADDER = "smollm2-135m,qwen2.5-0.5b,qwen2.5-1.5b,qwen2.5-3b,llama-3-8b"
STAGES = ("capture", "read", "copy", "forward", "hessians", "solve", "search", "write")
FORMAT_OF = {"rtn": "gptq", "gptq": "gptq", "awq": "awq"}

_CHILD = (
    "import sys\n"
    "from quantlab.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]\n"
    "print(f'VmHWM {hwm}', file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def quantlab(args: list[str], log: Path) -> tuple[int, float, float, str]:
    """(exit code, peak RSS GB, seconds, stdout) of ``quantlab ARGS`` in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *args],
        capture_output=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
        text=True,
        errors="replace",
    )
    seconds = time.perf_counter() - start
    with log.open("a") as fh:
        fh.write(f"$ quantlab {' '.join(args)}\n{proc.stdout}\n{proc.stderr}\n")
    peak = [int(x.split()[1]) for x in proc.stderr.splitlines() if x.startswith("VmHWM ")]
    return proc.returncode, (peak[0] / 1024**2 if peak else float("nan")), seconds, proc.stdout


def model_folder(name: str, work: Path) -> tuple[str, float]:
    """The model to quantize (spec or folder) and its parameter count."""
    from quantlab.models.synthetic import SHAPES, write_shape

    if name not in SHAPES:  # an embedded or local model: count its parameters from the headers
        from quantlab.models import resolve_model

        ref = resolve_model(name)
        return str(ref.path), float(sum(t.numel for t in ref.folder.tensors))
    folder = work / f"synth-{name}"
    if not folder.exists():
        print(f"writing the {name} shape to {folder} ...", file=sys.stderr, flush=True)
        write_shape(name, folder, progress=True)
    return str(folder), float(SHAPES[name].parameters())


def stages_of(stdout: str) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds and (GPU) peak GiB per stage from the ``stages on DEVICE: name S s (P GiB), ...``
    line `quantlab quantize` prints."""
    seconds, peaks = {}, {}
    for line in stdout.splitlines():
        if line.startswith("stages on "):
            for part in line.split(": ", 1)[1].split(", "):
                words = part.split()
                seconds[words[0]] = float(words[1])
                if len(words) >= 5 and words[4].startswith("GiB"):
                    peaks[words[0]] = float(words[3].lstrip("("))
    return seconds, peaks


def growth(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y on log x (y ~ x^b)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    var = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / var if var else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=LADDER, help="models or shapes (default: %(default)s)")
    parser.add_argument("--methods", default="rtn,gptq", help="rtn, gptq, awq (comma-separated)")
    parser.add_argument("--n-samples", type=int, default=4, help="calibration samples (4)")
    parser.add_argument("--seq-len", type=int, default=256, help="calibration length (256)")
    parser.add_argument("--calib-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--eval-tokens", type=int, default=512, help="perplexity tokens (512)")
    parser.add_argument("--eval-context", type=int, default=256, help="window length (256)")
    parser.add_argument("--eval-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--speed", action="store_true", help="also decode/prefill tokens/s")
    parser.add_argument("--no-eval", action="store_true", help="quantize only")
    parser.add_argument("--work", help="models and outputs (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the quantized artifacts")
    parser.add_argument("--json", help="also write the rows as JSON")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="qlscale-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "scale.log"
    corpus = work / "text.txt"
    if not corpus.exists():
        from pydoc_data.topics import topics  # any English text

        corpus.write_text("\n\n".join(topics.values())[:400_000])
    rows = []
    for size in args.sizes.split(","):
        model, params = model_folder(size, work)
        for method in args.methods.split(","):
            fmt = FORMAT_OF[method]
            out = work / f"out-{size}-{method}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = ["quantize", model, "--method", method, "--bits", "4", "--group-size", "128"]
            cmd += ["--format", fmt, "--streaming", "--out", str(out), "--device", args.device]
            if method != "rtn":
                cmd += ["--calib", str(corpus), "--n-samples", str(args.n_samples)]
                cmd += ["--seq-len", str(args.seq_len), "--calib-dtype", args.calib_dtype]
            rc, peak, seconds, stdout = quantlab(cmd, log)
            stage_seconds, stage_peaks = stages_of(stdout)
            row = {
                "size": size,
                "params": params,
                "method": method,
                "quantize_rc": rc,
                "quantize_s": seconds,
                "quantize_rss_gb": peak,
                "stages": stage_seconds,
                "quantize_vram_gb": max(stage_peaks.values(), default=None),
            }
            if rc == 0 and not args.no_eval:
                metrics = work / f"eval-{size}-{method}.json"
                cmd = ["eval", str(out), "--ppl", str(corpus), "--max-tokens"]
                cmd += [str(args.eval_tokens), "--context", str(args.eval_context)]
                cmd += ["--json", str(metrics), "--device", args.device]
                cmd += ["--dtype", args.eval_dtype] + (["--speed"] if args.speed else [])
                rc2, peak2, seconds2, _ = quantlab(cmd, log)
                row.update(eval_rc=rc2, eval_s=seconds2, eval_rss_gb=peak2)
                if rc2 == 0:
                    m = json.loads(metrics.read_text())
                    row["ppl_s"] = sum(
                        v for k, v in m["stage_seconds"].items() if k.startswith("perplexity")
                    )
                    row["load_s"] = m["stage_seconds"].get("load")
                    row["eval_windows"] = m["perplexity"][0]["windows"]
                    memory = m["memory"]
                    vram = max(memory.get("cuda_reserved_bytes") or 0,
                               memory.get("process_device_bytes") or 0)  # fmt: skip
                    row["eval_vram_gb"] = vram / 2**30 or None
                    if m.get("speed"):
                        row["decode_tok_s"] = m["speed"]["decode_tokens_per_s"]
                        row["prefill_tok_s"] = m["speed"]["prefill_tokens_per_s"]
                        row["speed_runtime"] = m["speed"]["runtime"]
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
            rows.append(row)
            print(f"done {size} {method}: {json.dumps(row)}", file=sys.stderr, flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    print_table(rows, args)


def print_table(rows: list[dict], args) -> None:
    calib = f"{args.n_samples} x {args.seq_len} calibration tokens ({args.calib_dtype})"
    print(
        f"\n4-bit g128, streamed from the shards, on {args.device}; {calib}; evaluation: "
        f"{args.eval_tokens} tokens in {args.eval_context}-token windows. RSS = each process's "
        "peak (VmHWM). Stage seconds are exclusive (a stage nested in another is not counted "
        "twice).\n"
    )
    head = ["size", "params (B)", "method", "quantize s", "quantize peak RSS GB"]
    gpu = any(r.get("quantize_vram_gb") or r.get("eval_vram_gb") for r in rows)
    head += [f"{s} s" for s in STAGES] + ["eval s (ppl s)", "eval peak RSS GB"]
    if gpu:
        head += ["quantize peak VRAM GiB", "eval peak VRAM GiB"]
    if any("decode_tok_s" in r for r in rows):
        head += ["decode tok/s", "prefill tok/s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        ok = r["quantize_rc"] == 0
        cells = [r["size"], f"{r['params'] / 1e9:.2f}", r["method"]]
        cells.append(f"{r['quantize_s']:.0f}" if ok else f"failed ({r['quantize_rc']})")
        cells.append(f"{r['quantize_rss_gb']:.2f}")
        cells += [f"{r['stages'][s]:.1f}" if s in r["stages"] else "-" for s in STAGES]
        if r.get("eval_rc") == 0:
            cells += [f"{r['eval_s']:.0f} ({r['ppl_s']:.0f})", f"{r['eval_rss_gb']:.2f}"]
        else:
            cells += ["-" if "eval_rc" not in r else f"failed ({r['eval_rc']})", "-"]
        if gpu:
            cells += [f"{r[k]:.1f}" if r.get(k) else "-" for k in ("quantize_vram_gb",
                                                                  "eval_vram_gb")]  # fmt: skip
        if any("decode_tok_s" in x for x in rows):
            cells += [f"{r[k]:.1f}" if r.get(k) else "-" for k in ("decode_tok_s",
                                                                  "prefill_tok_s")]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    print()
    for method in sorted({r["method"] for r in rows}):
        ok = [r for r in rows if r["method"] == method and r["quantize_rc"] == 0]
        params = [r["params"] for r in ok]
        b_time = growth(params, [r["quantize_s"] for r in ok])
        b_rss = growth(params, [r["quantize_rss_gb"] for r in ok])
        if b_time is not None:
            print(
                f"{method}: quantize time ~ params^{b_time:.2f}, peak RSS ~ params^{b_rss:.2f} "
                f"(least squares over {len(ok)} sizes)"
            )


if __name__ == "__main__":
    main()
