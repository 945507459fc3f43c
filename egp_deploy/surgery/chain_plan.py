"""The chain merge planner: the cheapest segmentation of a linear chain, by dynamic programming.

A chain of n linear layers is cut into contiguous segments; each segment becomes one merged layer
(a segment of one layer is that layer unchanged). ``cost(a, b)`` prices the segment of layers
a..b (inclusive) or returns None when that segment cannot be merged. The optimum over all 2^(n-1)
segmentations is found in O(n^2) calls: best[b + 1] = min over a of best[a] + cost(a, b).
Ties go to the plan with fewer segments (fewer layers at the same cost), then to the longer last segment.
"""

from __future__ import annotations

from typing import Callable, Mapping

SegmentCost = Callable[[int, int], "float | None"]


def plan_segments(n: int, cost: SegmentCost | Mapping[tuple[int, int], float]) -> tuple[float, list[tuple[int, int]]]:
    """(total cost, segments [(a, b), ...] covering 0..n-1 in order) of the cheapest segmentation.

    Every single-layer segment must be priced (a layer can always stay as it is)."""
    price = cost.get if isinstance(cost, Mapping) else cost
    if n <= 0:
        return 0.0, []
    best: list[tuple[float, int] | None] = [(0.0, 0)] + [None] * n
    cut = [0] * (n + 1)
    for b in range(n):
        for a in range(b + 1):
            c = price((a, b)) if isinstance(cost, Mapping) else price(a, b)
            if c is None or best[a] is None:
                if a == b and c is None:
                    raise ValueError(f"layer {a} has no cost: a single layer must always be allowed")
                continue
            cand = (best[a][0] + float(c), best[a][1] + 1)
            if best[b + 1] is None or cand < best[b + 1]:
                best[b + 1] = cand
                cut[b + 1] = a
    segments = []
    end = n
    while end > 0:
        segments.append((cut[end], end - 1))
        end = cut[end]
    return best[n][0], segments[::-1]
