"""One entropy definition: egp-prune (PyTorch hooks) and the surgery (ONNX statistics) report the
same per-layer entropies on a ReLU6 network, including channels split between OFF and saturated."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from egp_deploy.data import make_loader
from egp_deploy.numeric import layer_entropy, region_entropy_bits, relative_error
from egp_deploy.prune.entropy import measure_entropy
from egp_deploy.surgery import SurgeryOptions, optimize
from test_surgery_helpers import export_module


class _Relu6Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.act1 = nn.Conv2d(2, 6, 3, padding=1), nn.ReLU6()
        self.conv2, self.act2 = nn.Conv2d(6, 4, 1), nn.ReLU6()
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.conv1.weight.mul_(4.0)
            self.conv1.bias.fill_(2.0)
            # channel 0 reads +-1 pixels through its centre tap only: +-1000, OFF or saturated, never linear
            self.conv1.weight[0] = 0.0
            self.conv1.weight[0, 0, 1, 1] = 1000.0
            self.conv1.bias[0] = 0.0
            self.conv1.bias[1] = 50.0  # channel 1 always saturated: degenerate, 0 bits
            self.conv1.weight[1] = 0.0

    def forward(self, x):
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.head(y.mean(dim=(2, 3)))


def test_relu6_entropies_agree_between_prune_and_surgery():
    net = _Relu6Net().eval()
    x = np.sign(np.random.default_rng(0).standard_normal((32, 2, 6, 6))).astype(np.float32)
    torch_stats = measure_entropy(net, make_loader(TensorDataset(torch.from_numpy(x), torch.zeros(32).long()), 16))
    res = optimize(export_module(net, (1, 2, 6, 6), dynamic=True), x, None, SurgeryOptions(strip_activations=False))
    onnx_h = {a["module"]: a["entropy"] for a in res.report["activations"]}
    assert set(torch_stats) == {"act1", "act2"} <= set(onnx_h)
    for name, s in torch_stats.items():
        assert onnx_h[name] == pytest.approx(s.entropy, abs=1e-4), name
    split = next(s for s in res.stats.values() if res.report["activations"][0]["node"] == s.node)
    h = split.channel_entropy()
    assert h[0] == pytest.approx(float(torch_stats["act1"].channel_entropy[0]), abs=1e-6) and h[0] > 0.9
    assert h[1] == 0.0  # always saturated


def test_entropy_of_three_regions_and_degenerate_channels():
    counts = np.array([[5, 0, 5], [0, 10, 0], [2, 4, 4], [0, 0, 0]])
    h = region_entropy_bits(counts)
    assert h[0] == pytest.approx(1.0) and h[1] == 0.0 and h[3] == 0.0
    assert h[2] == pytest.approx(-(0.2 * np.log2(0.2) + 2 * 0.4 * np.log2(0.4)))
    assert layer_entropy(counts) == pytest.approx((h[0] + h[2]) / 2)  # the one-region rows do not count
    assert layer_entropy(np.array([[3, 0], [0, 3]])) == 0.0


def test_relative_error_is_max_abs_over_max_reference():
    assert relative_error(np.array([1.0, 2.0]), np.array([1.0, 4.0]))[2] == pytest.approx(0.5)
    assert relative_error(np.array([0.25]), np.zeros(1))[2] == 0.25  # zero reference: absolute error
    assert relative_error(np.array([np.nan]), np.ones(1))[2] == float("inf")
    with pytest.raises(ValueError):
        relative_error(np.zeros(2), np.zeros(3))
