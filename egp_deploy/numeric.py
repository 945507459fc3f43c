"""The numeric definitions every stage shares (numpy only, imported by prune, surgery and compare).

- ``relative_error``: max |y - ref| / max |ref| (MEASURE.md), the figure every verification reports;
  ``NOISE_FACTOR``: how far above a graph's own fp32 round-off an exact rewrite may land.
- ``region_entropy_bits`` / ``layer_entropy``: EGP's channel and layer entropy (EGP.md). A channel's
  entropy is the Shannon entropy (bits) of how its samples fall into the activation's linear
  regions: the binary entropy of p_on for two-region activations, the three-region entropy for
  ReLU6 (off / linear / saturated), so it is zero exactly when the channel stays in one region. A
  layer's entropy is the mean over its channels that do not (0 when none is left).
"""

from __future__ import annotations

import math

import numpy as np

#: an exact rewrite (or an export) is held to this many times the graph's own fp32 round-off
#: (``fp32_noise_floor``) when that round-off exceeds the tolerance (MEASURE.md)
NOISE_FACTOR = 2.0

#: default bound on the held-out rel. error of the surgery's data-dependent strips, per site and for
#: the whole result (ten times the exact rewrites' 1e-5): a strip on structure that is real (an
#: EGP-collapsed layer) is exact on any data, one on chance structure (units OFF on every calibration
#: sample of an untrained net) is off by 1e-3 to 1e-2 on other data and is reverted
DATA_DEPENDENT_ERROR_BOUND = 1e-4


def relative_error(y: np.ndarray, ref: np.ndarray) -> tuple[float, float, float, bool]:
    """(max |y-ref|, max |ref|, relative error, both finite); inf error if anything is non-finite.

    An all-zero reference falls back to the absolute error (any nonzero output is a mismatch).
    Shapes must agree (ValueError otherwise; callers that can see a shape change report it first)."""
    y = np.asarray(y, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if y.shape != ref.shape:
        raise ValueError(f"output shapes differ: {list(y.shape)} vs reference {list(ref.shape)}")
    if not (np.isfinite(y).all() and np.isfinite(ref).all()):
        return math.inf, math.inf, math.inf, False
    if y.size == 0:
        return 0.0, 0.0, 0.0, True
    abs_err = float(np.max(np.abs(y - ref)))
    scale = float(np.max(np.abs(ref)))
    return abs_err, scale, abs_err / scale if scale > 0 else abs_err, True


def region_entropy_bits(counts: np.ndarray) -> np.ndarray:
    """Shannon entropy (bits) of each row of a (C, R) table of region counts; 0 for empty rows."""
    c = np.asarray(counts, dtype=np.float64)
    p = c / np.maximum(c.sum(axis=1, keepdims=True), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    return np.maximum(-terms.sum(axis=1), 0.0)


def degenerate_channels(counts: np.ndarray) -> np.ndarray:
    """Channels whose samples all fall in one region (bool (C,)); an empty row counts as degenerate."""
    c = np.asarray(counts)
    return (c == c.sum(axis=1, keepdims=True)).any(axis=1)


def layer_entropy(counts: np.ndarray) -> float:
    """Mean channel entropy over the non-degenerate channels of a (C, R) count table, 0 if none."""
    live = ~degenerate_channels(counts)
    return float(region_entropy_bits(counts)[live].mean()) if live.any() else 0.0
