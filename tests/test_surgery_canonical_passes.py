"""The six small passes on their own, each on a hand-built graph: what they rewrite, what they must
leave alone, and that the rewritten graph computes the same."""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from egp_deploy.surgery.activation_stats import measure_activation_stats
from egp_deploy.surgery.canonicalize import (
    fold_affine, remove_identities, remove_neutral_elementwise, shrink_broadcast_constants,
)
from egp_deploy.surgery.cleanup import refresh_shapes, to_model
from egp_deploy.surgery.constant_offsets import merge_constant_adds
from egp_deploy.surgery.dead_channels import eliminate_dead_channels
from egp_deploy.surgery.pipeline import name_nodes
from egp_deploy.surgery.strip_activations import PIN_TAG, strip_activations, unpin_survivors
from test_surgery_helpers import apply, graph_of, export_module, ops, outputs, randn, rel_error

TOL = 1e-5


def _init(name, arr, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(arr, dtype), name)


def _model(nodes, inits, in_shape, out_shape, extra_outputs=()):
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)]
    outs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in extra_outputs]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)], outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _same(model, out, shape):
    x = randn(*shape)
    return rel_error(outputs(model, x), outputs(out, x)) <= TOL


# ---------------------------------------------------------------- fold_affine
def test_fold_affine_takes_per_channel_mul_add_sub_div_into_the_conv():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c", "s"], ["m"], name="mul"),
             helper.make_node("Add", ["t", "m"], ["a"], name="add"),  # constant first: still an offset
             helper.make_node("Sub", ["a", "t"], ["d"], name="sub"),
             helper.make_node("Div", ["d", "s"], ["y"], name="div")]
    inits = [_init("w", rng.standard_normal((4, 3, 3, 3))), _init("b", rng.standard_normal(4)),
             _init("s", rng.random((1, 4, 1, 1)) + 0.5), _init("t", rng.standard_normal((4, 1, 1)))]
    model = _model(nodes, inits, [2, 3, 6, 6], [2, 4, 6, 6])
    out, recs = apply(model, fold_affine)
    assert ops(out) == ["Conv"]
    assert [r["op"] for r in recs] == ["Mul", "Add", "Sub", "Div"] and {r["into"] for r in recs} == {"conv"}
    assert _same(model, out, (2, 3, 6, 6))


def test_fold_affine_leaves_what_is_not_a_per_channel_map_of_a_single_reader():
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Div", ["s", "c"], ["q"], name="reciprocal"),  # s / conv: not affine in conv
             helper.make_node("Conv", ["q", "w2"], ["c2"], name="conv2"),
             helper.make_node("Mul", ["c2", "full"], ["m"], name="spatial_mul"),  # varies over H, W
             helper.make_node("Conv", ["m", "w3"], ["c3"], name="conv3"),
             helper.make_node("Add", ["c3", "s"], ["y"], name="add_shared"),
             helper.make_node("Relu", ["c3"], ["r"], name="second_reader")]  # conv3 is read twice
    inits = [_init("w", rng.standard_normal((4, 3, 1, 1))), _init("w2", rng.standard_normal((4, 4, 1, 1))),
             _init("w3", rng.standard_normal((4, 4, 1, 1))), _init("s", rng.random((1, 4, 1, 1)) + 2.0),
             _init("full", rng.standard_normal((1, 4, 5, 5)))]
    model = _model(nodes, inits, [1, 3, 5, 5], [1, 4, 5, 5], extra_outputs=[("r", [1, 4, 5, 5])])
    out, recs = apply(model, fold_affine)
    assert recs == []
    assert ops(out) == ops(model)


def test_fold_affine_folds_batchnorm_into_gemm():
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], name="fc", transB=1),
             helper.make_node("BatchNormalization", ["g", "s", "beta", "mu", "var"], ["y"], name="bn")]
    inits = [_init("w", rng.standard_normal((5, 3))), _init("b", rng.standard_normal(5)),
             _init("s", rng.random(5) + 0.5), _init("beta", rng.standard_normal(5)),
             _init("mu", rng.standard_normal(5)), _init("var", rng.random(5) + 0.5)]
    model = _model(nodes, inits, [4, 3], [4, 5])
    out, recs = apply(model, fold_affine)
    assert ops(out) == ["Gemm"] and recs[0]["op"] == "BatchNormalization"
    assert _same(model, out, (4, 3))


