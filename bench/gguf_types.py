"""GGUF quantization of the default model through quantlab, with and without the shared imatrix.

Builds the full-precision (F32) GGUF of the embedded default model, measures the importance matrix
once on the calibration set (C4 sample, ``--n-samples`` x ``--seq-len``), then for each GGUF type
quantizes with llama.cpp's own code (``llama_model_quantize``) without and with that imatrix, and
measures size, bits per weight, the per-tensor type mix, and KL divergence / top-1 agreement
against the fp32 model on WikiText-2 test (llamacpp protocol, the first ``--eval-tokens`` tokens)
in llama.cpp. With ``--llama-quantize PATH`` (llama.cpp's tool, same release as llama-cpp-python),
the same quantization is also run by the tool from quantlab's imatrix *file*, side by side: its
time, and whether its tensors are byte-identical to quantlab's.

    python bench/gguf_types.py [--types Q8_0,Q6_K,Q4_K_M,...] [--eval-tokens 8192]
        [--llama-quantize .../build/bin/llama-quantize]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TYPES = "Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_K_S,Q4_0,IQ4_XS,Q3_K_M,Q2_K,IQ3_XXS,IQ2_XS"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--types", default=TYPES)
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--llama-quantize", help="path of llama.cpp's llama-quantize, to run it too")
    p.add_argument("--json", default=str(ROOT / "results" / "bench-gguf.json"))
    args = p.parse_args()

    from quantlab import settings
    from quantlab.data.calibration import CalibrationConfig, build_calibration
    from quantlab.data.corpora import load_corpus
    from quantlab.eval.harness import EvalConfig, evaluate
    from quantlab.eval.measure import size_of
    from quantlab.eval.perplexity import PerplexityConfig
    from quantlab.formats.gguf_file import open_gguf
    from quantlab.formats.gguf_quant import (
        NEEDS_IMATRIX,
        full_precision_gguf,
        quantize_gguf,
        type_mix,
        write_imatrix_gguf,
    )
    from quantlab.methods.runner import collect_imatrix
    from quantlab.models import load_model, load_tokenizer, resolve_model

    source = resolve_model("smollm2-135m")
    start = time.perf_counter()
    f32 = full_precision_gguf(source, settings.cache_dir(), "F32")
    f32_seconds = time.perf_counter() - start
    calib_cfg = CalibrationConfig("c4", "train", args.n_samples, args.seq_len)
    corpus = load_corpus("c4", "train")
    calibration = build_calibration(load_tokenizer(source), corpus, calib_cfg)
    start = time.perf_counter()
    imatrix, rows = collect_imatrix(
        load_model(source), source.folder.arch, calibration, calib_dtype="bfloat16"
    )
    imatrix_seconds = time.perf_counter() - start
    ppl = PerplexityConfig(
        corpus="wikitext2", split="test", protocol="llamacpp", max_tokens=args.eval_tokens
    )
    config = EvalConfig(perplexity=(ppl,), kld=True)
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        imatrix_file = write_imatrix_gguf(
            tmp / "imatrix.gguf", imatrix, rows, [corpus.label], args.seq_len
        )
        for gtype in args.types.split(","):
            for use in (False, True):
                if gtype in NEEDS_IMATRIX and not use:
                    continue
                out = tmp / f"{gtype}{'-imat' if use else ''}.gguf"
                start = time.perf_counter()
                quantize_gguf(f32, out, gtype, imatrix=imatrix if use else None)
                seconds = time.perf_counter() - start
                row = {"type": gtype, "imatrix": use, "seconds": seconds}
                if use and args.llama_quantize:
                    row.update(_tool_run(args.llama_quantize, f32, imatrix_file, gtype, out, tmp))
                size = size_of(out)
                m = evaluate(str(out), config, reference="smollm2-135m")
                row.update(
                    mb=size.bytes_on_disk / 1e6,
                    bpw=size.bits_per_weight,
                    kld=m.kld.mean,
                    top1=m.kld.top1_agreement,
                    ppl=m.perplexity[0].ppl,
                    mix=type_mix(out),
                )
                rows_out.append(row)
                print(f"{gtype} imatrix={use}: KLD {row['kld']:.4f}", file=sys.stderr, flush=True)
                out.unlink()
        open_gguf(f32)
    print(
        f"\nsmollm2-135m (weights from Q4_1): F32 GGUF {f32_seconds:.1f} s (cached after the first "
        f"run), imatrix on {args.n_samples} x {args.seq_len} C4 tokens {imatrix_seconds:.1f} s; "
        f"KLD vs fp32 on {args.eval_tokens} WikiText-2 tokens (llamacpp protocol) in llama.cpp"
    )
    header = (
        f"{'type':<8} {'imatrix':>7} {'MB':>7} {'bpw':>6} {'seconds':>8} {'KLD':>8} {'top-1':>6}"
    )
    tool = bool(args.llama_quantize)
    if tool:
        header += f" {'tool s':>7} {'same bytes':>10}"
    print(header + "  tensor types")
    print("-" * (len(header) + 14))
    for r in rows_out:
        line = (
            f"{r['type']:<8} {'yes' if r['imatrix'] else 'no':>7} {r['mb']:>7.1f} {r['bpw']:>6.2f} "
            f"{r['seconds']:>8.2f} {r['kld']:>8.4f} {r['top1']:>6.3f}"
        )
        if tool:
            same = {True: "yes", False: "NO"}.get(r.get("tool_identical"), "-")
            line += f" {r.get('tool_seconds', float('nan')):>7.2f} {same:>10}"
        mix = ", ".join(f"{n} {t}" for t, n in r["mix"].items() if t != "F32")
        print(f"{line}  {mix}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows_out}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


def _tool_run(tool: str, f32: Path, imatrix_file: Path, gtype: str, ours: Path, tmp: Path) -> dict:
    """llama-quantize from quantlab's imatrix file: its time and whether its tensors equal ours."""
    from quantlab.formats.gguf_file import open_gguf

    out = tmp / f"tool-{gtype}.gguf"
    start = time.perf_counter()
    proc = subprocess.run(
        [tool, "--imatrix", str(imatrix_file), str(f32), str(out), gtype],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return {"tool_seconds": seconds, "tool_identical": None, "tool_error": proc.stderr[-300:]}
    a = {t.name: bytes(t.data.tobytes()) for t in open_gguf(ours).tensors}
    b = {t.name: bytes(t.data.tobytes()) for t in open_gguf(out).tensors}
    out.unlink()
    return {"tool_seconds": seconds, "tool_identical": a == b}


if __name__ == "__main__":
    sys.exit(main())
