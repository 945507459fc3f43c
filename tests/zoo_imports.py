"""torchvision and timm for tests that build their models (no weights, nothing downloaded), skipped
where they are not installed (the ``zoo`` extra).

The torchvision wheel on PyPI is a CUDA build whose compiled ops cannot load beside the CPU torch
the tests install, and its import then fails registering fakes for its two NMS operators. The model
code needs neither: the library is imported as is, and only when that fails are the two op schemas
declared (once per process) and the import tried again.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

import pytest
import torch

_SCHEMAS: list = []  # the torch.library.Library holding the declared schemas must stay alive


def import_torchvision() -> ModuleType:
    """``torchvision`` with its models importable, or skip the test."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed (pip install 'egp-deploy[zoo]')")
    try:
        importlib.import_module("torchvision.models")
        return sys.modules["torchvision"]
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
    return sys.modules["torchvision"]


def import_timm() -> ModuleType:
    """``timm``, or skip the test (timm imports torchvision when it is installed: that goes first)."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (pip install 'egp-deploy[zoo]')")
    if importlib.util.find_spec("torchvision") is not None:
        import_torchvision()
    import timm

    return timm
