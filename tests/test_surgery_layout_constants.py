"""Constants fold through layout ops: a ConvNeXt block (depthwise conv, permute, LayerNorm, MLP, layer
scale, permute back, residual add) and an MLP-Mixer token-mixing MLP (transpose, MLP, transpose back)
with an all-zero first or second linear lose the whole residual branch exactly, with either torch
exporter, and the report claims no narrowed hidden units; a layout op that moves the batch axis stops
the fold (a batch-1 stand-in for the constant would be wrong there)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
import torch
import torch.nn as nn
from surgery_blocks import (
    ConvNeXtNet,
    MixerNet,
    assert_report_honest,
    collapsed,
    counts_from_both_exporters,
    export,
    layer_count,
)
from test_surgery_helpers import export_module, outputs, randn, rel_error

from egp_deploy.surgery import SurgeryOptions, optimize
from egp_deploy.surgery.constant_layers import _keeps_batch_axis

EXACT = SurgeryOptions(batch_size=8, strip_activations=False)
SHAPE = (1, 3, 32, 32)


# Layer counts an exact surgery can reach from surgery_blocks.collapsed(name), by hand:
# convnext: stem + 3 x (dwconv, pwconv1, pwconv2) + head = 11; blocks 0 and 2 add a constant to
#        their input, so their three layers go (the depthwise conv and the MLP read only each other):
#        11 - 6 = 5.
# mixer: stem + 2 x (token fc1, fc2, channel fc1, fc2) + head = 10; both token-mixing MLPs are
#        constant: 10 - 4 = 6 (the channel-mixing MLPs are live).
BLOCKS = {
    "convnext": (11, 5, {f"blocks.{b}.{m}" for b in (0, 2) for m in ("dwconv", "pwconv1", "pwconv2")}),
    "mixer": (10, 6, {f"blocks.{b}.token_fc{i}" for b in (0, 1) for i in (1, 2)}),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_collapsed_mlp_behind_layout_ops_folds_exactly(name):
    before, after, removed = BLOCKS[name]
    net = collapsed(name)
    model = export(net, SHAPE, dynamo=False)
    cal, held = randn(16, *SHAPE[1:]), randn(8, *SHAPE[1:], seed=1)
    res = optimize(model, cal, held, EXACT)
    assert (layer_count(model), layer_count(res.model)) == (before, after)
    assert set(res.report["layers_removed"]) == removed
    assert res.report["verification"]["held_out"]["rel_error"] <= 1e-5
    with torch.no_grad():
        assert rel_error(net(torch.from_numpy(held)).numpy(), outputs(res.model, held)) <= 1e-5
    # folded, not narrowed to one hidden unit
    assert res.report["summary"]["mlp_units_removed"] == 0 and res.report["changes"]["mlp_units"] == []
    assert len(res.report["changes"]["constant_layers"]) == 2
    assert_report_honest(model, res)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BLOCKS))
def test_both_exporters_reach_the_same_counts(name):
    before, after, _ = BLOCKS[name]
    counts = counts_from_both_exporters(name, SHAPE, randn(8, *SHAPE[1:]), EXACT, "mlp_units_removed")
    assert counts[0] == counts[1] == (before, after, before - after, 0)


@pytest.mark.parametrize("build", [ConvNeXtNet, MixerNet], ids=["convnext", "mixer"])
def test_dynamic_batch_collapsed_and_unpruned(build):
    """With a dynamic batch the constant's batch-1 stand-in goes through the transposes and meets the
    batch of 8 in the residual Add; unpruned, every layer stays and the MACs do not move."""
    x = randn(8, *SHAPE[1:])
    net = build().eval()
    model = export_module(net, (2,) + SHAPE[1:], dynamic=True)
    res = optimize(model, x, None, EXACT)
    assert layer_count(res.model) == layer_count(model)
    assert res.report["after"]["macs_dense"] == res.report["before"]["macs_dense"]
    assert rel_error(outputs(model, x), outputs(res.model, x)) <= 1e-6
    first = net.blocks[0]
    with torch.no_grad():
        (first.pwconv2 if build is ConvNeXtNet else first.token_fc2).weight.zero_()
    model = export_module(net, (2,) + SHAPE[1:], dynamic=True)
    res = optimize(model, x, None, EXACT)
    assert layer_count(model) - layer_count(res.model) == (3 if build is ConvNeXtNet else 2)
    assert rel_error(outputs(model, x), outputs(res.model, x)) <= 1e-5
    assert_report_honest(model, res)


class _FlatResidual(nn.Module):
    """A zero linear layer's output reshaped to (N*L, C) rows before the residual add: the Reshape
    merges the batch axis into the rows, where a batch-1 constant would have L rows, not N*L."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 8)
        with torch.no_grad():
            self.fc.weight.zero_()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(x.reshape(-1, 8) + self.fc(x).reshape(-1, 8))


