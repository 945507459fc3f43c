"""A constant branch feeding a channel Concat folds away: dense-concatenation (DenseNet), Inception and
fire (squeeze-expand) blocks with all-zero convs planted lose those layers exactly, with either torch
exporter; the readers of the Concat absorb the constant slice (with a border map where they pad);
unpruned blocks come out equivalent with every layer kept; a Concat whose readers cannot be split is
left alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from surgery_blocks import (
    DenseBlock,
    FireNet,
    InceptionBlock,
    assert_report_honest,
    collapsed,
    counts_from_both_exporters,
    export,
    layer_count,
)
from test_surgery_helpers import (
    apply,
    export_module,
    graph_of,
    outputs,
    randn,
    rel_error,
)

from egp_deploy.surgery import SurgeryOptions, optimize
from egp_deploy.surgery.concat_constants import (
    absorb_concat_constants,
    concat_region,
    sample_independent,
)

EXACT = SurgeryOptions(batch_size=8, strip_activations=False)
SHAPE = (1, 3, 16, 16)


# Layer counts an exact surgery can reach from surgery_blocks.collapsed(name), by hand:
# dense: stem + 3 x (conv1, conv2) + transition + head = 9; layers 0 and 1 have conv2 all zero, so
#        conv2 is a constant and conv1, read only by it, is dead: 9 - 4 = 5.
# inception: stem + b1 + b2a, b2b + b3a, b3b + b4 + mix + head = 9; branch 1 and all of branch 2
#        are constant: 9 - 3 = 6.
# fire: stem + 2 x (squeeze, expand1x1, expand3x3) + classifier = 8; one expand of each fire is
#        constant: 8 - 2 = 6.
BLOCKS = {
    "dense": (9, 5, {"layers.0.conv1", "layers.0.conv2", "layers.1.conv1", "layers.1.conv2"}),
    "inception": (9, 6, {"b1", "b2a", "b2b"}),
    "fire": (8, 6, {"fire1.expand3x3", "fire2.expand1x1"}),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_constant_branch_into_concat_folds_exactly(name):
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
    # the zero convs are reported as folded constants whose Concat slice went into its readers,
    # not as narrowed inputs
    folded = res.report["changes"]["constant_layers"]
    assert folded and all(r.get("concats") for r in folded)
    assert res.report["changes"]["dead_channels"] == []
    assert_report_honest(model, res)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BLOCKS))
def test_both_exporters_reach_the_same_counts(name):
    before, after, _ = BLOCKS[name]
    counts = counts_from_both_exporters(name, SHAPE, randn(8, *SHAPE[1:]), EXACT, "constant_layers_folded")
    assert counts[0] == counts[1]
    assert counts[0][:3] == (before, after, before - after)


@pytest.mark.parametrize("build", [DenseBlock, InceptionBlock, FireNet], ids=["dense", "inception", "fire"])
def test_unpruned_blocks_keep_every_layer_and_stay_equivalent(build):
    net = build().eval()
    model = export_module(net, (2,) + SHAPE[1:], dynamic=True)
    x = randn(8, *SHAPE[1:])
    res = optimize(model, x, None, EXACT)
    assert layer_count(res.model) == layer_count(model)
    assert res.report["after"]["macs_dense"] == res.report["before"]["macs_dense"]
    assert res.report["changes"]["constant_layers"] == []
    assert rel_error(outputs(model, x), outputs(res.model, x)) <= 1e-6


class _ConcatInto(nn.Module):
    """A live branch and a constant one (an all-zero 1x1 conv with a bias) concatenated, then ``tail``."""

    def __init__(self, tail: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.live, self.zero = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        with torch.no_grad():
            self.zero.weight.zero_()
        self.tail = tail

    def forward(self, x):
        return self.tail(torch.cat([torch.relu(self.live(x)), torch.sigmoid(self.zero(x))], 1))


class _Shuffle(nn.Module):
    def forward(self, x):  # ShuffleNet's channel shuffle: a Reshape/Transpose mixes the channels
        n, c, h, w = x.shape
        return x.reshape(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


def _run_dynamic(net: nn.Module):
    model = export_module(net, (2, 3, 8, 8), dynamic=True)
    x = randn(8, 3, 8, 8)
    res = optimize(model, x, None, EXACT)
    assert rel_error(outputs(model, x), outputs(res.model, x)) <= 1e-5
    return model, res


@pytest.mark.parametrize("tail", [
    nn.Sequential(nn.BatchNorm2d(16), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
                  nn.Conv2d(16, 4, 3, padding=1)),
    nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)),
], ids=["bn_depthwise_padded_conv", "pool_flatten_gemm"])
def test_constant_slice_through_channel_keeping_ops(tail):
    """Each op between the Concat and its reader is split into its live and constant channels; the
    batch of 8 meets the batch-1 constant side only where it broadcasts."""
    model, res = _run_dynamic(_ConcatInto(tail).eval())
    assert layer_count(model) - layer_count(res.model) == 1  # the zero conv
    assert [r["concats"][0]["channels_before"] for r in res.report["changes"]["constant_layers"]] == [16]
    assert "Concat" not in [n.op_type for n in res.model.graph.node]  # one live input left: bypassed
    assert_report_honest(model, res)


@pytest.mark.parametrize("tail", [nn.Identity(), nn.Sequential(_Shuffle(), nn.Conv2d(16, 4, 1))],
                         ids=["graph_output", "channel_shuffle"])
def test_concat_whose_readers_cannot_split_is_left_alone(tail):
    model, res = _run_dynamic(_ConcatInto(tail).eval())
    assert layer_count(res.model) == layer_count(model)
    assert res.report["changes"]["constant_layers"] == []
    assert_report_honest(model, res)


@pytest.mark.parametrize("tail", [nn.Identity(), nn.Sequential(_Shuffle(), nn.Conv2d(16, 4, 1))],
                         ids=["graph_output", "channel_shuffle"])
def test_static_batch_one_concat_takes_the_constant_as_an_input(tail):
    """With a static batch of 1 the constant is the tensor itself: the zero conv goes even where the
    Concat's readers cannot be split, and the Concat keeps the constant as an input."""
    net = _ConcatInto(tail).eval()
    model = export_module(net, (1, 3, 8, 8))
    x = randn(1, 3, 8, 8)
    res = optimize(model, x, None, EXACT)
    assert layer_count(model) - layer_count(res.model) == 1
    assert "Concat" in [n.op_type for n in res.model.graph.node]
    assert [r.get("concats") for r in res.report["changes"]["constant_layers"]] == [None]
    with torch.no_grad():
        assert rel_error(net(torch.from_numpy(x)).numpy(), outputs(res.model, x)) <= 1e-5
    assert_report_honest(model, res)


def test_absorb_on_its_own_keeps_the_region_and_skips_all_constant_concats():
    net = _ConcatInto(nn.Conv2d(16, 4, 3, padding=1)).eval()
    model = export_module(net, (1, 3, 8, 8))
    graph = graph_of(model)
    concat = next(n for n in graph.nodes if n.op == "Concat")
    region = concat_region(graph, concat)
    assert [n.op for n in region.nodes] == [] and [n.op for n, _ in region.exits] == ["Conv"]
    assert absorb_concat_constants(graph, concat, lambda t: True) is None  # every input constant
    assert absorb_concat_constants(graph, concat, lambda t: False) is None  # none
    # the zero conv's output is not computed from constants (it reads x): nothing to absorb yet
    assert absorb_concat_constants(graph, concat, sample_independent(graph)) is None

    def absorb(g):  # the split is linear algebra: exact whatever the "constant" input holds
        c = next(n for n in g.nodes if n.op == "Concat")
        return absorb_concat_constants(g, c, lambda t: t is c.inputs[1])

    out, record = apply(model, absorb)
    assert record["channels_before"] == 16 and record["channels_after"] == 8
    x = randn(1, 3, 8, 8)
    assert rel_error(outputs(model, x), outputs(out, x)) <= 1e-5
