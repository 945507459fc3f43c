"""Does the rewritten graph compute what the input graph computes? (MEASURE.md)

    relative error = max |y' - y| / max |y| over every output (max |y' - y| if y is all zero)
    top-1 agreement = share of samples whose arg-max of the first output agrees (classifiers)
NaN or Inf in y' never passes; neither does a changed output shape.

An exact rewrite only changes the order of fp32 sums, so it cannot be held to less than the input
graph's own round-off. ``fp32_noise_floor`` measures that: the input graph run twice by onnxruntime
with different kernels (graph optimisations on and off). Well-conditioned graphs sit near 1e-7; a
half-collapsed network can reach 1e-5 by itself, and the pipeline then accepts exact rewrites up to
NOISE_FACTOR times the measured floor (and says so in the report).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from egp_deploy.numeric import NOISE_FACTOR, relative_error
# onnxruntime runs live with the ORT runner (the one place that opens sessions); re-exported here
from egp_deploy.runners.ort import fp32_noise_floor, run_model

__all__ = ["NOISE_FACTOR", "compare", "fp32_noise_floor", "passes", "run_model"]


def compare(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, Any]:
    """Relative error and top-1 agreement of ``candidate`` against ``reference``."""
    if len(reference) != len(candidate):
        return {"rel_error": float("inf"), "max_abs_error": float("inf"), "top1_agreement": None,
                "finite": False, "samples": 0, "problem": "number of outputs changed"}
    rel, max_abs, finite, problem = 0.0, 0.0, True, None
    for y, y2 in zip(reference, candidate):
        if y.shape != y2.shape:
            return {"rel_error": float("inf"), "max_abs_error": float("inf"), "top1_agreement": None,
                    "finite": bool(np.isfinite(y2).all()), "samples": int(y.shape[0]) if y.ndim else 1,
                    "problem": f"output shape changed {y.shape} -> {y2.shape}"}
        if not np.isfinite(y2).all():
            finite, problem = False, "non-finite values in the rewritten graph's output"
        err, _, r, _ = relative_error(y2, y)
        max_abs = max(max_abs, err)
        rel = max(rel, r)
    top1 = None
    y, y2 = reference[0], candidate[0]
    if y.ndim == 2 and y.shape[1] > 1:
        top1 = float(np.mean(np.argmax(y, axis=1) == np.argmax(np.nan_to_num(y2, nan=-np.inf), axis=1)))
    return {"rel_error": rel, "max_abs_error": max_abs, "top1_agreement": top1, "finite": finite,
            "samples": int(y.shape[0]) if y.ndim else 1, "problem": problem}


def passes(result: dict[str, Any], tolerance: float) -> bool:
    return bool(result["finite"]) and result["problem"] is None and result["rel_error"] <= tolerance
