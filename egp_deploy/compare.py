"""Accuracy of an engine / any backend against onnxruntime CPU on the same random inputs.

Error measure (MEASURE.md): per output, max |y - y_ref| / max |y_ref|; the verdict uses the
worst output. NaN/Inf in either never passes. Top-1 agreement is reported for 2-D outputs.
Our own few lines of numpy rather than Polygraphy's Comparator so that every backend of our
runner interface (torch, ORT CUDA, TensorRT) is compared the same way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from egp_deploy.errors import UsageError
from egp_deploy.numeric import relative_error as _relative_error
from egp_deploy.runners import Runner, applicable_options, get_runner, random_inputs, resolve_input_shapes
from egp_deploy.runners.base import ShapeTriple

# Relative tolerance (max|dy| / max|y|) by precision. "exact" is for graph rewrites that are
# mathematically exact (our surgery); "fp32" allows an engine's different kernels and
# reduction orders; "fp16" allows half precision (10-bit mantissa, ~1e-3 per op, accumulating).
DEFAULT_TOLERANCES = {"exact": 1e-5, "fp32": 1e-3, "fp16": 1e-2}


@dataclass
class OutputComparison:
    name: str
    shape: list[int]
    max_abs_error: float
    max_abs_reference: float
    relative_error: float
    finite: bool
    top1_agreement: float | None = None


@dataclass
class ComparisonResult:
    passed: bool
    tolerance: float
    precision: str
    #: smallest tolerance that would pass (the worst relative error); inf when non-finite
    min_passing_tolerance: float
    outputs: list[OutputComparison] = field(default_factory=list)
    backend: str = ""
    reference_backend: str = "ort-cpu"
    batches: int = 0
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def relative_error(y: np.ndarray, ref: np.ndarray) -> tuple[float, float, float, bool]:
    """egp_deploy.numeric.relative_error, with a shape mismatch as the user's error."""
    try:
        return _relative_error(y, ref)
    except ValueError as e:
        raise UsageError(str(e)) from None


def compare_outputs(
    outputs: list[Mapping[str, np.ndarray]], references: list[Mapping[str, np.ndarray]],
    precision: str = "fp32", tolerance: float | None = None,
) -> ComparisonResult:
    """Verdict over several batches of outputs (one dict per batch) against their references."""
    tol = resolve_tolerance(precision, tolerance)
    if not references:
        raise UsageError("nothing to compare")
    names = list(references[0])
    missing = [n for n in names if n not in outputs[0]]
    if missing and len(outputs[0]) == len(names):
        # engines may rename outputs; pair them by position
        outputs = [dict(zip(names, o.values())) for o in outputs]
    elif missing:
        raise UsageError(f"outputs {missing} missing from the compared backend (it has {list(outputs[0])})")
    comps = []
    for name in names:
        ys = np.concatenate([np.atleast_1d(np.asarray(o[name])) for o in outputs], axis=0)
        rs = np.concatenate([np.atleast_1d(np.asarray(r[name])) for r in references], axis=0)
        abs_err, scale, rel, finite = relative_error(ys, rs)
        top1 = None
        if ys.ndim == 2 and ys.shape[1] > 1 and finite:
            top1 = float(np.mean(np.argmax(ys, axis=1) == np.argmax(rs, axis=1)))
        comps.append(OutputComparison(name, list(ys.shape), abs_err, scale, rel, finite, top1))
    worst = max(c.relative_error for c in comps)
    passed = all(c.finite for c in comps) and worst <= tol
    if not all(c.finite for c in comps):
        msg = "FAIL: non-finite values (NaN/Inf) in the outputs"
    else:
        msg = f"{'PASS' if passed else 'FAIL'}: max relative error {worst:.3g} {'<=' if passed else '>'} tolerance {tol:g}"
    return ComparisonResult(passed, tol, precision, worst, comps, batches=len(outputs), message=msg)


def resolve_tolerance(precision: str, tolerance: float | None) -> float:
    if tolerance is not None:
        if not (tolerance >= 0 and math.isfinite(tolerance)):
            raise UsageError(f"tolerance must be a finite number >= 0, got {tolerance}")
        return float(tolerance)
    if precision not in DEFAULT_TOLERANCES:
        raise UsageError(f"precision {precision!r}: choose one of {', '.join(DEFAULT_TOLERANCES)}")
    return DEFAULT_TOLERANCES[precision]


def compare_runner(
    runner: Runner,
    reference_onnx: str | Path,
    *,
    precision: str = "fp32",
    tolerance: float | None = None,
    batches: int = 3,
    batch: int | None = None,
    shapes: Mapping[str, ShapeTriple] | None = None,
    seed: int = 0,
    threads: int | None = None,
) -> ComparisonResult:
    """Feed ``runner`` and onnxruntime CPU on ``reference_onnx`` the same random batches; compare."""
    if batches < 1:
        raise UsageError("batches must be >= 1")
    reference = get_runner("ort-cpu", reference_onnx, threads=threads)
    with reference:
        runner.load()
        specs = reference.input_specs()
        shape_map = resolve_input_shapes(specs, batch, shapes)
        outs, refs = [], []
        for k in range(batches):
            feeds = random_inputs(specs, shape_map, seed=seed + k)
            run_specs = runner.input_specs()
            if sorted(s.name for s in run_specs) == sorted(feeds):
                pairs = [(s, feeds[s.name]) for s in run_specs]
            elif len(run_specs) == len(specs):  # renamed inputs (e.g. a checkpoint's "input"): by position
                pairs = [(s, feeds[r.name]) for s, r in zip(run_specs, specs)]
            else:
                raise UsageError(f"inputs differ: {[s.name for s in run_specs]} vs reference {sorted(feeds)}")
            run_feeds = {s.name: a.astype(s.dtype, copy=False) for s, a in pairs}
            refs.append(reference.infer(feeds))
            outs.append(runner.infer(run_feeds))
    result = compare_outputs(outs, refs, precision=precision, tolerance=tolerance)
    result.backend = runner.backend
    return result


def compare_models(
    model_path: str | Path, reference_onnx: str | Path, backend: str | None = None, **kwargs: Any
) -> ComparisonResult:
    """Convenience: ``model_path`` on ``backend`` (auto from suffix) against ORT CPU on ``reference_onnx``."""
    precision = kwargs.get("precision", "fp32") if kwargs.get("precision") != "exact" else "fp32"
    runner = get_runner(backend, model_path,
                        **applicable_options(backend, model_path, threads=kwargs.get("threads"), precision=precision))
    try:
        return compare_runner(runner, reference_onnx, **kwargs)
    finally:
        runner.close()
