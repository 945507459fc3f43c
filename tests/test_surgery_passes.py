"""Each surgery pass on a tiny hand-built graph: structure changes as intended, numbers do not."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from egp_deploy.errors import VerificationError
from egp_deploy.surgery import SurgeryOptions, optimize
from egp_deploy.surgery.activation_stats import measure_activation_stats
from egp_deploy.surgery.canonicalize import canonicalize
from egp_deploy.surgery.dead_channels import constant_layers_to_constants, eliminate_dead_channels
from egp_deploy.surgery.merge_linear import merge_linear
from egp_deploy.surgery.pipeline import name_nodes
from egp_deploy.surgery.strip_activations import strip_activations
from egp_deploy.surgery.verify import compare, fp32_noise_floor, run_model
from test_surgery_helpers import apply, cancelling_pair, export_module, ops, outputs, randn, randomize_bn, rel_error

TOL = 1e-5


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, np.float32), name)


def _model(nodes, inits, in_shape, out_shape, opset=17):
    g = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


# ---------------------------------------------------------------- canonicalize
def test_canonicalize_folds_bn_identity_dropout_and_neutral_ops():
    rng = np.random.default_rng(0)
    c = 4
    nodes = [
        helper.make_node("Identity", ["x"], ["x1"], name="id"),
        helper.make_node("Add", ["x1", "zero"], ["a"], name="add0"),  # not after a layer: just neutral
        helper.make_node("Mul", ["one", "a"], ["a1"], name="mul1"),
        helper.make_node("Conv", ["a1", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"], name="bn", epsilon=1e-3),
        helper.make_node("Dropout", ["bn"], ["y"], name="drop"),
    ]
    inits = [_init("w", rng.standard_normal((c, 3, 3, 3))), _init("g", rng.random(c) + 0.5),
             _init("b", rng.standard_normal(c)), _init("m", rng.standard_normal(c) * 0.1),
             _init("v", rng.random(c) + 0.5), _init("zero", np.zeros((3, 1, 1))), _init("one", np.ones(1))]
    model = _model(nodes, inits, [2, 3, 8, 8], [2, c, 8, 8])
    out, done = apply(model, canonicalize)
    assert ops(out) == ["Conv"]
    assert done["identities_removed"] and done["affine_folded"] and done["neutral_removed"]
    x = randn(2, 3, 8, 8)
    assert rel_error(outputs(model, x), outputs(out, x)) <= TOL


def test_canonicalize_folds_bn_into_gemm_and_keeps_broadcasting_add():
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Gemm", ["x", "w", "bias"], ["g"], name="fc", transB=1, alpha=0.5),
        helper.make_node("BatchNormalization", ["g", "s", "b", "m", "v"], ["bn"], name="bn"),
        helper.make_node("Add", ["bn", "zeros"], ["y"], name="widening_add"),  # (3,5) + (2,3,5): not neutral
    ]
    inits = [_init("w", rng.standard_normal((5, 6))), _init("bias", rng.standard_normal(5)),
             _init("s", rng.random(5) + 0.5), _init("b", rng.standard_normal(5)), _init("m", rng.standard_normal(5)),
             _init("v", rng.random(5) + 0.5), _init("zeros", np.zeros((2, 3, 5)))]
    model = _model(nodes, inits, [3, 6], [2, 3, 5])
    out, _ = apply(model, canonicalize)
    assert ops(out) == ["Gemm", "Add"]
    x = randn(3, 6)
    assert rel_error(outputs(model, x), outputs(out, x)) <= TOL


# ---------------------------------------------------------------- activation statistics
def test_activation_stats_counts_regions_per_channel():
    # A zero-weight conv outputs its bias: each channel sits in one known region.
    bias = np.array([-1.0, 0.0, 2.0, 7.0], np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Clip", ["c", "lo", "hi"], ["k"], name="relu6"),
        helper.make_node("LeakyRelu", ["c"], ["l"], name="leaky", alpha=0.1),
        helper.make_node("Sum", ["r", "k", "l"], ["y"], name="sum"),
    ]
    inits = [_init("w", np.zeros((4, 2, 1, 1))), _init("b", bias), _init("lo", np.array(0.0)), _init("hi", np.array(6.0))]
    model = _model(nodes, inits, ["N", 2, 3, 3], ["N", 4, 3, 3])
    stats, ref = measure_activation_stats(model, randn(5, 2, 3, 3), batch_size=2)
    assert ref[0].shape == (5, 4, 3, 3)
    relu, clip, leaky = stats["relu"], stats["relu6"], stats["leaky"]
    assert relu.total == 5 * 9
    assert list(relu.channel_states()) == ["off", "off", "lin", "lin"]  # exact zero counts as OFF
    assert list(clip.channel_states()) == ["off", "off", "lin", "sat"]
    assert list(leaky.channel_states()) == ["neg", "neg", "lin", "lin"]
    assert relu.zero_entropy and relu.layer_entropy == 0.0


def test_activation_stats_entropy_of_live_channels():
    model = export_module(nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU()), (1, 2, 4, 4), dynamic=True)
    stats, _ = measure_activation_stats(name_nodes(model), randn(16, 2, 4, 4))
    (st,) = stats.values()
    p = st.on_probability
    assert np.all((p > 0) & (p < 1))
    h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    assert st.layer_entropy == pytest.approx(float(h.mean()))


# ---------------------------------------------------------------- strip activations
class _TwoConv(nn.Module):
    def __init__(self, c=6, act=None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.act = act or nn.ReLU()
        self.conv2 = nn.Conv2d(c, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x)))


def test_strip_deletes_always_on_relu_and_verifies():
    m = _TwoConv()
    with torch.no_grad():
        m.conv1.weight.mul_(0.01)
        m.conv1.bias.fill_(5.0)  # always ON
    model = export_module(m, (1, 3, 8, 8), dynamic=True)
    x, held = randn(32, 3, 8, 8), randn(16, 3, 8, 8, seed=1)
    res = optimize(model, x, held)
    assert "Relu" not in ops(res.model)
    assert res.report["changes"]["stripped"][0]["action"].startswith("removed")
    assert res.report["verification"]["calibration"]["rel_error"] <= TOL
    assert res.report["verification"]["data_dependent"]["held_out"]["top1_agreement"] is None  # not a classifier


def test_strip_pins_always_off_channels_and_they_disappear():
    m = _TwoConv(c=6)
    with torch.no_grad():
        m.conv1.bias[:3] = -50.0  # channels 0..2 always OFF; the others live
    model = export_module(m, (1, 3, 8, 8), dynamic=True)
    x = randn(32, 3, 8, 8)
    res = optimize(model, x, randn(16, 3, 8, 8, seed=1), SurgeryOptions(channel_multiple=1))
    w1 = [i for i in res.model.graph.initializer if i.dims and len(i.dims) == 4 and i.dims[1] == 3]
    assert w1 and w1[0].dims[0] == 3  # conv1 now has 3 output channels
    assert "Relu" in ops(res.model)  # the live channels still need it
    assert rel_error(outputs(model, x), outputs(res.model, x)) <= TOL


def test_strip_pass_alone_replaces_relu_by_mask():
    m = _TwoConv(c=2)
    with torch.no_grad():
        m.conv1.bias[:] = torch.tensor([-50.0, 50.0])
        m.conv1.weight.mul_(0.01)
    model = name_nodes(export_module(m, (1, 3, 5, 5), dynamic=True))
    x = randn(8, 3, 5, 5)
    stats, ref = measure_activation_stats(model, x)
    out, recs = apply(model, lambda g: strip_activations(g, stats))
    assert "Relu" not in ops(out) and "Mul" in ops(out)
    assert recs[0]["always"] == {"off": 1, "lin": 1, "mixed": 0}
    assert rel_error(ref[0], outputs(out, x)) <= TOL


# ---------------------------------------------------------------- dead channels
def test_dead_output_channels_are_removed_with_border_bias():
    m = _TwoConv(c=8)
    with torch.no_grad():
        m.conv1.weight[[1, 4, 5]] = 0.0
        m.conv1.bias[[1, 4, 5]] = torch.tensor([0.7, -0.3, 0.0])  # relu(0.7) = 0.7 reaches conv2's border
    model = export_module(m, (2, 3, 6, 6))
    out, recs = apply(model, eliminate_dead_channels)
    assert recs and recs[0]["channels_before"] == 8 and recs[0]["channels_after"] == 5
    assert "Add" in ops(out)  # the position-dependent border constant
    x = randn(2, 3, 6, 6)
    assert rel_error(outputs(model, x), outputs(out, x)) <= TOL


def test_unused_channels_are_removed_from_producer():
    m = _TwoConv(c=8)
    with torch.no_grad():
        m.conv2.weight[:, [0, 7]] = 0.0  # nobody reads channels 0 and 7
    model = export_module(m, (1, 3, 6, 6), dynamic=True)
    out, recs = apply(model, eliminate_dead_channels)
    assert recs[0]["unused"] == 2 and recs[0]["channels_after"] == 6
    x = randn(3, 3, 6, 6)
    assert rel_error(outputs(model, x), outputs(out, x)) <= TOL


def test_aligned_keep_rounds_up_with_dead_channels_and_never_empties():
    from egp_deploy.surgery.dead_channels import aligned_keep

    removable = np.zeros(32, bool)
    removable[[3, 9]] = True  # 30 live channels
    assert aligned_keep(removable, 8).all()  # 30 -> 32: nothing gained, nothing narrowed
    assert aligned_keep(removable, 1).sum() == 30
    removable[:20] = True  # 12 live -> 16, the first removable ones kept
    keep = aligned_keep(removable, 8)
    assert keep.sum() == 16 and keep[:4].all() and not keep[4:20].any()
    assert aligned_keep(np.ones(16, bool), 8).sum() == 1  # all dead: one channel carries the constant


def test_channel_multiple_keeps_narrowed_groups_aligned_and_exact():
    m = _TwoConv(c=16)
    with torch.no_grad():
        m.conv2.weight[:, [0, 5, 7]] = 0.0  # 13 channels read
    model = export_module(m, (1, 3, 6, 6))
    _, recs = apply(model, eliminate_dead_channels)
    assert recs[0]["channels_after"] == 13
    out, recs = apply(model, lambda g: eliminate_dead_channels(g, channel_multiple=8))
    assert recs == []  # 13 rounds up to 16: the group stays as it is
    with torch.no_grad():
        m.conv2.weight[:, 8:14] = 0.0  # 7 read -> 8 kept
    model = export_module(m, (1, 3, 6, 6))
    out, recs = apply(model, lambda g: eliminate_dead_channels(g, channel_multiple=8))
    assert recs[0]["channels_after"] == 8
    x = randn(2, 3, 6, 6)
    assert rel_error(outputs(model, x), outputs(out, x)) <= TOL


class _Residual(nn.Module):
    def __init__(self, c=6):
        super().__init__()
        self.stem = nn.Conv2d(2, c, 3, padding=1)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Conv2d(c, 3, 1)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(s))) + s))


def test_residual_channel_goes_only_when_dead_in_every_producer():
    m = _Residual()
    with torch.no_grad():
        for conv in (m.stem, m.conv2):
            conv.weight[2] = 0.0
            conv.bias[2] = -1.0  # dead (constant) in both producers of the add
        m.stem.weight[4] = 0.0  # dead only in the skip: must stay
    model = export_module(m, (1, 2, 6, 6), dynamic=True)
    out, recs = apply(model, eliminate_dead_channels)
    trunk = [r for r in recs if "/stem/Conv" in r["producers"]]
    assert trunk and trunk[0]["channels_after"] == 5
    x = randn(3, 2, 6, 6)
    assert rel_error(outputs(model, x), outputs(out, x)) <= TOL


def test_constant_residual_branch_becomes_a_bias_add():
    m = _Residual()
    with torch.no_grad():
        m.conv1.weight.zero_()  # the whole branch is now a constant map
    model = export_module(m, (1, 2, 6, 6), dynamic=True)

    def run(g):
        recs = constant_layers_to_constants(g)
        from egp_deploy.surgery.canonicalize import fold_constants

        fold_constants(g)
        return recs

    out, recs = apply(model, run)
    assert recs and "/conv2/Conv" in recs[0]["folded_nodes"]
    assert ops(out).count("Conv") == 2  # stem + head
    x = randn(4, 2, 6, 6)
    assert rel_error(outputs(model, x), outputs(out, x)) <= TOL


def test_constant_layer_next_to_graph_output_is_left_alone():
    m = nn.Sequential(nn.Conv2d(2, 3, 1))
    with torch.no_grad():
        m[0].weight.zero_()
    model = export_module(m, (1, 2, 4, 4), dynamic=True)
    out, recs = apply(model, constant_layers_to_constants)
    assert recs == [] and ops(out) == ["Conv"]


# ---------------------------------------------------------------- merges
def _merge(model, **kw):
    return apply(model, lambda g: merge_linear(g, **kw))


def test_gemm_chain_merges():
    m = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.Linear(4, 3))
    model = export_module(m, (2, 12), dynamic=True)
    out, recs = _merge(model)
    assert ops(out).count("Gemm") == 1 and recs[0]["kind"] == "gemm + gemm"
    x = randn(5, 12)
    assert rel_error(outputs(model, x), outputs(out, x)) <= TOL


@pytest.mark.parametrize("first,second", [((3, 1), (1, 0)), ((1, 0), (3, 1))])
def test_conv_chains_merge_exactly(first, second):
    m = nn.Sequential(nn.Conv2d(8, 8, first[0], padding=first[1]), nn.Conv2d(8, 2, second[0], padding=second[1]))
    model = export_module(m, (1, 8, 7, 7), dynamic=True)
    out, recs = _merge(model)
    assert ops(out).count("Conv") == 1, recs
    x = randn(3, 8, 7, 7)
    assert rel_error(outputs(model, x), outputs(out, x)) <= TOL


def test_depthwise_then_pointwise_merges_when_cost_allows():
    m = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 2, 1))
    model = export_module(m, (1, 4, 6, 6), dynamic=True)
    kept, recs = _merge(model)
    assert recs == [] and ops(kept).count("Conv") == 2  # 72 MACs/pos vs 44: refused at growth 1.0
    out, recs = _merge(model, max_mac_growth=2.0)
    assert ops(out).count("Conv") == 1
    x = randn(2, 4, 6, 6)
    assert rel_error(outputs(model, x), outputs(out, x)) <= TOL


def test_residual_identity_folds_into_conv():
    class R(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x) + x

    model = export_module(R(), (1, 4, 5, 5), dynamic=True)
    out, recs = _merge(model)
    assert ops(out) == ["Conv"] and recs[0]["kind"].startswith("residual")
    x = randn(2, 4, 5, 5)
    assert rel_error(outputs(model, x), outputs(out, x)) <= TOL


def test_inexact_merge_only_behind_flag_and_error_reported():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1))
    model = export_module(m, (1, 3, 8, 8), dynamic=True)
    x = randn(8, 3, 8, 8)
    exact = optimize(model, x, None)
    assert ops(exact.model).count("Conv") == 2
    res = optimize(model, x, randn(8, 3, 8, 8, seed=2),
                   SurgeryOptions(allow_inexact_merge=True, max_mac_growth=2.0, inexact_tolerance=1.0))
    assert ops(res.model).count("Conv") == 1
    v = res.report["verification"]
    assert v["inexact_merges"] and v["calibration"]["rel_error"] > 1e-5  # the border ring differs
    # above its tolerance the merge is dropped, not the surgery (tests/test_surgery_dropped_merges.py)
    tight = optimize(model, x, None, SurgeryOptions(allow_inexact_merge=True, max_mac_growth=2.0, inexact_tolerance=1e-6))
    assert ops(tight.model).count("Conv") == 2 and len(tight.report["changes"]["dropped_merges"]) == 1


# ---------------------------------------------------------------- verification
def test_compare_never_passes_nan_or_shape_change():
    y = np.ones((4, 3), np.float32)
    bad = y.copy()
    bad[0, 0] = np.nan
    r = compare([y], [bad])
    assert not r["finite"] and r["rel_error"] == float("inf")
    assert compare([y], [np.ones((4, 1), np.float32)])["problem"]
    assert compare([y], [y])["rel_error"] == 0.0 and compare([y], [y])["top1_agreement"] == 1.0


def _replace_merge(monkeypatch, fn):
    """Swap the registered merge pass for ``fn(graph) -> records`` (a deliberately wrong rewrite)."""
    import dataclasses

    from egp_deploy.surgery.changes import Change
    from egp_deploy.surgery.passes import REGISTRY

    wrong = dataclasses.replace(REGISTRY["merge_linear"], run=lambda g, ctx: [Change("merged", r) for r in fn(g)])
    monkeypatch.setitem(REGISTRY, "merge_linear", wrong)


def test_optimize_refuses_a_wrong_rewrite(monkeypatch):
    import egp_deploy.surgery.pipeline as pipeline

    def corrupting_merge(graph, *a, **k):
        for node in graph.nodes:
            if node.op == "Conv":
                node.inputs[1].values = node.inputs[1].values * 1.01
                return [{"kind": "x", "first": node.name, "second": node.name, "exact": True}]
        return []

    _replace_merge(monkeypatch, corrupting_merge)
    model = export_module(nn.Sequential(nn.Conv2d(2, 2, 1)), (1, 2, 3, 3), dynamic=True)
    with pytest.raises(VerificationError, match="calibration"):
        pipeline.optimize(model, randn(4, 2, 3, 3), None, SurgeryOptions(max_rounds=1))


def test_exact_merge_of_an_ill_conditioned_graph_is_judged_against_its_own_round_off():
    model = export_module(cancelling_pair(eps=1e-2), (1, 16, 12, 12), dynamic=True)
    x = randn(16, 16, 12, 12)
    floor = fp32_noise_floor(model, x, run_model(model, x))
    assert floor > 1e-5  # the unchanged graph, run by two kernels, already disagrees beyond the tolerance
    res = optimize(model, x, None, SurgeryOptions(tolerance=1e-5))
    v = res.report["verification"]
    assert ops(res.model) == ["Conv"] and v["requested_tolerance"] == 1e-5
    assert v["fp32_noise_floor"] >= floor * 0.5 and v["tolerance"] == pytest.approx(2 * v["fp32_noise_floor"])
    assert 1e-5 < v["calibration"]["rel_error"] <= v["tolerance"] and "round-off" in v["note"]


def test_well_conditioned_graph_keeps_the_requested_tolerance():
    model = export_module(cancelling_pair(eps=100.0), (1, 16, 12, 12), dynamic=True)
    x = randn(16, 16, 12, 12)
    assert fp32_noise_floor(model, x, run_model(model, x)) < 1e-6
    v = optimize(model, x, None).report["verification"]
    assert v["fp32_noise_floor"] is None and v["tolerance"] == 1e-5 and v["calibration"]["rel_error"] <= 1e-5


def test_a_wrong_rewrite_of_an_ill_conditioned_graph_is_still_refused(monkeypatch):
    import egp_deploy.surgery.pipeline as pipeline

    def corrupting_merge(graph, *a, **k):
        node = next(n for n in graph.nodes if n.op == "Conv")
        node.inputs[1].values = node.inputs[1].values * 1.05
        return [{"kind": "x", "first": node.name, "second": node.name, "exact": True}]

    _replace_merge(monkeypatch, corrupting_merge)
    model = export_module(cancelling_pair(eps=1e-2), (1, 16, 12, 12), dynamic=True)
    with pytest.raises(VerificationError, match="calibration"):
        pipeline.optimize(model, randn(16, 16, 12, 12), None, SurgeryOptions(max_rounds=1))


def test_static_batch_model_is_fed_in_its_batch():
    m = randomize_bn(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                   nn.Linear(4 * 16, 3)))
    model = export_module(m, (1, 1, 4, 4), dynamic=False)
    res = optimize(model, randn(5, 1, 4, 4), randn(3, 1, 4, 4, seed=1))
    assert res.report["verification"]["calibration"]["samples"] == 5
    assert res.report["verification"]["held_out"]["top1_agreement"] == 1.0


def test_always_linear_relu6_is_removed_and_module_names_come_from_metadata():
    m = _TwoConv(c=4, act=nn.ReLU6())
    with torch.no_grad():
        m.conv1.weight.mul_(0.01)
        m.conv1.bias.fill_(3.0)  # always inside (0, 6): linear
    model = export_module(m, (1, 3, 6, 6), dynamic=True)
    clip = next(n.name for n in model.graph.node if n.op_type == "Clip")
    entry = model.metadata_props.add()
    entry.key, entry.value = "egp.node_modules", json.dumps({clip: "features.act"})
    x = randn(16, 3, 6, 6)
    res = optimize(model, x, randn(8, 3, 6, 6, seed=3))
    assert "Clip" not in ops(res.model)
    (rec,) = res.report["changes"]["stripped"]
    assert rec["module"] == "features.act" and rec["always"]["lin"] == 4
    assert rel_error(outputs(model, x), outputs(res.model, x)) <= TOL
    assert {p.key for p in res.model.metadata_props} >= {"egp.node_modules"}


@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_chain_merges(with_bias):
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1")]
    src = "h"
    if with_bias:
        nodes.append(helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"))
        src = "hb"
    nodes.append(helper.make_node("MatMul", [src, "w2"], ["y"], name="mm2"))
    inits = [_init("w1", rng.standard_normal((6, 3))), _init("w2", rng.standard_normal((3, 5))),
             _init("b1", rng.standard_normal(3))]
    model = _model(nodes, inits if with_bias else inits[:2], ["N", 4, 6], ["N", 4, 5])
    out, recs = _merge(model)
    assert ops(out).count("MatMul") == 1 and recs[0]["kind"] == "matmul + matmul"
    x = randn(2, 4, 6)
    assert rel_error(outputs(model, x), outputs(out, x)) <= TOL