def test_layout_op_merging_the_batch_axis_stops_the_fold():
    model = export_module(_FlatResidual().eval(), (2, 5, 8), dynamic=True)
    x = randn(8, 5, 8)
    res = optimize(model, x, None, EXACT)  # a wrong fold would not even run at batch 8
    assert rel_error(outputs(model, x), outputs(res.model, x)) <= 1e-6
    assert res.report["changes"]["constant_layers"] == []
    assert_report_honest(model, res)


def _layout(op: str, shape_in, shape_out, **attrs) -> gs.Node:
    inputs = [gs.Variable("x", np.float32, shape_in)]
    if "target" in attrs:
        inputs.append(gs.Constant("t", np.array(attrs.pop("target"), np.int64)))
    if "axes_input" in attrs:
        inputs.append(gs.Constant("a", np.array(attrs.pop("axes_input"), np.int64)))
    return gs.Node(op, attrs=attrs, inputs=inputs, outputs=[gs.Variable("y", np.float32, shape_out)])


@pytest.mark.parametrize("node, keeps", [
    (_layout("Transpose", ["N", 4, 5, 6], ["N", 5, 6, 4], perm=[0, 2, 3, 1]), True),
    (_layout("Transpose", ["N", 4, 5], [4, "N", 5], perm=[1, 0, 2]), False),
    (_layout("Flatten", ["N", 4, 5], ["N", 20], axis=1), True),
    (_layout("Flatten", ["N", 4, 5], [1, "M"], axis=0), False),
    (_layout("Unsqueeze", ["N", 4], ["N", 1, 4], axes_input=[1]), True),
    (_layout("Unsqueeze", ["N", 4], [1, "N", 4], axes_input=[0]), False),
    (_layout("Squeeze", ["N", 1, 4], ["N", 4], axes_input=[-2]), True),
    (_layout("Squeeze", [1, 1, 4], [4]), False),  # every unit dim, the batch's too
    (_layout("Reshape", ["N", 4, 5], ["N", 20], target=[-1, 20]), True),
    (_layout("Reshape", ["N", 4, 5], ["N", 2, 10], target=[0, 2, 10]), True),
    (_layout("Reshape", ["N", 4, 5], ["M", 5], target=[-1, 5]), False),
    (_layout("Reshape", [2, 4, 5], [2, 20], target=[2, 20]), False),  # a batch-1 stand-in cannot become 2
])
def test_which_layout_ops_keep_the_batch_axis(node, keeps):
    assert _keeps_batch_axis(node) is keeps


def _scaled_linear(scale: np.ndarray, second_reader: bool = False):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (rng.standard_normal((8, 6)).astype(np.float32), "w"), (rng.standard_normal(6).astype(np.float32), "b"),
        (scale, "g"))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc2"),
             helper.make_node("Add", ["h", "b"], ["hb"], name="fc2_bias"),
             helper.make_node("Mul", ["hb", "g"], ["y"], name="layer_scale")]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4, 6])]
    if second_reader:
        outs.append(helper.make_tensor_value_info("hb", TensorProto.FLOAT, [2, 3, 4, 6]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 8])], outs,
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("scale, second_reader, folds", [
    (np.linspace(0.5, 2.0, 6).astype(np.float32), False, True),  # ConvNeXt's gamma, per last-axis unit
    (np.full((1, 1, 1, 1), 3.0, np.float32), False, True),
    (np.linspace(0.5, 2.0, 6).astype(np.float32), True, False),  # the biased output is read elsewhere too
    (np.ones((1, 3, 1, 1), np.float32), False, False),  # not along the last axis
])
def test_layer_scale_folds_into_the_token_linear_layer(scale, second_reader, folds):
    from test_surgery_helpers import apply, ops

    from egp_deploy.surgery.canonicalize import fold_affine

    model = _scaled_linear(scale, second_reader)
    out, records = apply(model, fold_affine)
    assert ("Mul" not in ops(out)) is folds
    assert [r["into"] for r in records] == (["fc2"] if folds else [])
    x = randn(2, 3, 4, 8)
    np.testing.assert_allclose(outputs(out, x), outputs(model, x), rtol=1e-5, atol=1e-5)
