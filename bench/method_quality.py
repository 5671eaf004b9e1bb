"""Quality of quantlab's RTN, GPTQ and AWQ across bit widths, on one calibration set.

For each bit width (default 3, 4, 8) at one group size (default 128), quantizes the model with RTN,
GPTQ and AWQ (all with zero points, or all symmetric with ``--sym``; ``--act-order`` for GPTQ) from
the same calibration windows (C4 sample, ``--n-samples`` x ``--seq-len``, seed 0),
writes each result as a quantlab-native artifact, and measures WikiText-2 test perplexity (gptq
protocol, the first ``--eval-tokens`` tokens; all of them with ``--eval-tokens 0``) and KL
divergence against the unquantized model on the same windows. Prints one table with each variant's
perplexity relative to fp32 and to RTN at the same width, and writes it as JSON.

    python bench/method_quality.py [--bits 3,4,8] [--group-size 128] [--eval-tokens 32768]

``--heldout`` instead measures every method *with its own defaults* (only the bit width and the
group size are set) at ``--bits`` x ``--group-sizes`` (64,128), on each of ``--corpora``
(WikiText-2 test, the local C4 validation sample, LAMBADA passages: none of them is calibration
text), perplexity and KLD/top-1 against the unquantized model on each, and prints one table.
``--try gptq:sym=false,act_order=true`` (repeatable) adds a variant with other settings, to
check a default against its alternatives (``rotate=true``: quantize the rotated model,
`quantlab.models.rotation`):

    python bench/method_quality.py --heldout [--methods rtn,hqq,gptq,awq] [--eval-tokens 8192]
"""

from __future__ import annotations

import argparse
import json
import shutil
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
    p.add_argument("--heldout", action="store_true", help="defaults on held-out corpora")
    p.add_argument("--group-sizes", default="64,128", help="with --heldout")
    p.add_argument("--corpora", default="wikitext2:test,c4:validation,lambada:test")
    p.add_argument("--try", dest="tries", action="append", default=[], metavar="METHOD:K=V,...")
    p.add_argument("--table", help="print the held-out table of a stored JSON run and stop")
    args = p.parse_args()
    if args.table:
        print_heldout(json.loads(Path(args.table).read_text()))
        return 0
    if args.heldout:
        return heldout(args)

    from quantlab.eval.harness import EvalConfig, evaluate
    from quantlab.eval.perplexity import PerplexityConfig
    from quantlab.methods import get_method

    source, calibration = _source_and_calibration(args)
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
                out, seconds = _quantize(
                    source, method, cfg, calibration, args, Path(tmp) / f"{method}-{bits}"
                )
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


def _source_and_calibration(args):
    """The resolved model and its calibration set (C4 train, ``n_samples`` x ``seq_len``,
    seed 0): the same for every variant of a run."""
    from quantlab.data.calibration import CalibrationConfig, build_calibration
    from quantlab.data.corpora import load_corpus
    from quantlab.models import load_tokenizer, resolve_model

    source = resolve_model(args.model)
    calib_cfg = CalibrationConfig("c4", "train", args.n_samples, args.seq_len)
    calibration = build_calibration(load_tokenizer(source), load_corpus("c4", "train"), calib_cfg)
    return source, calibration


