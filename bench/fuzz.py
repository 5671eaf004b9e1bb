"""Fuzz every parser of user-supplied files (quantlab.fuzz): 100k inputs by default, a table of
inputs / accepted / refused cleanly / findings per target, findings saved for replay.

    python bench/fuzz.py [--inputs 100000] [--seed 0] [--out results/fuzz]
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--inputs", type=int, default=100_000, help="total, split over the targets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-gib", type=float, default=8.0, help="address-space limit (RLIMIT_AS)")
    p.add_argument("--out", default=str(ROOT / "results" / "fuzz"))
    args = p.parse_args()
    limit = int(args.memory_gib * 2**30)  # a parser that tries to allocate 2^60 bytes fails here
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    from quantlab.fuzz import TARGETS, fuzz

    per = args.inputs // len(TARGETS)
    out = Path(args.out)
    rows = []
    for target in TARGETS:
        r = fuzz(target, per, seed=args.seed)
        rows.append(r)
        for i, (what, data) in enumerate(r.findings):
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{target}-{i}.bin").write_bytes(data)
            (out / f"{target}-{i}.txt").write_text(what + "\n")
        print(f"{target}: {r.inputs} inputs, {len(r.findings)} findings", file=sys.stderr)
    header = f"{'target':<20} {'inputs':>8} {'accepted':>9} {'refused':>8} {'findings':>9} {'s':>6}"
    print(f"\nseed {args.seed}, address space limited to {args.memory_gib:g} GiB, 2 s per input")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.target:<20} {r.inputs:>8} {r.accepted:>9} {r.refused:>8} "
            f"{len(r.findings):>9} {r.seconds:>6.1f}"
        )
    total = sum(len(r.findings) for r in rows)
    print(f"total: {sum(r.inputs for r in rows)} inputs, {total} findings")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
