"""The chain merge planner (optimal against brute force) and the merges it plans: whole inverted
residuals, residual spans it may not cut, layers read from outside, Gemm chains; MobileNetV2 with
linear blocks through both exporters."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from egp_deploy.archs import create_model
from egp_deploy.surgery import SurgeryOptions, optimize
from egp_deploy.surgery.chain_merge import MacCost
from egp_deploy.surgery.chain_plan import plan_segments
from egp_deploy.surgery.merge_linear import merge_linear
from test_surgery_helpers import apply, export_module, ops, outputs, randn, rel_error

TOL = 1e-5


# ---------------------------------------------------------------- planner
def _segmentations(n: int):
    for cuts in itertools.product([False, True], repeat=n - 1):
        segs, start = [], 0
        for k, cut in enumerate(cuts, 1):
            if cut:
                segs.append((start, k - 1))
                start = k
        segs.append((start, n - 1))
        yield segs


@st.composite
def _chains(draw):
    n = draw(st.integers(1, 7))
    integers = draw(st.booleans())
    costs = {}
    for a in range(n):
        for b in range(a, n):
            allowed = a == b or draw(st.booleans())
            if allowed:
                costs[(a, b)] = draw(st.integers(0, 20)) if integers else draw(st.floats(0, 100, allow_nan=False))
    return n, costs


@settings(max_examples=300, deadline=None)
@given(_chains())
def test_planner_finds_the_optimum_of_all_segmentations(chain):
    n, costs = chain
    total, segs = plan_segments(n, costs)
    assert [a for a, _ in segs] == [0] + [b + 1 for _, b in segs[:-1]] and segs[-1][1] == n - 1
    assert total == pytest.approx(sum(costs[s] for s in segs))
    feasible = [s for s in _segmentations(n) if all(x in costs for x in s)]
    best = min(sum(costs[x] for x in s) for s in feasible)
    assert total == pytest.approx(best, rel=1e-12, abs=1e-12)
    if all(isinstance(c, int) for c in costs.values()):  # exact ties (float round-off can absorb a tiny cost)
        ties = [s for s in feasible if sum(costs[x] for x in s) == best]
        assert len(segs) == min(len(s) for s in ties)  # fewer layers at the same cost


def test_planner_takes_a_callable_and_needs_every_single_layer():
    assert plan_segments(3, lambda a, b: 1.0 if a == b else (0.5 if (a, b) == (0, 2) else None)) == (0.5, [(0, 2)])
    with pytest.raises(ValueError):
        plan_segments(2, {(0, 0): 1.0, (0, 1): 1.0})


# ---------------------------------------------------------------- merge kinds on tiny graphs
class LinearInvertedResidual(nn.Module):
    """MobileNetV2's block with its ReLU6s already gone: 1x1 expand, depthwise kxk, 1x1 project, + x."""

    def __init__(self, c: int = 4, t: int = 6, k: int = 3, residual: bool = True, bias: bool = True) -> None:
        super().__init__()
        h = c * t
        self.expand = nn.Conv2d(c, h, 1, bias=bias)
        self.dw = nn.Conv2d(h, h, k, padding=k // 2, groups=h, bias=bias)
        self.project = nn.Conv2d(h, c, 1, bias=bias)
        self.residual = residual

    def forward(self, x):
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.residual else y


def _merge(model, **kw):
    log: list = []
    out, recs = apply(model, lambda g: merge_linear(g, log=log, **kw))
    return out, recs, log


@pytest.mark.parametrize("bias", [False, True])
def test_whole_inverted_residual_becomes_one_dense_conv(bias):
    torch.manual_seed(0)
    model = export_module(LinearInvertedResidual(bias=bias), (1, 4, 7, 7), dynamic=True)
    out, recs, log = _merge(model)
    assert ops(out).count("Conv") == 1 and "Add" not in ops(out)[:1]
    (rec,) = recs
    assert rec["kind"] == "1x1 + dw3x3 + 1x1 + identity" and rec["exact"] and rec["residuals_folded"] == 1
    assert rec["macs_after"] < rec["macs_before"] and rec["border_bias"] == bias  # expand bias meets dw padding
    assert ops(out).count("Add") == int(bias)
    x = randn(3, 4, 7, 7)
    assert rel_error(outputs(model, x), outputs(out, x)) <= TOL
    # no pair of the block pays on its own: only the planner's whole-segment view finds the merge
    pairs = [r for r in log if len(r["layers"]) == 2 and "macs_merged" in r]
    assert pairs and all(r["macs_merged"] > r["macs_span"] and r["decision"] == "kept" for r in pairs)


def test_without_the_residual_the_block_still_merges_when_cheaper():
    torch.manual_seed(1)
    model = export_module(LinearInvertedResidual(c=4, t=6, residual=False), (1, 4, 6, 6), dynamic=True)
    out, recs, _ = _merge(model)
    assert ops(out).count("Conv") == 1 and recs[0]["kind"] == "1x1 + dw3x3 + 1x1"
    x = randn(2, 4, 6, 6)
    assert rel_error(outputs(model, x), outputs(out, x)) <= TOL


def test_a_merge_that_grows_macs_is_refused_and_growth_allows_it():
    torch.manual_seed(2)
    m = LinearInvertedResidual(c=8, t=1, residual=False)  # t=1: the block's MACs are below a dense 3x3
    model = export_module(m, (1, 8, 6, 6), dynamic=True)
    kept, recs, log = _merge(model)
    assert recs == [] and ops(kept).count("Conv") == 3
    assert any(r["decision"] == "kept" and "costs more" in r["why"] for r in log)
    out, recs, _ = _merge(model, max_mac_growth=10.0)
    assert ops(out).count("Conv") == 1
    x = randn(2, 8, 6, 6)
    assert rel_error(outputs(model, x), outputs(out, x)) <= TOL


@pytest.mark.parametrize("stride", [1, 2])
def test_unpadded_kxk_chains_merge_exactly_and_padded_ones_only_inexactly(stride):
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(2, 2, 3, stride=stride), nn.Conv2d(2, 2, 3))
    model = export_module(m, (1, 2, 13, 13), dynamic=True)
    out, recs, _ = _merge(model, max_mac_growth=4.0)
    assert ops(out).count("Conv") == 1 and recs[0]["exact"]
    x = randn(2, 2, 13, 13)
    assert rel_error(outputs(model, x), outputs(out, x)) <= TOL
    padded = export_module(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)),
                           (1, 2, 9, 9), dynamic=True)
    kept, recs, log = _merge(padded, max_mac_growth=4.0)
    assert recs == [] and any("allow-inexact" in r["why"] for r in log)


