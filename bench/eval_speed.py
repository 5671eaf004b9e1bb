"""Throughput of the evaluation forward pass: quantlab's transformers path vs llama.cpp.

Both sides compute every position's logits for the same windows of the same token ids (what a
perplexity/KLD evaluation needs), on the same weights: the default model's fp32 Hugging Face folder
in transformers, and the same tensors as an F32 (and F16) GGUF in llama.cpp. Prints tokens/s as the
median of ``--runs`` timed passes after a warm-up, and each row's ratio to llama.cpp F32.

    python bench/eval_speed.py [--windows 4] [--context 512] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from quantlab.eval.runners import HFRunner, LlamaCppRunner
from quantlab.formats.gguf_file import retype_gguf
from quantlab.models import load_model, load_tokenizer, resolve_model
from quantlab.models.embedded import embedded_gguf_path


def throughput(runner, ids: np.ndarray, runs: int) -> float:
    for row in ids[:1]:
        runner.logits(row)  # warm-up
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        for row in ids:
            runner.logits(row)
        rates.append(ids.size / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    model = resolve_model("smollm2-135m")
    tokenizer = load_tokenizer(model)
    rng = np.random.default_rng(0)
    ids = rng.integers(100, 30000, size=(args.windows, args.context))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            runner = HFRunner(load_model(model, dtype=dtype), tokenizer, dtype)
            rows.append((f"quantlab transformers {dtype}", throughput(runner, ids, args.runs)))
            del runner
        for kind in ("F32", "F16"):
            path = retype_gguf(embedded_gguf_path(), Path(tmp) / f"m-{kind}.gguf", kind)
            runner = LlamaCppRunner(path, n_ctx=args.context)
            rows.append((f"llama.cpp GGUF {kind}", throughput(runner, ids, args.runs)))
            runner.close()
    base = dict(rows)["llama.cpp GGUF F32"]
    print(
        f"evaluation forward pass, SmolLM2-135M, {args.windows} windows x {args.context} "
        f"tokens, all logits, median of {args.runs}"
    )
    print(f"{'runtime':<34} {'tokens/s':>10} {'vs llama.cpp F32':>18}")
    for name, rate in rows:
        print(f"{name:<34} {rate:>10.1f} {rate / base:>17.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
