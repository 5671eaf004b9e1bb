"""quantlab's GPTQ and AWQ side by side with GPTQModel and llm-compressor, on the same tokens.

Every implementation quantizes the same model with the same calibration windows (quantlab's
calibration set: C4 sample, ``--n-samples`` x ``--seq-len`` tokens, seed 0), each in its own
subprocess (so peak RSS is its own), and writes its checkpoint in its own format (quantlab: GPTQ v1
/ AWQ GEMM; GPTQModel: GPTQ v1 / AWQ GEMM; llm-compressor: compressed-tensors). Every checkpoint
is then read by quantlab's loader and measured by the same harness: WikiText-2 test perplexity
(gptq protocol, the first ``--eval-tokens`` tokens) and KL divergence / top-1 agreement against
the unquantized model on the same windows. Prints one table with each method's ratios against
the best and the fastest reference toolkit, and writes it as JSON.

    python bench/methods.py [--methods gptq,awq] [--impls quantlab,gptqmodel,llmcompressor]
        [--group-size 64] [--n-samples 32] [--seq-len 512] [--eval-tokens 16384]

Seconds are the wall time of the quantization call alone (model loading and saving excluded for
every implementation). The reference toolkits are an optional extra: pip install -e ".[reference]".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _calibration(model: str, n_samples: int, seq_len: int):
    from quantlab.data.calibration import CalibrationConfig, build_calibration
    from quantlab.data.corpora import load_corpus
    from quantlab.models import load_tokenizer, resolve_model

    source = resolve_model(model)
    config = CalibrationConfig(corpus="c4", split="train", n_samples=n_samples, seq_len=seq_len)
    return build_calibration(load_tokenizer(source), load_corpus("c4", "train"), config)


def worker(args) -> int:
    """One implementation x method in this process; writes a JSON line to ``args.result``."""
    ids = np.load(args.ids)
    out = Path(args.out)
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.impl == "quantlab":
        import torch

        from quantlab.formats import write_artifact
        from quantlab.methods import get_method
        from quantlab.methods.runner import quantize_model
        from quantlab.models import load_model, resolve_model

        torch.set_num_threads(args.threads)
        source = resolve_model(args.model)
        calibration = _calibration(args.model, args.n_samples, args.seq_len)
        assert np.array_equal(calibration.input_ids, ids), "calibration tokens differ"
        spec = get_method(args.method)
        # like for like with the toolkits' own defaults: GPTQ without act-order
        fields = {f.name for f in spec.fields()}
        plain = {k: False for k in ("act_order", "static_groups") if k in fields}
        config = spec.config_cls(bits=args.bits, group_size=args.group_size, sym=args.sym, **plain)
        model = load_model(source)
        result = quantize_model(
            model,
            source.folder.arch,
            args.method,
            config,
            calibration,
            calib_dtype=args.calib_dtype,
            progress=False,
        )
        t0 = time.perf_counter()
        fmt = "gptq" if args.method == "gptq" else "awq"  # the toolkits' own format for the method
        write_artifact(fmt, out, source, result=result, model=model)
        record = {"seconds": result.seconds, "save_seconds": time.perf_counter() - t0}
    else:
        from quantlab.models import resolve_model
        from quantlab.reference import run_reference

        run = run_reference(
            args.impl,
            args.method,
            resolve_model(args.model).path,
            ids,
            out,
            bits=args.bits,
            group_size=args.group_size,
            sym=args.sym,
        )
        record = {"seconds": run.seconds, "save_seconds": run.save_seconds, "format": run.format}
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record["start_rss_mb"] = start_rss / 1024
    Path(args.result).write_text(json.dumps(record))
    return 0


def evaluate(target: str, model: str, eval_tokens: int) -> dict:
    from quantlab.eval.harness import EvalConfig, evaluate
    from quantlab.eval.perplexity import PerplexityConfig

    ppl = PerplexityConfig(
        corpus="wikitext2", split="test", protocol="gptq", max_tokens=eval_tokens
    )
    metrics = evaluate(target, EvalConfig(perplexity=(ppl,), kld=True), reference=model)
    return {
        "ppl": metrics.perplexity[0].ppl,
        "scored_tokens": metrics.perplexity[0].scored_tokens,
        "kld": metrics.kld.mean,
        "top1": metrics.kld.top1_agreement,
        "reference_ppl": metrics.kld.reference_ppl,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="gptq,awq")
    p.add_argument("--impls", default="quantlab,gptqmodel,llmcompressor")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--calib-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--work", default=str(ROOT / "out" / "bench-methods"))
    p.add_argument("--json", default=str(ROOT / "results" / "bench-methods.json"))
    p.add_argument(
        "--reuse",
        metavar="JSON",
        help="keep the rows of implementations not run now from an earlier run's JSON (same "
        "settings), e.g. to re-measure quantlab next to toolkit runs that take minutes",
    )
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "METHOD"), help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--sym", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.impl, args.method = args.worker
        args.sym = bool(args.sym)
        return worker(args)

    from quantlab.reference import available

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    calibration = _calibration(args.model, args.n_samples, args.seq_len)
    ids_path = work / "calibration.npy"
    np.save(ids_path, calibration.input_ids)
    print(
        f"calibration: {calibration.provenance()['corpus']}, {args.n_samples} x {args.seq_len} "
        f"tokens, sha256 {calibration.sha256[:16]}",
        file=sys.stderr,
    )
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS=str(args.threads))
    rows = []
    for method in args.methods.split(","):
        sym = method == "gptq"  # GPTQ: symmetric (the toolkits' default); AWQ: zero points
        for impl in args.impls.split(","):
            if impl != "quantlab" and not available(impl):
                print(f"skip {impl}: not installed (pip install -e '.[reference]')")
                continue
            out = work / f"{method}-{impl}"
            result = work / f"{method}-{impl}.json"
            for stale in (out, result):
                if stale.exists():
                    subprocess.run(["rm", "-rf", str(stale)], check=True)
            print(f"[{method} / {impl}] quantizing ...", file=sys.stderr, flush=True)
            cmd = [sys.executable, __file__, "--worker", impl, method, "--ids", str(ids_path)]
            cmd += ["--out", str(out), "--result", str(result), "--sym", str(int(sym))]
            cmd += ["--model", args.model, "--bits", str(args.bits)]
            cmd += ["--group-size", str(args.group_size), "--calib-dtype", args.calib_dtype]
            cmd += ["--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len)]
            cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                print(f"[{method} / {impl}] FAILED: {' | '.join(tail)}")
                rows.append({"method": method, "impl": impl, "error": tail[-1] if tail else "?"})
                continue
            row = {"method": method, "impl": impl, **json.loads(result.read_text())}
            print(f"[{method} / {impl}] {row['seconds']:.1f} s; evaluating ...", file=sys.stderr)
            row.update(evaluate(str(out), args.model, args.eval_tokens))
            rows.append(row)
    if args.reuse:
        earlier = json.loads(Path(args.reuse).read_text())
        same = ("model", "bits", "group_size", "n_samples", "seq_len", "eval_tokens")
        if any(earlier["args"][k] != getattr(args, k) for k in same):
            raise SystemExit(f"--reuse {args.reuse}: its settings differ from this run's")
        ran = {(r["method"], r["impl"]) for r in rows}
        kept = [r for r in earlier["rows"] if (r["method"], r["impl"]) not in ran]
        kept = [dict(r, reused_from=args.reuse) for r in kept if r["method"] in args.methods]
        rows = sorted(rows + kept, key=lambda r: (r["method"], r["impl"] != "quantlab"))
    print_table(rows, args)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


def print_table(rows: list[dict], args) -> None:
    print(
        f"\n{args.model}, {args.bits}-bit g{args.group_size}, calibration {args.n_samples} x "
        f"{args.seq_len} C4 tokens (same ids for all), wikitext2 test first {args.eval_tokens} "
        f"tokens (gptq protocol); KLD vs the unquantized model; quantlab calib dtype "
        f"{args.calib_dtype}"
    )
    header = (
        f"{'method':<6} {'impl':<14} {'seconds':>8} {'x fastest ref':>13} {'peak RSS MB':>11} "
        f"{'ppl':>8} {'vs best ref':>11} {'KLD':>8} {'top-1':>6}"
    )
    print(header)
    print("-" * len(header))
    for method in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == method]
        refs = [r for r in group if r["impl"] != "quantlab" and "error" not in r]
        fastest = min((r["seconds"] for r in refs), default=None)
        best = min((r["ppl"] for r in refs), default=None)
        for r in group:
            if "error" in r:
                print(f"{method:<6} {r['impl']:<14} failed: {r['error']}")
                continue
            speed = f"{r['seconds'] / fastest:.2f}" if fastest else "-"
            quality = f"{100 * (r['ppl'] / best - 1):+.2f}%" if best else "-"
            print(
                f"{method:<6} {r['impl']:<14} {r['seconds']:>8.1f} {speed:>13} "
                f"{r['peak_rss_mb']:>11.0f} {r['ppl']:>8.3f} {quality:>11} {r['kld']:>8.4f} "
                f"{r['top1']:>6.3f}"
            )
    ref_ppl = next((r["reference_ppl"] for r in rows if "reference_ppl" in r), None)
    if ref_ppl:
        print(f"unquantized model on the same tokens: ppl {ref_ppl:.3f}")


if __name__ == "__main__":
    sys.exit(main())