class _TwoBlocksAndAnOutsideReader(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.c = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = self.b(self.a(x))
        return self.c(h) * h  # h is read outside the chain: a, b may merge, b, c may not


def test_a_tensor_read_outside_the_chain_is_never_merged_away():
    torch.manual_seed(4)
    model = export_module(_TwoBlocksAndAnOutsideReader(), (1, 4, 5, 5), dynamic=True)
    out, recs, _ = _merge(model)
    assert ops(out).count("Conv") == 2 and [r["modules"] for r in recs] == [["/a/Conv", "/b/Conv"]]
    x = randn(2, 4, 5, 5)
    assert rel_error(outputs(model, x), outputs(out, x)) <= TOL


class _ResidualInsideAChain(nn.Module):
    """1x1 -> (3x3 -> 1x1 + skip) -> 1x1: the residual spans the middle two convs; a segment that cuts
    it, (pre, mid1) or (mid2, post), would leave the Add reading an internal tensor: never a candidate."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Conv2d(3, 4, 1)
        self.mid1 = nn.Conv2d(4, 4, 3, padding=1)
        self.mid2 = nn.Conv2d(4, 4, 1)
        self.post = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        h = self.pre(x)
        return self.post(self.mid2(self.mid1(h)) + h)


def test_a_residual_span_nested_in_the_chain_folds_and_is_never_cut():
    torch.manual_seed(5)
    model = export_module(_ResidualInsideAChain(), (1, 3, 6, 6), dynamic=True)
    out, recs, log = _merge(model, max_mac_growth=100.0)
    assert ops(out).count("Conv") == 1 and recs[0]["residuals_folded"] == 1
    spans = [r["layers"] for r in log]
    assert ["/mid1/Conv", "/mid2/Conv"] in spans
    assert ["/pre/Conv", "/mid1/Conv"] not in spans and ["/mid2/Conv", "/post/Conv"] not in spans
    x = randn(2, 3, 6, 6)
    assert rel_error(outputs(model, x), outputs(out, x)) <= TOL
    out1, _, _ = _merge(model)  # by MACs too: a 3x3 3 -> 2 conv (54 MACs/px) against 180 for the four
    assert ops(out1).count("Conv") == 1


def test_gemm_chain_of_three_merges_into_one():
    m = nn.Sequential(nn.Flatten(), nn.Linear(32, 4), nn.Linear(4, 32), nn.Linear(32, 4))
    model = export_module(m, (2, 32), dynamic=True)
    out, recs, _ = _merge(model)
    assert ops(out).count("Gemm") == 1 and recs[0]["kind"] == "gemm + gemm + gemm"
    x = randn(5, 32)
    assert rel_error(outputs(model, x), outputs(out, x)) <= TOL


def test_grouped_conv_keeps_its_groups_when_only_the_identity_folds():
    class DwResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=3)

        def forward(self, x):
            return self.dw(x) + x

    model = export_module(DwResidual(), (1, 6, 5, 5), dynamic=True)
    out, recs, _ = _merge(model)
    assert ops(out) == ["Conv"] and recs[0]["kind"].startswith("residual identity folded")
    conv = out.graph.node[0]
    assert next(a.i for a in conv.attribute if a.name == "group") == 3
    x = randn(2, 6, 5, 5)
    assert rel_error(outputs(model, x), outputs(out, x)) <= TOL


def test_cost_model_object_is_used_for_pricing():
    class Everything(MacCost):
        def price(self, chains):
            for _, cands in chains:
                for c in cands:
                    c.cost = 0.0 if c.b > c.a else 1.0  # merging is free: take the longest segments

    model = export_module(LinearInvertedResidual(c=8, t=1, residual=False), (1, 8, 6, 6), dynamic=True)
    out, recs, _ = _merge(model, cost_model=Everything())
    assert ops(out).count("Conv") == 1


# ---------------------------------------------------------------- MobileNetV2 with linear blocks
LINEAR_BLOCKS = (3, 6, 9)  # stride-1 inverted residuals that follow one (or stage 2), identity skip


def mobilenet_v2_with_linear_blocks(blocks=LINEAR_BLOCKS, width: float = 0.25, seed: int = 0) -> nn.Module:
    """The zoo's MobileNetV2 whose ``blocks`` are fully linear on the data: each ReLU6 input is
    BN-shifted to about 3 with a small slope, so it stays inside (0, 6)."""
    torch.manual_seed(seed)
    m = create_model("mobilenet_v2", width_mult=width, num_classes=10)
    with torch.no_grad():
        for i in blocks:
            block = m.features[i]
            assert block.use_res_connect
            for unit in (u for u in block.conv if isinstance(u, nn.Sequential)):  # conv, BN, ReLU6 units
                bn = unit[1]
                bn.weight.fill_(0.01)
                bn.bias.fill_(3.0)
    return m.eval()


def _conv_count(model) -> int:
    return sum(n.op_type == "Conv" for n in model.graph.node)


def _export(module, dynamo: bool):
    import io
    import warnings

    import onnx

    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            prog = torch.onnx.export(module, (torch.randn(1, 3, 32, 32),), dynamo=True, opset_version=18,
                                     input_names=["x"], output_names=["y"], verbose=False)
            prog.optimize()
            return prog.model_proto
        torch.onnx.export(module, torch.randn(1, 3, 32, 32), f, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])
    return onnx.load_from_string(f.getvalue())


def _run_mobilenet(model):
    cal, held = randn(64, 3, 32, 32, seed=1), randn(32, 3, 32, 32, seed=2)
    res = optimize(model, cal, held, SurgeryOptions(batch_size=64))
    return res, held


def _check_mobilenet(model, res, held):
    k = len(LINEAR_BLOCKS)
    assert _conv_count(res.model) == _conv_count(model) - 2 * k
    removed = [r for r in res.report["changes"]["stripped"] if r["action"].startswith("removed")]
    assert len(removed) == 2 * k  # both ReLU6 of each linear block; the others only lose dead channels
    whole = [r for r in res.report["changes"]["merged"] if r.get("residuals_folded")]
    assert len(whole) == k and all(r["kind"] == "1x1 + dw3x3 + 1x1 + identity" for r in whole)
    assert rel_error(outputs(model, held), outputs(res.model, held)) <= TOL
    assert res.report["after"]["macs_dense"] < res.report["before"]["macs_dense"]


def test_mobilenet_v2_linear_blocks_each_become_one_conv():
    model = _export(mobilenet_v2_with_linear_blocks(), dynamo=False)
    res, held = _run_mobilenet(model)
    _check_mobilenet(model, res, held)


@pytest.mark.slow
def test_mobilenet_v2_both_exporters_give_the_same_layer_counts():
    module = mobilenet_v2_with_linear_blocks()
    results = []
    for dynamo in (False, True):
        model = _export(module, dynamo)
        res, held = _run_mobilenet(model)
        _check_mobilenet(model, res, held)
        results.append((_conv_count(model), _conv_count(res.model)))
    assert results[0] == results[1]


def test_resnet50_linear_bottlenecks_lose_their_relus_and_no_merge_grows_macs():
    """Every merge of a bottleneck grows MACs (1x1 -> 3x3 -> 1x1 + x as one dense 3x3 is 4C x 4C), so
    --cost macs keeps all convs; the stripped ReLUs are exact on the data."""
    torch.manual_seed(0)
    m = create_model("resnet50", width=4, stem="cifar", num_classes=10).eval()
    planted = 0
    with torch.no_grad():
        for mod in m.modules():
            if hasattr(mod, "conv3") and mod.downsample is None:
                for bn in (mod.bn1, mod.bn2):
                    bn.weight.fill_(0.01)
                    bn.bias.fill_(3.0)
                planted += 1
    model = _export(m, dynamo=False)
    res, held = _run_mobilenet(model)
    assert planted == 12
    removed = [r for r in res.report["changes"]["stripped"] if r["action"].startswith("removed")]
    assert len(removed) >= 2 * planted
    assert _conv_count(res.model) == _conv_count(model) and res.report["summary"]["merges"] == 0
    kept = [c for c in res.report["merge_planner"]["candidates"] if "macs_merged" in c]
    assert len(kept) >= 3 * planted  # (conv1, conv2), (conv2, conv3), the block + identity, each block
    assert all(c["macs_merged"] > c["macs_span"] and c["decision"] == "kept" for c in kept)
    assert rel_error(outputs(model, held), outputs(res.model, held)) <= TOL
