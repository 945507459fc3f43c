"""Property-based: random small Conv/Relu/Add/Gemm graphs with random layers and channels zeroed
come out of the surgery valid (full checker) and equivalent on the data they were measured on."""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egp_deploy.surgery import SurgeryOptions, optimize
from test_surgery_helpers import export_module, outputs, rel_error

TOL = 1e-5


class RandomNet(nn.Module):
    """stem conv, then blocks of (conv or depthwise conv, [relu], conv) with or without a residual add, then a head."""

    def __init__(self, spec: dict) -> None:
        super().__init__()
        c = spec["width"]
        self.stem = nn.Conv2d(spec["cin"], c, 3, padding=1)
        self.blocks = nn.ModuleList()
        self.kinds = []
        for k1, k2, relu_mid, residual, depthwise in spec["blocks"]:
            first = nn.Conv2d(c, c, k1, padding=k1 // 2, groups=c if depthwise else 1)
            self.blocks.append(nn.ModuleList([first, nn.Conv2d(c, c, k2, padding=k2 // 2)]))
            self.kinds.append((relu_mid, residual))
        self.gemm_head = spec["gemm_head"]
        self.head = nn.Linear(c, 5) if self.gemm_head else nn.Conv2d(c, 3, 1)
        self.extra = nn.Linear(5, 4) if self.gemm_head and spec["two_gemms"] else None

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for (a, b), (relu_mid, residual) in zip(self.blocks, self.kinds):
            y = a(x)
            if relu_mid:
                y = torch.relu(y)
            y = b(y)
            x = torch.relu(y + x) if residual else torch.relu(y)
        if self.gemm_head:
            x = self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
            return self.extra(x) if self.extra is not None else x
        return self.head(x)


block = st.tuples(st.sampled_from([1, 3]), st.sampled_from([1, 3]), st.booleans(), st.booleans(), st.booleans())
specs = st.fixed_dictionaries({
    "cin": st.integers(1, 3), "width": st.integers(2, 6), "blocks": st.lists(block, min_size=1, max_size=3),
    "gemm_head": st.booleans(), "two_gemms": st.booleans(),
    "zero_layers": st.lists(st.integers(0, 20), max_size=3), "zero_rows": st.lists(st.integers(0, 200), max_size=8),
    "zero_cols": st.lists(st.integers(0, 200), max_size=4), "bias_shift": st.floats(-1.5, 1.5),
    "sparsity": st.sampled_from([0.0, 0.5, 0.9]), "seed": st.integers(0, 2**16), "dynamic": st.booleans(),
})


def _build(spec: dict) -> nn.Module:
    torch.manual_seed(spec["seed"])
    net = RandomNet(spec).eval()
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    g = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():
        for m in layers:
            m.bias.add_(spec["bias_shift"] * torch.rand(m.bias.shape, generator=g))
            if spec["sparsity"]:
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) >= spec["sparsity"])
        for i in spec["zero_layers"]:
            layers[i % len(layers)].weight.zero_()
        for i in spec["zero_rows"]:
            m = layers[i % len(layers)]
            m.weight[(i // len(layers)) % m.weight.shape[0]] = 0.0
        for i in spec["zero_cols"]:
            m = layers[i % len(layers)]
            m.weight[:, (i // len(layers)) % m.weight.shape[1]] = 0.0
    return net


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs)
def test_random_graphs_survive_surgery(spec):
    shape = (1, spec["cin"], 6, 6)
    model = export_module(_build(spec), shape, dynamic=spec["dynamic"])
    rng = np.random.default_rng(spec["seed"])
    cal = rng.standard_normal((6,) + shape[1:]).astype(np.float32)
    held = rng.standard_normal((4,) + shape[1:]).astype(np.float32)
    res = optimize(model, cal, held, SurgeryOptions(batch_size=1 if not spec["dynamic"] else 8))
    onnx.checker.check_model(res.model, full_check=True)
    assert rel_error(outputs(model, cal), outputs(res.model, cal)) <= TOL
    if not res.report["changes"]["stripped"]:
        assert rel_error(outputs(model, held), outputs(res.model, held)) <= TOL
    after, before = res.report["after"], res.report["before"]
    assert after["conv_gemm_layers"] <= before["conv_gemm_layers"]
    assert after["macs_dense"] <= before["macs_dense"]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs)
def test_exact_passes_alone_match_everywhere(spec):
    """Without data-dependent strips every rewrite is exact: held-out data must match too."""
    shape = (1, spec["cin"], 6, 6)
    model = export_module(_build(spec), shape, dynamic=True)
    rng = np.random.default_rng(spec["seed"] + 1)
    cal = rng.standard_normal((4,) + shape[1:]).astype(np.float32)
    held = (3 * rng.standard_normal((4,) + shape[1:])).astype(np.float32)
    res = optimize(model, cal, held, SurgeryOptions(strip_activations=False))
    assert rel_error(outputs(model, held), outputs(res.model, held)) <= TOL