# ---------------------------------------------------------------- remove_neutral_elementwise
def test_neutral_elementwise_ops_go_unless_they_broadcast_or_reorder():
    nodes = [helper.make_node("Mul", ["x", "one"], ["a"], name="times_one"),
             helper.make_node("Add", ["zero", "a"], ["b"], name="plus_zero"),
             helper.make_node("Sub", ["zero", "b"], ["c"], name="zero_minus"),  # -x: not neutral
             helper.make_node("Div", ["c", "one"], ["d"], name="by_one"),
             helper.make_node("Add", ["d", "wide_zero"], ["y"], name="widening")]  # (3,4) + (2,3,4)
    inits = [_init("one", np.ones(1)), _init("zero", np.zeros(1)), _init("wide_zero", np.zeros((2, 3, 4)))]
    model = _model(nodes, inits, [3, 4], [2, 3, 4])
    out, removed = apply(model, remove_neutral_elementwise)
    assert sorted(removed) == ["by_one", "plus_zero", "times_one"]
    assert ops(out) == ["Sub", "Add"]
    assert _same(model, out, (3, 4))


def test_neutral_op_on_float64_is_removed():
    """The constant's dtype is compared with the live operand's (here both float64)."""
    nodes = [helper.make_node("Mul", ["x", "one_d"], ["m"], name="double_one"),
             helper.make_node("Cast", ["m"], ["y"], name="back", to=TensorProto.FLOAT)]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
                          [_init("one_d", np.ones(1), np.float64)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out, removed = apply(model, remove_neutral_elementwise)
    assert removed == ["double_one"] and ops(out) == ["Cast"]  # same dtype (float64): removed


# ---------------------------------------------------------------- shrink_broadcast_constants
def test_uniform_constant_shrinks_to_size_one_axes_and_stays_exact():
    c = np.broadcast_to(np.arange(4, dtype=np.float32).reshape(1, 4, 1, 1), (1, 4, 5, 5))
    varying = np.random.default_rng(3).standard_normal((1, 4, 5, 5))
    nodes = [helper.make_node("Add", ["x", "uniform"], ["a"], name="add_uniform"),
             helper.make_node("Mul", ["a", "varying"], ["y"], name="mul_varying")]
    model = _model(nodes, [_init("uniform", c), _init("varying", varying)], [1, 4, 5, 5], [1, 4, 5, 5])
    out, shrunk = apply(model, shrink_broadcast_constants)
    assert shrunk == ["add_uniform"]
    dims = {i.name: list(i.dims) for i in out.graph.initializer}
    assert [d for n, d in dims.items() if n.startswith("uniform")] == [[1, 4, 1, 1]]
    assert dims["varying"] == [1, 4, 5, 5]
    assert _same(model, out, (1, 4, 5, 5))


def test_constant_that_sets_the_output_shape_is_not_shrunk():
    """x (1, 4, 1, 1) + c (1, 4, 5, 5): the constant's extent is the output's; shrinking it would change it."""
    c = np.ones((1, 4, 5, 5), np.float32)
    model = _model([helper.make_node("Add", ["x", "c"], ["y"], name="add")], [_init("c", c)],
                   [1, 4, 1, 1], [1, 4, 5, 5])
    out, shrunk = apply(model, shrink_broadcast_constants)
    assert shrunk == [] and [list(i.dims) for i in out.graph.initializer] == [[1, 4, 5, 5]]


# ---------------------------------------------------------------- merge_constant_adds
def test_consecutive_constant_adds_become_one():
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Add", ["x", "a"], ["s"], name="inner"),
             helper.make_node("Add", ["b", "s"], ["y"], name="outer")]
    model = _model(nodes, [_init("a", rng.standard_normal((4, 1, 1))), _init("b", rng.standard_normal((1, 4, 1, 1)))],
                   [2, 4, 3, 3], [2, 4, 3, 3])
    out, done = apply(model, merge_constant_adds)
    assert done == [{"node": "outer", "absorbed": "inner"}] and ops(out) == ["Add"]
    assert _same(model, out, (2, 4, 3, 3))


def test_constant_adds_stay_apart_when_the_inner_sum_is_read_or_would_broadcast():
    rng = np.random.default_rng(5)
    read_twice = [helper.make_node("Add", ["x", "a"], ["s"], name="inner"),
                  helper.make_node("Add", ["s", "a"], ["y"], name="outer")]
    model = _model(read_twice, [_init("a", rng.standard_normal((4, 1, 1)))], [2, 4, 3, 3], [2, 4, 3, 3],
                   extra_outputs=[("s", [2, 4, 3, 3])])
    assert apply(model, merge_constant_adds)[1] == []
    widening = [helper.make_node("Add", ["x", "a"], ["s"], name="inner"),
                helper.make_node("Add", ["s", "wide"], ["y"], name="outer")]  # (4,) + (3, 4): the sum widens x
    model = _model(widening, [_init("a", rng.standard_normal(4)), _init("wide", rng.standard_normal((3, 4)))],
                   [1, 4], [3, 4])
    out, done = apply(model, merge_constant_adds)
    assert done == [] and ops(out) == ["Add", "Add"]


