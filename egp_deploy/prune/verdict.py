"""THE EGP-vs-IMP verdict: does EGP leave more zero-entropy activation layers than IMP?

Both runs start from the same dense model and follow the same schedule, so iteration i of each
has the same nominal sparsity. The claim is judged where it matters for deployment: on the
iterations 1..N where BOTH methods keep test accuracy within ``tolerance`` points of dense
(zero entropy in a collapsed network is not depth anyone would deploy). It **holds** when, summed
over those iterations, EGP has more zero-entropy layers than IMP; it is undecidable (``None``)
when no iteration has both within the tolerance. Every other view (all iterations, wins / ties /
losses, the most pruned comparable iteration) is reported beside it for a reader who prefers a
stricter rule; tools/egp_vs_imp.py and tools/reproduce.py both use this one function.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

Row = Mapping[str, Any]  # one iteration: "iteration", "test_acc" and the zero-entropy count under ``key``


def _within(row: Row, dense_acc: float, tolerance: float) -> bool:
    return dense_acc - row["test_acc"] <= tolerance + 1e-9


def compare_methods(egp: Sequence[Row], imp: Sequence[Row], tolerance: float, key: str = "zero_entropy",
                    dense_acc: float | None = None) -> dict[str, Any]:
    """EGP vs IMP at matched iterations; ``holds`` is the verdict (see the module docstring).

    ``dense_acc`` defaults to iteration 0's test accuracy (the shared dense model)."""
    by_egp = {r["iteration"]: r for r in egp}
    by_imp = {r["iteration"]: r for r in imp}
    if dense_acc is None:
        start = by_egp.get(0) or by_imp.get(0)
        dense_acc = start["test_acc"] if start else None
    its = sorted(i for i in by_egp if i in by_imp and i > 0)
    diffs = [by_egp[i][key] - by_imp[i][key] for i in its]
    comparable = [i for i in its if dense_acc is not None
                  and _within(by_egp[i], dense_acc, tolerance) and _within(by_imp[i], dense_acc, tolerance)]
    held = [by_egp[i][key] - by_imp[i][key] for i in comparable]
    out: dict[str, Any] = {
        "criterion": (f"sum over the iterations where both methods are within {tolerance:g} points of dense of "
                      f"zero-entropy layers (EGP - IMP) > 0; matched iterations = equal nominal sparsity"),
        "tolerance_points": tolerance,
        "dense_test_acc": dense_acc,
        "iterations": its,
        "zero_entropy_diff": diffs,
        "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs), "losses": sum(d < 0 for d in diffs),
        "mean_diff": (sum(diffs) / len(diffs)) if diffs else None,
        "egp_more_all_iterations": bool(diffs) and sum(diffs) > 0,
        "at_accuracy": {"iterations": comparable, "zero_entropy_diff": held,
                        "mean_diff": (sum(held) / len(held)) if held else None},
        "holds": (sum(held) > 0) if held else None,
    }
    if comparable:
        last = comparable[-1]
        e, i = by_egp[last], by_imp[last]
        out["most_pruned_comparable"] = {"iteration": last, "egp": dict(e), "imp": dict(i)}
        out["text"] = (f"where both stay within {tolerance:g} points of dense {dense_acc:.2f} (iterations "
                       f"{comparable}), EGP - IMP zero-entropy layers {held} (sum {sum(held):+d}); at the most pruned "
                       f"of them (iteration {last}) EGP {e[key]} at {e['test_acc']:.2f} %, IMP {i[key]} at "
                       f"{i['test_acc']:.2f} %: claim {'HOLDS' if out['holds'] else 'does NOT hold'}")
    else:
        out["text"] = f"no iteration has both methods within {tolerance:g} points of dense: not decidable"
    return out
