"""torchvision and timm for tests that build their models (no weights, nothing downloaded).

torchvision's compiled ops cannot load beside a CPU-only torch build when its wheel was built for
CUDA, and its import then fails registering fakes for two ops. The model code needs none of them:
``vision()`` / ``timm()`` import the library as is, and only when that fails declare the two op
schemas and import it again. Either skips the calling test cleanly when the library is not
installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest
import torch

_SCHEMAS: list = []  # the torch.library.Library holding the declared schemas must stay alive


def _import_torchvision() -> None:
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed")
    try:
        importlib.import_module("torchvision.models")
        return
    except ImportError as e:  # a dependency of it is missing
        pytest.skip(f"torchvision does not import: {e}")
    except Exception:  # noqa: BLE001 - "operator torchvision::nms does not exist": its C++ ops did not load
        if _SCHEMAS:
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the half-imported package
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _SCHEMAS.append(lib)
    importlib.import_module("torchvision.models")


def vision():
    """``torchvision.models`` (skips the test without torchvision)."""
    _import_torchvision()
    import torchvision.models

    return torchvision.models


def timm():
    """``timm`` (skips the test without timm)."""
    if importlib.util.find_spec("torchvision") is not None:
        _import_torchvision()  # timm imports torchvision when it is installed
    return pytest.importorskip("timm")
