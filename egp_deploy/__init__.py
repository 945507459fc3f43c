"""egp-deploy: Entropy-Guided Pruning turned into a physically shallower deployed graph.

Stages, each a module or subpackage, data flowing one way:
    archs/data/checkpoint (foundation) -> prune -> export -> surgery -> build -> bench

The everyday calls are importable from here (:mod:`egp_deploy.api`); ``import egp_deploy`` stays
light: torch, onnx and onnxruntime load only when one of them is first used.

    import egp_deploy as egp
    job = egp.deploy("model.pt", "model.egp.onnx")    # export -> verify -> surgery -> write
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# onnxruntime's telemetry (1.31+) prints a warning at import when it cannot store a device id (HOME not
# writable); a default set before onnxruntime is first imported, which a user's setting overrides
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.2.0"

__all__ = [
    "__version__", "prune", "export", "optimize", "deploy", "bench", "check", "train_dense",
    "DeployResult", "DeployPaths", "BenchReport", "CheckResult", "load_calibration", "CalibrationSet", "Pruner",
]

_FROM = {
    "load_calibration": "egp_deploy.calibration", "CalibrationSet": "egp_deploy.calibration",
    "Pruner": "egp_deploy.prune.pruner",
}

if TYPE_CHECKING:
    from egp_deploy.api import (BenchReport, CheckResult, DeployPaths, DeployResult, bench, check, deploy, export,
                                optimize, prune, train_dense)
    from egp_deploy.calibration import CalibrationSet, load_calibration
    from egp_deploy.prune.pruner import Pruner


def __getattr__(name: str) -> Any:
    if name in __all__ and name != "__version__":
        import importlib

        if name in ("prune", "export", "bench"):  # callable stage modules: see egp_deploy/_callable.py
            return importlib.import_module(f"egp_deploy.{name}")
        value = getattr(importlib.import_module(_FROM.get(name, "egp_deploy.api")), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'egp_deploy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
