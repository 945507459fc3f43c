"""Dense MACs where the exporter leaves dims symbolic: a symbolic channel or spatial dim is taken from
the weights or the conv geometry, or the node's MACs are flagged unknown; never counted as 1. The
surgery report's MACs do not change when no layer did."""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

from egp_deploy.onnx_metrics import _node_macs, graph_metrics
from egp_deploy.surgery import SurgeryOptions, optimize
from surgery_blocks import ShuffleUnit, export
from test_surgery_helpers import randn


def _node(op, inputs, **attrs):
    return helper.make_node(op, inputs, ["y"], name=op.lower(), **attrs)


def test_symbolic_channels_come_from_the_weights_and_spatial_sizes_from_the_geometry():
    conv = _node("Conv", ["x", "w"], pads=[1, 1, 1, 1], strides=[2, 2])
    w = [4, 3, 3, 3]
    # output channels and spatial sizes symbolic, input spatial static: 4 x 4x4 outputs x 27 weights each
    assert _node_macs(conv, {"x": [None, None, 8, 8], "w": w, "y": [None, None, None, None]})[0] == 4 * 16 * 27
    assert _node_macs(conv, {"x": [2, 3, 8, 8], "w": w, "y": [2, None, 4, 4]})[0] == 2 * 4 * 16 * 27  # batch kept
    # spatial sizes nobody knows: unknown, not 1
    assert _node_macs(conv, {"x": [None, 3, None, None], "w": w, "y": [None, 4, None, None]})[0] is None
    gemm = _node("Gemm", ["a", "b"], transB=1)
    assert _node_macs(gemm, {"a": [None, None], "b": [6, 5], "y": [None, None]})[0] == 5 * 6
    matmul = _node("MatMul", ["a", "b"])
    assert _node_macs(matmul, {"a": [None, 7, None], "b": [5, 3], "y": [None, 7, None]})[0] == 7 * 5 * 3
    assert _node_macs(matmul, {"a": [None, None, 5], "b": [5, 3], "y": [None, None, 3]})[0] is None  # tokens?


def test_graph_with_symbolic_dims_flags_the_nodes_unknown():
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "C", "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "H", "W"])], [w])
    r = graph_metrics(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert r["macs_unknown_nodes"] == ["c"] and r["macs_dense"] == 0


def test_legacy_export_hides_shapes_and_the_report_counts_them_after_folding():
    torch.manual_seed(0)
    model = export(ShuffleUnit(), (1, 3, 8, 8), dynamo=False, dynamic_batch=True)
    r = graph_metrics(model)
    # the split's and the shuffle's run-time shape arithmetic hides the branch's and the head's spatial
    # sizes: unknown, never 1
    assert len(r["macs_unknown_nodes"]) == 4
    stem, branch, head = 16 * 64 * 27, 2 * 8 * 64 * 8 + 8 * 64 * 9, 8 * 64 * 16
    assert r["macs_dense"] == stem
    res = optimize(model, randn(64, 3, 8, 8), randn(32, 3, 8, 8, seed=1), SurgeryOptions(batch_size=64))
    before, after = res.report["before"], res.report["after"]
    assert before["macs_dense"] == stem + branch + head and before["macs_unknown_nodes"] == []
    assert before["conv_gemm_layers"] == after["conv_gemm_layers"]  # no layer changed ...
    assert after["macs_dense"] == before["macs_dense"]  # ... so neither did the MACs


def test_report_never_compares_mac_sums_with_unknown_nodes():
    import io

    from rich.console import Console

    from egp_deploy.surgery.report import print_report

    out = io.StringIO()
    before = {"macs_dense": 100, "macs_nonzero": 100, "macs_unknown_nodes": ["a", "b"]}
    after = {"macs_dense": 168, "macs_nonzero": 168, "macs_unknown_nodes": []}
    print_report({"before": before, "after": after}, Console(file=out, width=200))
    row = next(line for line in out.getvalue().splitlines() if "MACs (dense)" in line)
    assert "100 + 2 unknown" in row and "+68.0 %" not in row and row.rstrip(" │").endswith("-")