# ---------------------------------------------------------------- remove_identities
def test_identity_dropout_zero_pad_and_whole_slice_are_bypassed():
    nodes = [helper.make_node("Identity", ["x"], ["a"], name="id"),
             helper.make_node("Dropout", ["a"], ["b"], name="drop"),
             helper.make_node("Pad", ["b", "zeros"], ["c"], name="pad0"),
             helper.make_node("Slice", ["c", "st", "en"], ["d"], name="whole"),
             helper.make_node("Relu", ["d"], ["y"], name="relu")]
    inits = [_init("zeros", np.zeros(8), np.int64), _init("st", [0, 0], np.int64),
             _init("en", [np.iinfo(np.int64).max, 6], np.int64)]
    model = _model(nodes, inits, [2, 3, 5, 6], [2, 3, 5, 6])
    out, removed = apply(model, remove_identities)
    assert sorted(removed) == ["drop", "id", "pad0", "whole"] and ops(out) == ["Relu"]
    assert _same(model, out, (2, 3, 5, 6))


def test_dropout_with_a_read_mask_and_real_pads_and_slices_stay():
    nodes = [helper.make_node("Dropout", ["x"], ["a", "mask"], name="drop_mask"),
             helper.make_node("Pad", ["a", "pads"], ["b"], name="pad1"),
             helper.make_node("Slice", ["b", "st", "en", "ax"], ["y"], name="crop")]
    inits = [_init("pads", [0, 0, 1, 1, 0, 0, 1, 1], np.int64), _init("st", [1], np.int64),
             _init("en", [5], np.int64), _init("ax", [3], np.int64)]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6, 4]),
                           helper.make_tensor_value_info("mask", TensorProto.BOOL, [1, 2, 4, 4])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out, removed = apply(model, remove_identities)
    assert removed == [] and ops(out) == ["Dropout", "Pad", "Slice"]


# ---------------------------------------------------------------- unpin_survivors
class _TwoConv(nn.Module):
    def __init__(self, c: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.relu, self.conv2 = nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, 2, 1)

    def forward(self, x):
        return self.conv2(self.relu(self.conv1(x)))


def _pinned(bias):
    m = _TwoConv(c=len(bias))
    with torch.no_grad():
        m.conv1.bias[:] = torch.tensor(bias)
        m.conv1.weight.mul_(0.01)
    model = name_nodes(export_module(m, (1, 3, 5, 5), dynamic=True))
    x = randn(8, 3, 5, 5)
    stats, ref = measure_activation_stats(model, x)
    return model, x, stats, ref


def test_unpin_drops_pins_nothing_eliminated_and_restores_the_activation():
    model, x, stats, ref = _pinned([-50.0, 0.0, 0.0, 0.0])  # channel 0 always OFF: pinned to 0
    out, recs = apply(model, lambda g: (r := strip_activations(g, stats), unpin_survivors(g, r))[1])
    assert recs == []  # no dead-channel pass ran: the pinned channel is still there, so nothing to report
    assert not any(PIN_TAG in n.name for n in out.graph.node)
    assert "Relu" in ops(out) and "Mul" not in ops(out)
    assert rel_error(ref[0], outputs(out, x)) <= TOL


def test_unpin_reports_the_channels_dead_channel_elimination_removed():
    model, x, stats, ref = _pinned([-50.0, -50.0, 0.0, 0.0])  # channels 0, 1 always OFF
    other = {"node": "elsewhere", "action": "removed (always linear)"}

    g = graph_of(model)
    pinned = strip_activations(g, stats)
    assert [r["pinned"] for r in pinned] == [2]
    g = refresh_shapes(g, model)  # as the pipeline does: elimination reads the channel counts
    assert eliminate_dead_channels(g, channel_multiple=1)  # takes the two pinned (constant 0) channels out
    kept = unpin_survivors(g, pinned + [other])
    out = to_model(g, model)
    assert [r.get("pinned") for r in kept] == [2, None] and kept[1] is other
    assert kept[0]["action"] == "2 always-constant channels eliminated"
    assert not any(PIN_TAG in n.name for n in out.graph.node)
    assert rel_error(ref[0], outputs(out, x)) <= TOL
