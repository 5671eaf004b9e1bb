"""Choose one setting per tensor that minimises the predicted KLD under a size budget.

The problem is a multiple-choice knapsack: each tensor ``t`` takes exactly one setting ``s`` of
size ``b(t, s)`` bytes and predicted cost ``k(t, s)`` (`quantlab.fit.sensitivity`), the total
size must stay within the budget, and the total cost (the sum of the per-tensor predictions)
should be least. quantlab solves it by the greedy on convex hulls, which is the Lagrangian
relaxation solved exactly:

1. per tensor, keep only the settings on the lower convex hull of its (bytes, cost) points
   (a setting that costs more bytes for more KLD, or that lies above the segment joining two
   others, is never the best choice for any price per byte ``lambda``);
2. start every tensor at its smallest setting (if that already exceeds the budget, nothing fits:
   the error says how small the smallest file is);
3. repeatedly take the upgrade, over all tensors, with the largest KLD saved per byte added that
   still fits (on a convex hull these ratios decrease along each tensor's curve, so the order is
   the order of decreasing ``lambda``), until no upgrade fits.

Every prefix of that sequence is optimal for the budget it uses (the Lagrangian argument); the
budget's leftover is less than one upgrade. A last pass then tries, for each tensor, any of its
settings (on the hull or not) that lowers the cost within the leftover. Why not an exact dynamic
program: with ~200-600 tensors and byte-exact sizes it is large, and the result of the greedy is
within one upgrade of the relaxation's optimum, well below the prediction's own error.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from quantlab.errors import QuantlabError


@dataclass(frozen=True)
class Option:
    key: str  # setting key (Q4_K, w4g128)
    nbytes: int
    cost: float  # predicted KLD


@dataclass
class Allocation:
    choice: dict[str, Option]  # unit name -> chosen option
    budget: int  # bytes available to the allocated tensors

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.choice.values())

    @property
    def predicted(self) -> float:
        return sum(o.cost for o in self.choice.values())

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.choice.values():
            out[o.key] = out.get(o.key, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def lower_hull(options: list[Option]) -> list[Option]:
    """The options on the lower convex hull of (bytes, cost), fewest bytes first, with cost
    strictly decreasing."""
    best: dict[int, Option] = {}
    for o in options:  # one option per size: the cheapest
        if o.nbytes not in best or o.cost < best[o.nbytes].cost:
            best[o.nbytes] = o
    hull: list[Option] = []
    for o in sorted(best.values(), key=lambda o: o.nbytes):
        if hull and o.cost >= hull[-1].cost:
            continue  # more bytes, no less cost: never chosen
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the segment a-o: (b - a) x (o - a) <= 0 in (bytes, cost)
            cross = (b.nbytes - a.nbytes) * (o.cost - a.cost) - (b.cost - a.cost) * (
                o.nbytes - a.nbytes
            )
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def allocate(curves: dict[str, list[Option]], budget: int) -> Allocation:
    """One option per unit (``curves``: unit -> its options) with total bytes <= ``budget`` and
    the least total cost found by the greedy on convex hulls (module docstring)."""
    if not curves:
        raise QuantlabError("nothing to allocate: no tensors")
    hulls = {}
    for name, options in curves.items():
        if not options:
            raise QuantlabError(f"{name}: no setting can store this tensor")
        hulls[name] = lower_hull(options)
    position = dict.fromkeys(hulls, 0)
    used = sum(h[0].nbytes for h in hulls.values())
    if used > budget:
        raise QuantlabError(
            f"nothing fits: the smallest settings need {used / 2**20:.1f} MiB for these tensors, "
            f"the budget leaves {budget / 2**20:.1f} MiB"
        )

    def upgrade(name: str):
        h, i = hulls[name], position[name]
        if i + 1 >= len(h):
            return None
        gain = h[i].cost - h[i + 1].cost
        extra = h[i + 1].nbytes - h[i].nbytes
        return (-gain / extra, name, i)

    heap = [u for u in (upgrade(n) for n in hulls) if u is not None]
    heapq.heapify(heap)
    while heap:
        _, name, i = heapq.heappop(heap)
        if position[name] != i:
            continue
        h = hulls[name]
        extra = h[i + 1].nbytes - h[i].nbytes
        if used + extra > budget:
            continue  # does not fit; smaller upgrades of other tensors may
        used += extra
        position[name] = i + 1
        nxt = upgrade(name)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    choice = {name: hulls[name][position[name]] for name in hulls}
    # the leftover: any option of any tensor that lowers the cost and still fits
    improved = True
    while improved:
        improved = False
        best = None
        for name, options in curves.items():
            current = choice[name]
            for o in options:
                if o.cost < current.cost and used - current.nbytes + o.nbytes <= budget:
                    gain = current.cost - o.cost
                    if best is None or gain > best[0]:
                        best = (gain, name, o)
        if best is not None:
            _, name, o = best
            used += o.nbytes - choice[name].nbytes
            choice[name] = o
            improved = True
    return Allocation(choice, budget)
