"""Runners: one interface (load / infer / prepare + time_once) over every backend.

    from egp_deploy.runners import get_runner
    with get_runner("ort-cpu", "model.onnx", threads=2) as r:
        outputs = r.infer(feeds)

Backends: ort-cpu (default), ort-cuda, ort-trt, trt, torch-cpu, torch-cuda; "auto" picks from
the file: .engine/.plan/.trt -> trt, .pt/.pth -> torch-cpu, anything else -> ort-cpu.
Backends whose libraries are missing raise BackendUnavailableError when loaded, naming the
extra to install. Each runner takes typed keyword options (``runner_options(backend)`` lists
them); an option the backend does not take is refused with a UsageError.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from egp_deploy.errors import UsageError
from egp_deploy.runners.base import (
    Runner,
    TensorSpec,
    parse_shapes,
    random_inputs,
    resolve_input_shapes,
)

BACKENDS = ("ort-cpu", "ort-cuda", "ort-trt", "trt", "torch-cpu", "torch-cuda")
DEFAULT_BACKEND = "ort-cpu"
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
TORCH_SUFFIXES = (".pt", ".pth")

__all__ = [
    "BACKENDS", "DEFAULT_BACKEND", "Runner", "TensorSpec", "applicable_options", "get_runner", "parse_shapes",
    "random_inputs", "resolve_backend", "resolve_input_shapes", "runner_class", "runner_options",
]


def resolve_backend(backend: str | None, model_path: str | Path) -> str:
    """``auto``/None -> a backend chosen from the file suffix; otherwise validate the name."""
    if backend in (None, "", "auto"):
        suffix = Path(model_path).suffix.lower()
        if suffix in ENGINE_SUFFIXES:
            return "trt"
        if suffix in TORCH_SUFFIXES:
            return "torch-cpu"
        return DEFAULT_BACKEND
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose one of: auto, {', '.join(BACKENDS)}")
    suffix = Path(model_path).suffix.lower()
    if backend.startswith("torch") and suffix not in TORCH_SUFFIXES:
        raise UsageError(f"backend {backend} runs a model.pt checkpoint, not {Path(model_path).name}")
    if backend.startswith("ort") and suffix in ENGINE_SUFFIXES + TORCH_SUFFIXES:
        raise UsageError(f"backend {backend} runs an .onnx model, not {Path(model_path).name}")
    if backend == "trt" and suffix in (".onnx", *TORCH_SUFFIXES):
        raise UsageError(f"backend trt runs a TensorRT engine; build one first: egp-build {Path(model_path).name}")
    return backend


def runner_class(backend: str) -> type[Runner]:
    """The Runner subclass serving a (resolved) backend name; imports only that backend's module."""
    if backend.startswith("ort"):
        from egp_deploy.runners.ort import OrtRunner

        return OrtRunner
    if backend.startswith("torch"):
        from egp_deploy.runners.torch_runner import TorchRunner

        return TorchRunner
    from egp_deploy.runners.trt import TrtRunner

    return TrtRunner


def runner_options(backend: str) -> tuple[str, ...]:
    """Names of the keyword options the runner of ``backend`` takes (its typed constructor arguments)."""
    params = inspect.signature(runner_class(backend).__init__).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def applicable_options(backend: str | None, model_path: str | Path, **settings: Any) -> dict[str, Any]:
    """The subset of ``settings`` the runner of ``backend`` takes, for callers whose settings are
    shared by every backend (bench, compare): a TensorRT engine's precision is fixed when it is
    built, and it has no thread count. Everything else should go through get_runner's check."""
    accepted = runner_options(resolve_backend(backend, model_path))
    return {k: v for k, v in settings.items() if k in accepted}


def get_runner(backend: str | None, model_path: str | Path, **options: Any) -> Runner:
    """A runner for ``model_path`` on ``backend`` (not loaded yet: call .load() or use ``with``).

    ``options`` are the runner's typed keyword arguments (``runner_options(backend)``); None means
    "the runner's default". A name the runner does not take is a UsageError, never ignored.
    """
    backend = resolve_backend(backend, model_path)
    accepted = runner_options(backend)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UsageError(
            f"backend {backend} has no option {', '.join(map(repr, unknown))}; it takes: {', '.join(accepted)}"
        )
    given = {k: v for k, v in options.items() if v is not None}
    return runner_class(backend)(model_path, backend=backend, **given)
