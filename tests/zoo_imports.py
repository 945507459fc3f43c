"""torchvision and timm for tests that build their models (no weights, nothing downloaded), skipped
where they are not installed (the ``zoo`` extra).

The torchvision wheel on PyPI is a CUDA build whose compiled ops cannot load beside the CPU torch
the tests install; only its two NMS operators are looked up at import time and the models need
neither, so their schemas are declared first (once per process) and the import goes through.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest
import torch

_declared: list = []  # the torch.library.Library holding the schemas must stay alive


def _declare_torchvision_ops() -> None:
    if _declared or importlib.util.find_spec("torchvision") is None:
        return
    try:
        torch.ops.torchvision.nms.default  # the real ops loaded (a torchvision built for this torch)
        lib = None
    except (AttributeError, RuntimeError):
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _declared.append(lib)


def import_torchvision() -> ModuleType:
    """``torchvision`` with its models importable, or skip the test."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed (pip install 'egp-deploy[zoo]')")
    _declare_torchvision_ops()
    import torchvision
    import torchvision.models  # noqa: F401

    return torchvision


def import_timm() -> ModuleType:
    """``timm``, or skip the test (timm imports torchvision when present: its ops are declared first)."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (pip install 'egp-deploy[zoo]')")
    _declare_torchvision_ops()
    import timm

    return timm
