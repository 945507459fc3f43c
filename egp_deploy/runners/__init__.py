"""Runners: one interface (load / infer / prepare + time_once) over every backend.

    from egp_deploy.runners import get_runner
    with get_runner("ort-cpu", "model.onnx", threads=2) as r:
        outputs = r.infer(feeds)

Backends: ort-cpu (default), ort-cuda, ort-trt, trt, torch-cpu, torch-cuda; "auto" picks from
the file: .engine/.plan/.trt -> trt, .pt/.pth -> torch-cpu, anything else -> ort-cpu.
Backends whose libraries are missing raise BackendUnavailableError when loaded, naming the
extra to install.
"""

from __future__ import annotations

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
    "BACKENDS", "DEFAULT_BACKEND", "Runner", "TensorSpec", "get_runner", "resolve_backend",
    "parse_shapes", "random_inputs", "resolve_input_shapes",
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


def get_runner(backend: str | None, model_path: str | Path, **options: Any) -> Runner:
    """A runner for ``model_path`` on ``backend`` (not loaded yet: call .load() or use ``with``)."""
    backend = resolve_backend(backend, model_path)
    if backend.startswith("ort"):
        from egp_deploy.runners.ort import OrtRunner

        return OrtRunner(model_path, backend=backend, **options)
    if backend.startswith("torch"):
        from egp_deploy.runners.torch_runner import TorchRunner

        return TorchRunner(model_path, backend=backend, **options)
    from egp_deploy.runners.trt import TrtRunner

    return TrtRunner(model_path, backend=backend, **options)
