"""Quality of quantlab's RTN, GPTQ and AWQ across bit widths, on one calibration set.

For each bit width (default 3, 4, 8) at one group size (default 128), quantizes the model with RTN,
GPTQ and AWQ (all with zero points, or all symmetric with ``--sym``; ``--act-order`` for GPTQ) from
the same calibration windows (C4 sample, ``--n-samples`` x ``--seq-len``, seed 0),
writes each result as a quantlab-native artifact, and measures WikiText-2 test perplexity (gptq
protocol, the first ``--eval-tokens`` tokens; all of them with ``--eval-tokens 0``) and KL
divergence against the unquantized model on the same windows. Prints one table with each variant's
perplexity relative to fp32 and to RTN at the same width, and writes it as JSON.

    python bench/method_quality.py [--bits 3,4,8] [--group-size 128] [--eval-tokens 32768]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bits", default="3,4,8")
    p.add_argument("--methods", default="rtn,gptq,awq")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--calib-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument(
        "--sym", action="store_true", help="symmetric for every method (default: zero points)"
    )
    p.add_argument("--act-order", action="store_true", help="GPTQ with act-order (desc_act)")
    p.add_argument("--json", default=str(ROOT / "results" / "bench-method-quality.json"))
    args = p.parse_args()

    from quantlab.data.calibration import CalibrationConfig, build_calibration
    from quantlab.data.corpora import load_corpus
    from quantlab.eval.harness import EvalConfig, evaluate
    from quantlab.eval.perplexity import PerplexityConfig
    from quantlab.formats.native import write_native
    from quantlab.methods import get_method
    from quantlab.methods.runner import quantize_model
    from quantlab.models import load_model, load_tokenizer, resolve_model

    source = resolve_model(args.model)
    calib_cfg = CalibrationConfig("c4", "train", args.n_samples, args.seq_len)
    calibration = build_calibration(load_tokenizer(source), load_corpus("c4", "train"), calib_cfg)
    ppl = PerplexityConfig(
        corpus="wikitext2", split="test", protocol="gptq", max_tokens=args.eval_tokens or None
    )
    config = EvalConfig(perplexity=(ppl,), kld=True)
    base = evaluate(args.model, EvalConfig(perplexity=(ppl,)))
    fp32 = base.perplexity[0].ppl
    rows = [{"method": "fp32", "bits": 32, "ppl": fp32, "kld": 0.0, "top1": 1.0, "seconds": 0.0}]
    print(f"fp32: ppl {fp32:.4f} ({base.perplexity[0].scored_tokens} tokens)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (int(b) for b in args.bits.split(",")):
            for method in args.methods.split(","):
                spec = get_method(method)
                sym = args.sym  # the same for every method, so rows compare like with like
                extra = {"act_order": True} if method == "gptq" and args.act_order else {}
                cfg = spec.config_cls(bits=bits, group_size=args.group_size, sym=sym, **extra)
                model = load_model(source)
                start = time.perf_counter()
                result = quantize_model(
                    model,
                    source.folder.arch,
                    method,
                    cfg,
                    calibration if spec.needs_calibration else None,
                    calib_dtype=args.calib_dtype,
                    progress=False,
                )
                seconds = time.perf_counter() - start
                out = write_native(result, source, Path(tmp) / f"{method}-{bits}")
                m = evaluate(str(out), config, reference=args.model)
                row = {
                    "method": method,
                    "bits": bits,
                    "sym": sym,
                    "ppl": m.perplexity[0].ppl,
                    "kld": m.kld.mean,
                    "top1": m.kld.top1_agreement,
                    "seconds": seconds,
                }
                rows.append(row)
                print(f"{method} {bits}-bit: ppl {row['ppl']:.4f}", file=sys.stderr, flush=True)
    print(
        f"\n{args.model}, group {args.group_size}, calibration C4 {args.n_samples} x "
        f"{args.seq_len} (seed 0, {calibration.sha256[:12]}), calib dtype {args.calib_dtype}; "
        f"WikiText-2 test, gptq protocol, {base.perplexity[0].scored_tokens} tokens"
    )
    header = (
        f"{'method':<6} {'bits':>4} {'ppl':>9} {'vs fp32':>8} {'vs RTN':>8} {'KLD':>8} "
        f"{'top-1':>6} {'seconds':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        rtn = next(
            (x["ppl"] for x in rows if x["method"] == "rtn" and x["bits"] == r["bits"]), None
        )
        vs_rtn = f"{100 * (r['ppl'] / rtn - 1):+.1f}%" if rtn and r["method"] != "fp32" else "-"
        vs_fp32 = 100 * (r["ppl"] / fp32 - 1)
        print(
            f"{r['method']:<6} {r['bits']:>4} {r['ppl']:>9.4f} {vs_fp32:>+7.2f}% "
            f"{vs_rtn:>8} {r['kld']:>8.4f} {r['top1']:>6.3f} {r['seconds']:>8.1f}"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
