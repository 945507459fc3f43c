"""torchvision and timm for tests, skipped where they are not installed (the [zoo] extra).

The torchvision wheel on PyPI is a CUDA build whose compiled ops cannot load beside the CPU
torch the tests install; only its two NMS operators are looked up at import time, and the
models need neither, so their schemas are declared first (once per process) and the import
goes through. Nothing here touches a model's code."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest
import torch

_declared: list = []  # the Library object must stay alive, or the declarations go with it


def _declare_torchvision_ops() -> None:
    if _declared:
        return
    try:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:  # already declared: torchvision's own ops loaded, or another helper did it
        lib = None
    _declared.append(lib)


def import_torchvision() -> ModuleType:
    """``torchvision`` (its models importable), or skip the test."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed (pip install 'egp-deploy[zoo]')")
    _declare_torchvision_ops()
    import torchvision
    import torchvision.models  # noqa: F401

    return torchvision


def import_timm() -> ModuleType:
    """``timm``, or skip the test (timm imports torchvision: its ops are declared first)."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (pip install 'egp-deploy[zoo]')")
    if importlib.util.find_spec("torchvision") is not None:
        import_torchvision()
    import timm

    return timm
