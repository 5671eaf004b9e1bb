"""GGUF conversion and quantization: quantlab's path side by side with llama.cpp's own tools.

quantlab: ``convert_hf_to_gguf`` (llama.cpp's converter run by quantlab, plus its output checks:
the file parses, and llama.cpp tokenizes the probe texts exactly like the HF tokenizer), then
``quantize_gguf`` (llama.cpp's ``llama_model_quantize`` through llama-cpp-python) per type.
llama.cpp: the same release's ``convert_hf_to_gguf.py`` run by hand, then the ``llama-quantize``
tool (``--llama-quantize PATH``; built from the llama-cpp-python sdist with cmake). Both start
from the same HF folder (the default model unless ``--model``) and the same F16 file. The table
gives seconds for each side, the ratio quantlab / llama.cpp, the size, bits per weight, and
whether the two quantized files hold byte-identical tensors. Types that need an importance
matrix are in bench/gguf_types.py.

    python bench/gguf_convert.py [--model smollm2-135m] [--types Q8_0,Q6_K,...]
        [--llama-quantize .../vendor/llama.cpp/build/bin/llama-quantize]
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
TYPES = "Q8_0,Q6_K,Q5_K_M,Q5_K_S,Q4_K_M,Q4_K_S,Q4_0,IQ4_NL,IQ4_XS,Q3_K_M,Q2_K"


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def _run(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - start


def _tensors(path: Path) -> dict[str, bytes]:
    from quantlab.formats.gguf_file import open_gguf

    return {t.name: bytes(t.data.tobytes()) for t in open_gguf(path).tensors}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--types", default=TYPES)
    p.add_argument("--llama-quantize", help="llama.cpp's llama-quantize, to run it side by side")
    p.add_argument("--json", default=str(ROOT / "results" / "bench-gguf-convert.json"))
    args = p.parse_args()

    from quantlab import settings
    from quantlab.eval.measure import size_of
    from quantlab.formats.gguf_convert import SCRIPT, convert_hf_to_gguf, converter_dir
    from quantlab.formats.gguf_quant import NEEDS_IMATRIX, quantize_gguf
    from quantlab.models import resolve_model

    source = resolve_model(args.model)
    script = converter_dir(settings.cache_dir()) / SCRIPT
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (_, checks), ours = _timed(
            convert_hf_to_gguf, source, tmp / "ql-f16.gguf", "f16", cache=settings.cache_dir()
        )
        cmd = [
            sys.executable,
            str(script),
            str(source.path),
            "--outfile",
            str(tmp / "cpp-f16.gguf"),
        ]
        theirs = _run([*cmd, "--outtype", "f16"])
        same = _tensors(tmp / "ql-f16.gguf") == _tensors(tmp / "cpp-f16.gguf")
        size = size_of(tmp / "ql-f16.gguf")
        rows.append(
            dict(
                step="convert F16",
                ours=ours,
                theirs=theirs,
                mb=size.bytes_on_disk / 1e6,
                bpw=size.bits_per_weight,
                same=same,
            )
        )
        print(f"converted: {checks['tokenizer_parity']}", file=sys.stderr)
        for gtype in args.types.split(","):
            if gtype in NEEDS_IMATRIX:
                continue
            out = tmp / f"ql-{gtype}.gguf"
            _, ours = _timed(quantize_gguf, tmp / "ql-f16.gguf", out, gtype)
            row = dict(step=f"quantize {gtype}", ours=ours, theirs=None, same=None)
            if args.llama_quantize:
                tool_out = tmp / f"cpp-{gtype}.gguf"
                row["theirs"] = _run(
                    [args.llama_quantize, str(tmp / "cpp-f16.gguf"), str(tool_out), gtype]
                )
                row["same"] = _tensors(out) == _tensors(tool_out)
                tool_out.unlink()
            size = size_of(out)
            row.update(mb=size.bytes_on_disk / 1e6, bpw=size.bits_per_weight)
            rows.append(row)
            out.unlink()
            print(f"{gtype}: {ours:.2f} s", file=sys.stderr, flush=True)

    print(
        f"\n{args.model}: quantlab vs llama.cpp's own converter / llama-quantize "
        "(same release, same F16 input)"
    )
    header = (
        f"{'step':<18} {'quantlab s':>10} {'llama.cpp s':>11} {'ratio':>6} {'MB':>7} "
        f"{'bpw':>6} {'same tensors':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        theirs = f"{r['theirs']:.2f}" if r["theirs"] else "-"
        ratio = f"{r['ours'] / r['theirs']:.2f}" if r["theirs"] else "-"
        same = {True: "yes", False: "NO", None: "-"}[r["same"]]
        print(
            f"{r['step']:<18} {r['ours']:>10.2f} {theirs:>11} {ratio:>6} {r['mb']:>7.1f} "
            f"{r['bpw']:>6.2f} {same:>12}"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