def _quantize(source, method: str, cfg, calibration, args, out: Path) -> tuple[Path, float]:
    """Quantize a fresh copy of the model with ``method`` under ``cfg`` and write it as a
    quantlab-native artifact at ``out``; returns the path and the quantization's seconds."""
    from quantlab.formats.native import write_native
    from quantlab.methods import get_method
    from quantlab.methods.runner import quantize_model
    from quantlab.models import load_model

    needs = get_method(method).needs_calibration
    model = load_model(source)
    start = time.perf_counter()
    result = quantize_model(
        model, source.folder.arch, method, cfg, calibration if needs else None,
        calib_dtype=args.calib_dtype, progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    return write_native(result, source, out), seconds


def _parse_try(text: str) -> tuple[str, dict]:
    from quantlab.cli import _value

    method, _, body = text.partition(":")
    settings = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        settings[key] = _value(value)  # a bool, a number or the text, by its shape
    return method, settings


def heldout(args) -> int:
    """Every method's defaults (and ``--try`` alternatives) on held-out corpora."""
    import resource

    from quantlab.eval.harness import EvalConfig, evaluate
    from quantlab.eval.perplexity import PerplexityConfig
    from quantlab.methods import get_method

    source, calibration = _source_and_calibration(args)
    corpora = [tuple(c.split(":")) for c in args.corpora.split(",")]
    ppls = {
        c: PerplexityConfig(
            corpus=c[0], split=c[1], protocol="gptq", max_tokens=args.eval_tokens or None
        )
        for c in corpora
    }

    def measure(target, kld=True) -> dict:
        out = {}
        for c, ppl in ppls.items():
            config = EvalConfig(perplexity=(ppl,), kld=kld)
            m = evaluate(str(target), config, reference=args.model if kld else None)
            out[":".join(c)] = {
                "ppl": m.perplexity[0].ppl,
                "kld": m.kld.mean if m.kld else 0.0,
                "top1": m.kld.top1_agreement if m.kld else 1.0,
                "tokens": m.perplexity[0].scored_tokens,
            }
        return out

    variants = [(m, {}) for m in args.methods.split(",") if m] + [_parse_try(t) for t in args.tries]
    rows = [{"method": "fp32", "settings": "", "bits": 32, "group": 0, "seconds": 0.0}]
    rows[0]["corpora"] = measure(args.model, kld=False)
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (int(b) for b in args.bits.split(",")):
            for group in (int(g) for g in args.group_sizes.split(",")):
                for method, settings in variants:
                    spec = get_method(method)
                    own = {k: v for k, v in settings.items() if k != "rotate"}
                    cfg = spec.config_cls(bits=bits, group_size=group, **own)
                    label = ",".join(f"{k}={v}" for k, v in settings.items()) or "defaults"
                    where = Path(tmp) / f"{method}-{bits}-{group}"
                    model = source
                    if settings.get("rotate"):  # the rotated copy (cached), same calibration ids
                        from quantlab.models.rotation import rotated_model

                        model = rotated_model(source)
                    out, seconds = _quantize(model, method, cfg, calibration, args, where)
                    row = {
                        "method": method, "settings": label, "bits": bits, "group": group,
                        "config": {k: v for k, v in vars(cfg).items()}, "seconds": seconds,
                        "corpora": measure(out),
                    }  # fmt: skip
                    rows.append(row)
                    shutil.rmtree(out, ignore_errors=True)
                    done = " ".join(
                        f"{k} ppl {v['ppl']:.3f} KLD {v['kld']:.4f}"
                        for k, v in row["corpora"].items()
                    )
                    print(f"{method} {label} w{bits} g{group}: {done}", file=sys.stderr)
                    partial = {"args": vars(args), "rows": rows, "complete": False}
                    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.json).write_text(json.dumps(partial, indent=2) + "\n")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    names = [":".join(c) for c in corpora]
    tokens = {n: rows[0]["corpora"][n]["tokens"] for n in names}
    header = (
        f"{args.model}: every method's defaults (bits and group size set), calibration C4 train "
        f"{args.n_samples} x {args.seq_len} (seed 0, {calibration.sha256[:12]}), calib dtype "
        f"{args.calib_dtype}; held-out: "
        + ", ".join(f"{n} ({tokens[n]} tokens)" for n in names)
        + f", gptq protocol; peak RSS of the whole run {peak:.0f} MiB"
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    stored = {"args": vars(args), "rows": rows, "complete": True, "header": header}
    Path(args.json).write_text(json.dumps(stored, indent=2) + "\n")
    print_heldout(stored)
    print(f"\nwrote {args.json}")
    return 0


def print_heldout(stored: dict) -> None:
    """The held-out table of a stored run (complete, or the rows so far of one still running:
    ``python bench/method_quality.py --table FILE.json``)."""
    rows = stored["rows"]
    names = list(rows[0]["corpora"])
    print(f"\n{stored.get('header') or '(a run in progress: the rows so far)'}\n")
    head = "| method | settings | bits | group | " + " | ".join(f"{n} ppl | {n} KLD" for n in names)
    print(head + " | top-1 (mean) | seconds |")
    print("|" + "---|" * (6 + 2 * len(names)))
    for r in rows:
        cells = []
        for n in names:
            c = r["corpora"][n]
            rtn = next(
                (
                    x["corpora"][n]
                    for x in rows
                    if x["method"] == "rtn" and x["settings"] == "defaults"
                    and (x["bits"], x["group"]) == (r["bits"], r["group"])
                ),
                None,
            )  # fmt: skip
            vs = f" ({100 * (c['ppl'] / rtn['ppl'] - 1):+.1f} %)" if rtn and c is not rtn else ""
            cells += [f"{c['ppl']:.3f}{vs}", f"{c['kld']:.4f}"]
        top1 = sum(r["corpora"][n]["top1"] for n in names) / len(names)
        group = r["group"] or "-"
        print(
            f"| {r['method']} | {r['settings']} | {r['bits']} | {group} | "
            + " | ".join(cells)
            + f" | {top1:.3f} | {r['seconds']:.1f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
