"""Shared builders for the surgery tests (no tests here): tiny exported modules, pass runners."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
import torch.nn as nn

from egp_deploy.numeric import relative_error
from egp_deploy.surgery.cleanup import to_model
from egp_deploy.surgery.verify import run_model


def export_module(module: nn.Module, shape: tuple[int, ...], dynamic: bool = False) -> onnx.ModelProto:
    module = module.eval()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, torch.randn(*shape), f, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "N"}, "y": {0: "N"}} if dynamic else None,
        )
    return onnx.load_from_string(f.getvalue())


def graph_of(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(onnx.shape_inference.infer_shapes(model, data_prop=True))


def apply(model: onnx.ModelProto, fn) -> tuple[onnx.ModelProto, object]:
    """Run one pass ``fn(graph)`` and return the checker-clean model and the pass's own result."""
    graph = graph_of(model)
    out = fn(graph)
    return to_model(graph, model, check=True), out


def outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return run_model(model, x)[0]


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |b - a| / max |a| (egp_deploy.numeric, the one definition)."""
    return relative_error(b, a)[2]


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def randn(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


class ConvBnRelu(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return module


def cancelling_pair(eps: float, c: int = 16) -> nn.Module:
    """3x3 conv whose channel pairs nearly agree (weights ~100), then a 1x1 conv taking their differences:
    the output is ~1e4 x smaller than the intermediate map, so fp32 round-off dominates it."""
    torch.manual_seed(0)
    a, b = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.Conv2d(c, c, 1, bias=False)
    with torch.no_grad():
        base = torch.randn(c // 2, c, 3, 3) * 100
        a.weight.copy_(torch.cat([base, base + eps * torch.randn_like(base)]))
        eye = torch.eye(c // 2)
        b.weight.copy_(torch.cat([eye, -eye], 1)[:, :, None, None].repeat(2, 1, 1, 1))
    return nn.Sequential(a, b)
