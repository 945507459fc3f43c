"""Block builders for the channel tests (no tests here): a ShuffleNetV2-style split/shuffle unit and
a ResNeXt/RegNet-style grouped bottleneck, exported with either torch exporter."""

from __future__ import annotations

import io
import warnings

import onnx
import torch
import torch.nn as nn


def export(net: nn.Module, shape: tuple[int, ...], dynamo: bool, dynamic_batch: bool = False) -> onnx.ModelProto:
    """``dynamo=False``: the legacy exporter, opset 17; ``dynamo=True``: opset 18, optimised."""
    net = net.eval()
    x = torch.randn(*shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            prog = torch.onnx.export(net, (x,), dynamo=True, opset_version=18, input_names=["x"],
                                     output_names=["y"], verbose=False,
                                     dynamic_shapes=({0: torch.export.Dim("N")},) if dynamic_batch else None)
            prog.optimize()
            return prog.model_proto
        f = io.BytesIO()
        torch.onnx.export(net, x, f, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}} if dynamic_batch else None)
    return onnx.load_from_string(f.getvalue())


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """stem 3x3 conv + ReLU -> ShuffleNetV2 stride-1 unit (split in two halves; the second through
    1x1-BN-ReLU, depthwise 3x3-BN, 1x1-BN-ReLU; concat; channel shuffle) -> 1x1 head conv -> mean."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        h = c // 2
        self.stem, self.stem_act = nn.Conv2d(3, c, 3, padding=1), nn.ReLU()
        self.branch = nn.Sequential(nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
                                    nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h),
                                    nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU())
        self.head = nn.Conv2d(c, 8, 1)

    def forward(self, x):
        x = self.stem_act(self.stem(x))
        a, b = x.chunk(2, dim=1)
        y = channel_shuffle(torch.cat([a, self.branch(b)], 1))
        return self.head(y).mean((2, 3))


class GroupedBottleneck(nn.Module):
    """stem 3x3 conv + ReLU -> ResNeXt bottleneck (1x1-BN-ReLU, grouped 3x3-BN-ReLU with ``groups``
    groups, 1x1-BN, + x, ReLU) -> mean."""

    def __init__(self, c: int = 32, groups: int = 4) -> None:
        super().__init__()
        self.stem, self.stem_act = nn.Conv2d(3, c, 3, padding=1), nn.ReLU()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.stem_act(self.stem(x))
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + x).mean((2, 3))


class Fire(nn.Module):
    """SqueezeNet's fire module: squeeze 1x1 -> ReLU -> expand 1x1 and expand 3x3 (padded) -> concat ->
    ReLU -> mean. ``linear_squeeze``: the squeeze's bias keeps its ReLU ON for any input here, so the
    surgery strips it and the squeeze is one linear layer read by two convs."""

    def __init__(self, c: int = 16, s: int = 4, e: int = 8, linear_squeeze: bool = True) -> None:
        super().__init__()
        self.squeeze, self.act = nn.Conv2d(c, s, 1), nn.ReLU()
        self.expand1, self.expand3 = nn.Conv2d(s, e, 1), nn.Conv2d(s, e, 3, padding=1)
        self.out = nn.ReLU()
        if linear_squeeze:
            with torch.no_grad():
                self.squeeze.bias.fill_(50.0)

    def forward(self, x):
        y = self.act(self.squeeze(x))
        return self.out(torch.cat([self.expand1(y), self.expand3(y)], 1)).mean((2, 3))


class SharedHeads(nn.Module):
    """Linear (8 -> 16) -> ReLU (ON for any input here) -> two 16 -> 2 heads, summed."""

    def __init__(self) -> None:
        super().__init__()
        self.shared, self.act = nn.Linear(8, 16), nn.ReLU()
        self.head_a, self.head_b = nn.Linear(16, 2), nn.Linear(16, 2)
        with torch.no_grad():
            self.shared.bias.fill_(50.0)

    def forward(self, x):
        y = self.act(self.shared(x))
        return self.head_a(y) * self.head_b(y)
