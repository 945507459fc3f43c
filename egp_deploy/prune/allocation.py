"""EGP's per-iteration pruning budget: irrelevance, water-filling softmax (EGP.md).

    P   = prunable layers with H_l != 0 and nonzero weights left (others are frozen)
    I_l = H_l * mean |w| over the nonzero weights of l
    S   = sum of I_l over P;  B = r * nonzero weights over P
    repeat: a_l = softmax_P(S / I_l), n_l = B a_l; a layer with n_l >= its limit is pruned by
            its limit: it leaves P, B loses the limit, S loses its I_l
A layer's limit is its remaining weights (the paper: it goes to 100 %) unless it has a cap
(``LayerState.max_prune``, used to keep a minimum in layers nothing bypasses); a capped layer
stops at its cap and its surplus is redistributed exactly like a 100 % layer's. Without caps
this is the paper's allocation. B is rounded to whole weights once, and the pool's shares are
rounded by largest remainder, so the weights pruned add up to B exactly (never more): rounding each
layer on its own could overshoot by up to half a weight per layer. ``temperature`` T divides the logits (softmax of S / (T I_l)); T = 1
is the paper's; T < 1 concentrates each iteration's budget on the least relevant layers (opt-in).
Pure functions of per-layer numbers, so a distributed run computes them from reduced stats only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class LayerState:
    name: str
    entropy: float  # H_l of the activation this layer feeds
    mean_abs: float  # mean |w| over the nonzero weights
    remaining: int  # nonzero weights left
    max_prune: int | None = None  # the most weights this iteration may remove; None: all remaining

    @property
    def limit(self) -> int:
        return self.remaining if self.max_prune is None else max(0, min(self.remaining, self.max_prune))


@dataclass
class Allocation:
    prune: dict[str, int]  # weights to remove now, per layer
    frozen: list[str]  # H_l == 0 or nothing left: not pruned
    full: list[str]  # driven to 100 % this iteration
    shares: dict[str, float] = field(default_factory=dict)  # final softmax share a_l (layers left in the pool)
    budget: int = 0  # B before water-filling
    capped: list[str] = field(default_factory=list)  # stopped at their cap (max_prune) short of 100 %

    def to_json(self) -> dict:
        return {"prune": self.prune, "frozen": self.frozen, "full": self.full, "capped": self.capped,
                "shares": self.shares, "budget": self.budget}


def _softmax(values: dict[str, float]) -> dict[str, float]:
    top = max(values.values())
    ex = {k: math.exp(v - top) for k, v in values.items()}
    z = sum(ex.values())
    return {k: e / z for k, e in ex.items()}


def allocate(layers: list[LayerState], rate: float = 0.5, temperature: float = 1.0) -> Allocation:
    """How many weights to prune per layer this iteration (EGP water-filling, optional caps)."""
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"pruning rate must be in (0, 1], got {rate}")
    if not temperature > 0.0:
        raise ValueError(f"allocation temperature must be > 0, got {temperature}")
    active = {l.name: l for l in layers if l.entropy > 0 and l.remaining > 0}
    frozen = [l.name for l in layers if l.name not in active]
    irrelevance = {n: l.entropy * l.mean_abs for n, l in active.items()}
    budget = int(round(rate * sum(l.remaining for l in active.values())))
    prune = {l.name: 0 for l in layers}
    saturated_order: list[str] = []
    remaining_budget = budget
    # a live layer with all |w| -> 0 has I_l = 0: it is the least relevant, so it takes the budget
    # first (its softmax share tends to 1), up to its limit
    for n in [n for n, i in irrelevance.items() if i <= 0.0]:
        prune[n] = min(active[n].limit, remaining_budget)
        remaining_budget -= prune[n]
        saturated_order.append(n)
    pool = {n: i for n, i in irrelevance.items() if n not in saturated_order}
    shares: dict[str, float] = {}
    n_alloc: dict[str, float] = {}
    while pool and remaining_budget > 0:
        s = sum(pool.values())
        shares = _softmax({n: s / (i * temperature) for n, i in pool.items()})
        n_alloc = {n: remaining_budget * a for n, a in shares.items()}
        saturated = [n for n, k in n_alloc.items() if k >= active[n].limit]
        if not saturated:
            break
        for n in saturated:  # their limits add up to at most remaining_budget (each limit <= its n)
            saturated_order.append(n)
            prune[n] = active[n].limit
            remaining_budget -= active[n].limit
            del pool[n]
        shares, n_alloc = {}, {}
    prune.update(_whole_weights(n_alloc, remaining_budget))
    full = [n for n in saturated_order if prune[n] == active[n].remaining]
    capped = [n for n in saturated_order if prune[n] == active[n].limit < active[n].remaining]
    return Allocation(prune, frozen, full, shares, budget, capped)


def _whole_weights(amounts: dict[str, float], total: int) -> dict[str, int]:
    """Round ``amounts`` (each below its layer's limit, adding up to ``total`` up to float error) to
    whole weights adding up to exactly ``total``: floors first, then one more weight each to the
    largest fractional parts (ties in layer order). floor + 1 never passes a limit: an amount below
    an integer limit has its floor below it too."""
    floors = {n: math.floor(k) for n, k in amounts.items()}
    extra = max(0, total - sum(floors.values()))
    by_fraction = sorted(amounts, key=lambda n: floors[n] - amounts[n])  # stable: ties keep layer order
    for n in by_fraction[:extra]:
        floors[n] += 1
    return floors
