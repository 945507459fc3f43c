"""Dead channels through grouped convs (ResNeXt/RegNet) and through channel routes (ShuffleNetV2's
split, concat and channel shuffle): the widths an exact surgery can reach, computed by hand, with both
torch exporters; unpruned blocks come out unchanged and exact."""

from __future__ import annotations

import logging

import pytest
import torch

from egp_deploy.surgery import SurgeryOptions, optimize
from surgery_blocks import export, grouped_bottleneck, shuffle_unit
from test_surgery_helpers import outputs, randn, rel_error

TOL = 1e-5
OPTS = dict(batch_size=64, channel_multiple=1, strip_activations=False)


@pytest.fixture(autouse=True)
def _quiet_dynamo():
    logging.disable(logging.WARNING)  # the dynamo exporter's "torchvision is not installed" lines
    yield
    logging.disable(logging.NOTSET)


def conv_layout(model) -> list[tuple[list[int], int]]:
    """(weight shape, group) of every Conv, in graph order."""
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    return [(dims[n.input[1]], next((a.i for a in n.attribute if a.name == "group"), 1))
            for n in model.graph.node if n.op_type == "Conv"]


def _surgery(net, dynamo: bool, **opts):
    model = export(net, (1, 3, 8, 8), dynamo=dynamo)
    held = randn(32, 3, 8, 8, seed=1)
    res = optimize(model, randn(64, 3, 8, 8), held, SurgeryOptions(**{**OPTS, **opts}))
    assert rel_error(outputs(model, held), outputs(res.model, held)) <= TOL
    return model, res


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_whole_dead_groups_halve_the_grouped_conv(dynamo):
    _, res = _surgery(grouped_bottleneck(list(range(16, 32))), dynamo)
    # groups 2 and 3 of the 3x3 read only dead channels, so they output constants that conv3 absorbs:
    # conv1 keeps 16 rows, the grouped conv keeps groups 0 and 1 (16 in, 16 out, 2 groups), conv3 16 columns
    assert conv_layout(res.model) == [([32, 3, 3, 3], 1), ([16, 32, 1, 1], 1), ([16, 8, 3, 3], 2),
                                      ([32, 16, 1, 1], 1)]
    rec = next(r for r in res.report["changes"]["dead_channels"] if "conv_groups" in r)
    assert list(rec["conv_groups"].values()) == [[4, 2]] and rec["channels_after"] == 16


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_even_dead_channels_narrow_every_group_and_uneven_ones_stay(dynamo):
    _, even = _surgery(grouped_bottleneck([0, 8, 16, 24]), dynamo)  # one dead input in each group
    assert conv_layout(even.model) == [([32, 3, 3, 3], 1), ([28, 32, 1, 1], 1), ([32, 7, 3, 3], 4),
                                       ([32, 32, 1, 1], 1)]
    # 2 dead in group 0 and 1 in group 1: every group must keep the same number (8): nothing goes
    model, uneven = _surgery(grouped_bottleneck([0, 1, 8]), dynamo)
    assert conv_layout(uneven.model) == conv_layout(model) and not uneven.report["changes"]["dead_channels"]


def test_routed_groups_stay_aligned():
    model, res = _surgery(shuffle_unit(plant=True), False, channel_multiple=8)
    # every tensor the split/concat/shuffle joins keeps a multiple of 8: each 8-channel half keeps all
    # of its 8, and through the routes so do the stem and the branch: nothing goes
    assert conv_layout(res.model) == conv_layout(model) and not res.report["changes"]["dead_channels"]


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_dead_channels_cross_split_concat_and_shuffle(dynamo):
    model, res = _surgery(shuffle_unit(plant=True), dynamo)
    # stem 16 -> 8 (4 per half; the split becomes 4 + 4), the branch reads 4 and writes 4 of 8, the head
    # reads the 8 channels left after concat and shuffle; the shuffle becomes one Gather of the kept ones
    assert conv_layout(res.model) == [([8, 3, 3, 3], 1), ([8, 4, 1, 1], 1), ([8, 1, 3, 3], 8),
                                      ([4, 8, 1, 1], 1), ([8, 8, 1, 1], 1)]
    ops = [n.op_type for n in res.model.graph.node]
    assert "Gather" in ops and "Transpose" not in ops
    removed = sum(r["channels_before"] - r["channels_after"] for r in res.report["changes"]["dead_channels"])
    assert removed == res.report["summary"]["channels_removed"] == 8 + 4  # stem rows and branch.5 rows


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("block", ["shuffle", "grouped"])
def test_unpruned_blocks_come_out_unchanged_and_exact(block, dynamo):
    net = shuffle_unit(plant=False) if block == "shuffle" else grouped_bottleneck([])
    model, res = _surgery(net, dynamo, channel_multiple=8)
    assert conv_layout(res.model) == conv_layout(model)
    assert not res.report["changes"]["dead_channels"] and not res.report["layers_removed"]
    assert res.report["after"]["macs_dense"] == res.report["before"]["macs_dense"]


def test_only_whole_channel_permutations_are_routes():
    import onnx_graphsurgeon as gs
    from onnx import shape_inference

    from egp_deploy.surgery.canonicalize import fold_constants
    from egp_deploy.surgery.channel_routes import find_routes
    from egp_deploy.surgery.cleanup import refresh_shapes
    from surgery_blocks import channel_shuffle

    class Layouts(torch.nn.Module):
        def forward(self, x):  # a spatial transpose keeps the shape but moves pixels: not a channel route
            return channel_shuffle(x, 4) + x.transpose(2, 3)

    model = export(Layouts(), (1, 8, 4, 4), dynamo=False)
    graph = gs.import_onnx(shape_inference.infer_shapes(model, data_prop=True))
    fold_constants(graph)  # the exporter's run-time reshape targets (the pipeline folds them first)
    graph = refresh_shapes(graph, model)
    routes = [r for r in find_routes(graph) if r.kind == "permute"]
    assert len(routes) == 1
    (src, p, dst, q), = routes[0].pairs
    # shuffle with 4 groups of 2: output channel j is input channel (j % 4) * 2 + j // 4
    assert list(p) == [(j % 4) * 2 + j // 4 for j in range(8)] and list(q) == list(range(8))
