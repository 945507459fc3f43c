"""Our onnxruntime runner against an independent one: Polygraphy's OnnxrtRunner on the same model."""

from __future__ import annotations

import numpy as np
import pytest
import torch.nn as nn

from egp_deploy.runners import get_runner, random_inputs, resolve_input_shapes
from test_surgery_helpers import export_module

polygraphy_onnxrt = pytest.importorskip("polygraphy.backend.onnxrt")


class TwoHeads(nn.Module):
    """Two outputs of different shapes: a mix-up of output order or names would show."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2))
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        h = self.body(x)
        return self.fc(h.flatten(1)), h.mean((2, 3))


def test_ort_runner_matches_polygraphy(tmp_path):
    import onnx

    path = tmp_path / "two_heads.onnx"
    onnx.save(export_module(TwoHeads().eval(), (1, 1, 8, 8), dynamic=True), path)
    runner = get_runner("ort-cpu", path, threads=1).load()
    try:
        specs = runner.input_specs()
        feeds = random_inputs(specs, resolve_input_shapes(specs, batch=3), seed=7)
        ours = runner.infer(feeds)
        names = runner.output_names()
    finally:
        runner.close()
    with polygraphy_onnxrt.OnnxrtRunner(polygraphy_onnxrt.SessionFromOnnx(str(path))) as oracle:
        theirs = oracle.infer(feeds)
    assert names == list(theirs.keys()) and len(names) == 2
    for name in names:
        assert ours[name].shape == theirs[name].shape
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, atol=1e-7)
