"""torchvision and timm for tests that build their models (no weights, nothing downloaded).

torchvision's compiled ops cannot load beside a CPU-only torch build when its wheel was built for
CUDA; the model code needs none of them, only the two op schemas its Python side registers fakes
for at import. ``vision()`` / ``timm()`` declare those schemas first (once), then import the
library, or skip the calling test cleanly when it is not installed.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

_SCHEMAS: list = []  # the torch.library.Library holding the schemas must stay alive


def _declare_torchvision_ops() -> None:
    if _SCHEMAS or importlib.util.find_spec("torchvision") is None:
        return
    try:
        torch.ops.torchvision.nms.default  # the real ops loaded (a matching torchvision build)
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _SCHEMAS.append(lib)


def vision():
    """``torchvision.models`` (skips the test without torchvision)."""
    _declare_torchvision_ops()
    pytest.importorskip("torchvision")
    import torchvision.models

    return torchvision.models


def timm():
    """``timm`` (skips the test without timm)."""
    _declare_torchvision_ops()  # timm imports torchvision when it is installed
    return pytest.importorskip("timm")
