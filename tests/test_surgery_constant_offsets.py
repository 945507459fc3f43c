"""constant_offsets: relu(relu(x) + c) loses a rectifier; per-channel constants fold into the next layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from egp_deploy.surgery import SurgeryOptions, optimize
from egp_deploy.surgery.canonicalize import canonicalize
from egp_deploy.surgery.constant_offsets import push_constant_adds, split_relu_offsets
from test_surgery_helpers import apply, export_module, ops, outputs, randn, rel_error

TOL = 1e-5


class _CollapsedBlock(nn.Module):
    """What a ResNet block with an all-zero branch becomes: relu(relu(conv(x)) + c)."""

    def __init__(self, offsets: torch.Tensor, reuse_inner: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, offsets.numel(), 3, padding=1)
        self.register_buffer("c", offsets.reshape(1, -1, 1, 1))
        self.reuse_inner = reuse_inner

    def forward(self, x):
        r = torch.relu(self.conv(x))
        y = torch.relu(r + self.c)
        return y + r if self.reuse_inner else y


@pytest.mark.parametrize("offsets", [[0.5, -0.7, 0.0, 2.0], [0.3, 0.1, 0.2, 0.4], [-0.3, -1.0, -0.2, -0.4]],
                         ids=["mixed", "positive", "negative"])
def test_relu_add_relu_loses_one_rectifier_exactly(offsets):
    model = export_module(_CollapsedBlock(torch.tensor(offsets)), (2, 3, 6, 6))
    out, recs = apply(model, split_relu_offsets)
    assert ops(model).count("Relu") == 2 and ops(out).count("Relu") == 1
    assert len(recs) == 1
    c = np.array(offsets)
    assert recs[0]["negative_offsets"] == int((c < 0).sum()) and recs[0]["positive_offsets"] == int((c > 0).sum())
    x = randn(2, 3, 6, 6) * 2
    assert rel_error(outputs(model, x), outputs(out, x)) <= TOL


def test_relu_add_relu_left_alone_when_inner_relu_is_read_elsewhere():
    model = export_module(_CollapsedBlock(torch.tensor([0.5, -0.5]), reuse_inner=True), (1, 3, 5, 5))
    out, recs = apply(model, split_relu_offsets)
    assert recs == [] and ops(out).count("Relu") == 2


def test_canonicalize_folds_the_negative_offset_into_the_conv():
    model = export_module(_CollapsedBlock(torch.tensor([0.5, -0.7, 0.0, 2.0])), (2, 3, 6, 6))
    out, done = apply(model, canonicalize)
    assert done["relu_offsets_split"] and ops(out) == ["Conv", "Relu", "Add"]
    x = randn(2, 3, 6, 6)
    assert rel_error(outputs(model, x), outputs(out, x)) <= TOL


class _OffsetHead(nn.Module):
    """relu -> + c -> (1x1 conv or padded 3x3) -> global pool -> + d -> flatten -> fc."""

    def __init__(self, padded: bool = False, groups: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3 if padded else 1, padding=1 if padded else 0, stride=2, groups=groups)
        self.fc = nn.Linear(8, 5)
        g = torch.Generator().manual_seed(0)
        self.register_buffer("c", torch.randn(1, 8, 1, 1, generator=g))
        self.register_buffer("d", torch.randn(1, 8, 1, 1, generator=g))

    def forward(self, x):
        h = self.mid(torch.relu(self.stem(x)) + self.c)
        h = nn.functional.adaptive_avg_pool2d(torch.relu(h), 1) + self.d
        return self.fc(torch.flatten(h, 1))


@pytest.mark.parametrize("groups", [1, 4, 8])
def test_constant_adds_fold_into_unpadded_conv_and_through_pool_into_gemm(groups):
    model = export_module(_OffsetHead(groups=groups), (2, 3, 8, 8))
    out, recs = apply(model, push_constant_adds)
    assert "Add" in ops(model) and "Add" not in ops(out)
    assert {r.get("into", "").split("/")[1] for r in recs if "into" in r} == {"mid", "fc"}
    x = randn(2, 3, 8, 8)
    assert rel_error(outputs(model, x), outputs(out, x)) <= TOL


def test_constant_add_before_padded_conv_stays():
    model = export_module(_OffsetHead(padded=True), (2, 3, 8, 8))
    out, recs = apply(model, push_constant_adds)
    assert ops(out).count("Add") == 1  # the one before the padded conv; the one after pooling reached fc
    assert [r for r in recs if "into" in r and "/mid/" in r["into"]] == []
    x = randn(2, 3, 8, 8)
    assert rel_error(outputs(model, x), outputs(out, x)) <= TOL


def test_collapsed_residual_chain_end_to_end_removes_rectifiers():
    """Two ResNet-like blocks whose branches are constants: the post-add ReLUs of the second go."""

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 8, 3, padding=1)
            self.c1 = nn.Parameter(torch.linspace(-1, 1, 8).reshape(1, 8, 1, 1))
            self.c2 = nn.Parameter(torch.linspace(1, -1, 8).reshape(1, 8, 1, 1))
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            h = torch.relu(h + self.c1)
            h = torch.relu(h + self.c2)
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))

    model = export_module(Chain(), (1, 1, 8, 8), dynamic=True)
    x, held = randn(16, 1, 8, 8), randn(16, 1, 8, 8, seed=1)
    res = optimize(model, x, held, SurgeryOptions(strip_activations=False))
    assert ops(res.model).count("Relu") == 1
    assert res.report["verification"]["calibration"]["rel_error"] <= TOL
    assert rel_error(outputs(model, held), outputs(res.model, held)) <= TOL


def test_offset_split_waits_for_the_activation_statistics():
    """An inner ReLU always ON on calibration data is stripped by its MEASURED statistics; splitting the
    offset first would shift its input by min(c, 0) and make that strip wrong."""

    class AlwaysOnThenOffset(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            with torch.no_grad():
                self.conv.weight.mul_(0.1)
                self.conv.bias.fill_(1.0)
            self.register_buffer("c", torch.tensor([-1.0, 0.5, -0.2, 0.3]).reshape(1, 4, 1, 1))

        def forward(self, x):
            return torch.relu(torch.relu(self.conv(x)) + self.c)

    model = export_module(AlwaysOnThenOffset(), (1, 3, 6, 6), dynamic=True)
    x, held = randn(32, 3, 6, 6), randn(16, 3, 6, 6, seed=1)
    res = optimize(model, x, held)
    assert res.report["verification"]["calibration"]["rel_error"] <= TOL
    assert ops(res.model).count("Relu") <= 1
    assert rel_error(outputs(model, held), outputs(res.model, held)) <= TOL
