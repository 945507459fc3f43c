"""The one interface every backend implements: load, infer, and a timed-iteration primitive.

A runner is used in two ways:
  * ``infer(feeds)``: numpy in, numpy out (accuracy comparison, smoke tests);
  * ``prepare(feeds)`` once, then ``time_once()`` many times (benchmark): inputs are bound once
    (device buffers on GPUs) so a timed iteration measures the model, not our Python glue.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from egp_deploy.errors import DataError, UsageError


@dataclass(frozen=True)
class TensorSpec:
    """One model input/output: ``shape`` holds None for a dimension the model leaves dynamic."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": [d if d is not None else "?" for d in self.shape], "dtype": str(self.dtype)}


class Runner(ABC):
    """Base class of all backends; subclasses set ``backend`` and implement the abstract methods.

    The base class owns the loaded state: ``load()`` runs ``_load_impl()`` once, ``close()`` runs
    ``_close_impl()`` only when loaded, so both are idempotent and a closed runner loads again.
    Subclasses take their options as typed keyword arguments (see ``get_runner``).
    """

    backend: str = "?"
    #: what a timed iteration covers; GPU runners change it with include_copies
    timing_note: str = "host wall clock around one inference call"

    def __init__(self, model_path: str | Path) -> None:
        self.model_path = Path(model_path)
        self._loaded = False

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def is_loaded(self) -> bool:
        return self._loaded

    @abstractmethod
    def _load_impl(self) -> None:
        """Open the model (session, engine, module); raise the project's error classes on failure."""

    def _close_impl(self) -> None:
        """Release what ``_load_impl`` opened (sessions, buffers)."""

    def load(self) -> "Runner":
        if not self._loaded:
            try:
                self._load_impl()
            except BaseException:
                self._close_impl()  # nothing half-opened stays behind a failed load
                raise
            self._loaded = True
        return self

    def close(self) -> None:
        """Release sessions/buffers; safe to call twice."""
        if self._loaded:
            self._close_impl()
        self._loaded = False

    def __enter__(self) -> "Runner":
        return self.load()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- metadata -------------------------------------------------------------------------
    @abstractmethod
    def input_specs(self) -> list[TensorSpec]: ...

    @abstractmethod
    def output_names(self) -> list[str]: ...

    def describe(self) -> dict[str, Any]:
        """Backend facts for the environment record (threads, providers, device, graph capture...)."""
        return {"backend": self.backend, "timing": self.timing_note}

    # -- execution ------------------------------------------------------------------------
    @abstractmethod
    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def prepare(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Bind ``feeds`` for repeated timing (copied to device buffers where there are any)."""

    @abstractmethod
    def time_once(self) -> float:
        """Run one inference on the prepared inputs; return its latency in milliseconds."""

    # -- helpers for subclasses -------------------------------------------------------------
    def _check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        specs = {s.name: s for s in self.input_specs()}
        missing = sorted(set(specs) - set(feeds))
        extra = sorted(set(feeds) - set(specs))
        if missing or extra:
            raise DataError(
                f"{self.model_path.name}: inputs {sorted(specs)} expected, got {sorted(feeds)}"
            )
        for name, arr in feeds.items():
            spec = specs[name]
            if len(arr.shape) != len(spec.shape) or any(
                d is not None and d != a for d, a in zip(spec.shape, arr.shape)
            ):
                raise DataError(
                    f"{self.model_path.name}: input {name!r} has shape {list(arr.shape)}, "
                    f"the model expects {[d if d is not None else '?' for d in spec.shape]}"
                )


# ------------------------------------------------------------------------------------------
# Shapes: trtexec-style ``NAME:1x3x32x32`` or ``NAME:MIN/OPT/MAX``; several separated by commas.
# ------------------------------------------------------------------------------------------
ShapeTriple = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
_DIMS = re.compile(r"^\d+(x\d+)*$")


def _parse_dims(text: str, where: str) -> tuple[int, ...]:
    text = text.strip().lower()
    if not _DIMS.match(text):
        raise UsageError(f"bad shape {text!r} in {where!r}: write dimensions like 1x3x32x32")
    dims = tuple(int(d) for d in text.split("x"))
    if any(d <= 0 for d in dims):
        raise UsageError(f"bad shape {text!r} in {where!r}: dimensions must be positive")
    return dims


def parse_shapes(spec: str | list[str] | None) -> dict[str, ShapeTriple]:
    """``"input:1x3x32x32/4x3x32x32/8x3x32x32,mask:1x10"`` -> {name: (min, opt, max)}.

    A single shape means min = opt = max (static). The name is split at the LAST colon so
    names like ``input:0`` work.
    """
    if not spec:
        return {}
    items = [spec] if isinstance(spec, str) else list(spec)
    out: dict[str, ShapeTriple] = {}
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))):
            name, sep, dims = part.rpartition(":")
            if not sep or not name:
                raise UsageError(f"bad --shapes entry {part!r}: expected NAME:1x3x32x32 or NAME:MIN/OPT/MAX")
            triple = [_parse_dims(d, part) for d in dims.split("/")]
            if len(triple) == 1:
                triple = triple * 3
            if len(triple) != 3:
                raise UsageError(f"bad --shapes entry {part!r}: give one shape or exactly MIN/OPT/MAX")
            lo, opt, hi = triple
            if not (len(lo) == len(opt) == len(hi)):
                raise UsageError(f"bad --shapes entry {part!r}: MIN/OPT/MAX must have the same rank")
            if any(not (a <= b <= c) for a, b, c in zip(lo, opt, hi)):
                raise UsageError(f"bad --shapes entry {part!r}: need MIN <= OPT <= MAX in every dimension")
            if name in out:
                raise UsageError(f"--shapes names input {name!r} twice")
            out[name] = (lo, opt, hi)
    return out


def resolve_input_shapes(
    specs: list[TensorSpec], batch: int | None = None, shapes: Mapping[str, ShapeTriple] | None = None
) -> dict[str, tuple[int, ...]]:
    """Concrete shape of every input: --shapes (its OPT) wins, else a dynamic dim 0 becomes ``batch``.

    Raises UsageError naming the input when a shape is unknown, of the wrong rank, contradicts a
    static dimension, or names an input the model does not have.
    """
    shapes = dict(shapes or {})
    names = [s.name for s in specs]
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise UsageError(f"--shapes names {unknown}, the model's inputs are {names}")
    out: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        if spec.name in shapes:
            shape = shapes[spec.name][1]
            if len(shape) != len(spec.shape) or any(d is not None and d != s for d, s in zip(spec.shape, shape)):
                raise UsageError(
                    f"wrong shape {list(shape)} for input {spec.name!r}: the model expects "
                    f"{[d if d is not None else '?' for d in spec.shape]}"
                )
            out[spec.name] = tuple(shape)
            continue
        dims = list(spec.shape)
        if dims and dims[0] is None:
            dims[0] = batch or 1
        elif dims and batch is not None and dims[0] != batch:
            raise UsageError(
                f"input {spec.name!r} has a static batch of {dims[0]}, --batch {batch} needs a model "
                "exported with a dynamic batch (egp-export --dynamic-batch)"
            )
        if any(d is None for d in dims):
            raise UsageError(
                f"input {spec.name!r} has dynamic dimensions {[d if d is not None else '?' for d in spec.shape]}: "
                f"give them with --shapes {spec.name}:" + "x".join(str(d or 1) for d in dims)
            )
        out[spec.name] = tuple(int(d) for d in dims)
    return out


def random_inputs(specs: list[TensorSpec], shapes: Mapping[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds drawn once: normal floats, integers in [1, 10], random booleans (never all zeros)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = shapes[spec.name]
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            arr = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        elif dtype.kind in "iu":
            arr = rng.integers(1, 11, size=shape).astype(dtype)
        elif dtype.kind == "b":
            arr = rng.random(shape) < 0.5
        else:
            raise UsageError(f"input {spec.name!r} has dtype {dtype}, which cannot be drawn at random")
        feeds[spec.name] = np.ascontiguousarray(arr)
    return feeds
