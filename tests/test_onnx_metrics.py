"""graph_metrics on hand-built graphs (every figure derived by hand) and on an exported ResNet."""

import io

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from egp_deploy.archs import create_model
from egp_deploy.onnx_metrics import graph_metrics


def _model(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(m)
    return m


def _f(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_conv_relu_residual_counts_and_sparse_macs():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w1[:2] = 0.0  # two dead output channels: 54 zero weights
    w2 = rng.standard_normal((3, 4, 1, 1)).astype(np.float32)
    w2[0, 0] = 0.0
    b1 = np.zeros(4, np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Add", ["c2", "x"], ["s"], name="add"),
        helper.make_node("Clip", ["s", "lo", "hi"], ["y"], name="relu6"),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((w1, "w1"), (w2, "w2"), (b1, "b1"), (np.float32(0), "lo"), (np.float32(6), "hi"))]
    m = _model(nodes, [_f("x", [2, 3, 8, 8])], [_f("y", [2, 3, 8, 8])], inits)
    r = graph_metrics(m, per_layer=True)
    assert r["nodes"] == 5
    assert r["conv_gemm_layers"] == 2
    assert r["activations"] == 2 and r["activations_by_type"] == {"Clip": 1, "Relu": 1}
    assert r["longest_path_layers"] == 2
    assert r["params"] == 108 + 12 + 4 + 2
    assert r["params_nonzero"] == (108 - 54) + 11 + 0 + 1  # zero bias, Clip min 0
    conv1_dense = 2 * 4 * 64 * 27
    conv2_dense = 2 * 3 * 64 * 4
    assert r["macs_dense"] == conv1_dense + conv2_dense
    assert r["macs_nonzero"] == 2 * 64 * 54 + 2 * 64 * 11
    assert [row["name"] for row in r["layers"]] == ["conv1", "conv2"]
    assert r["file_size_bytes"] == len(m.SerializeToString())


def test_longest_path_counts_layers_not_nodes_and_ignores_node_order():
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    # chain x -> Gemm -> Gemm -> Gemm, parallel branch x -> Gemm; listed out of order
    nodes = [
        helper.make_node("Gemm", ["b", "w"], ["c"], name="g3"),
        helper.make_node("Gemm", ["x", "w"], ["a"], name="g1"),
        helper.make_node("Relu", ["a"], ["a2"]),
        helper.make_node("Sigmoid", ["a2"], ["a3"]),
        helper.make_node("Gemm", ["a3", "w"], ["b"], name="g2"),
        helper.make_node("Gemm", ["x", "w"], ["d"], name="side"),
        helper.make_node("Add", ["c", "d"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [_f("x", [1, 4])], [_f("y", [1, 4])], [w])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    r = graph_metrics(m)
    assert r["conv_gemm_layers"] == 4
    assert r["longest_path_layers"] == 3
    assert r["params"] == 16  # shared weight counted once
    assert r["macs_dense"] == 4 * 16


def test_matmul_is_a_layer_only_with_a_constant_operand_and_density_follows_transpose():
    wt = np.arange(12, dtype=np.float32).reshape(3, 4)  # one zero
    nodes = [
        helper.make_node("Transpose", ["wt"], ["w"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),  # (2,5,4)@(4,3)
        helper.make_node("MatMul", ["h", "ht"], ["att"], name="qk"),  # activation @ activation
        helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1]),
    ]
    m = helper.make_model(
        helper.make_graph(nodes, "g", [_f("x", [2, 5, 4])], [_f("att", [2, 5, 5])],
                          [numpy_helper.from_array(wt, "wt")]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    r = graph_metrics(m)
    assert r["conv_gemm_layers"] == 1
    proj = 2 * 5 * 3 * 4
    qk = 2 * 5 * 5 * 3
    assert r["macs_dense"] == proj + qk
    assert r["macs_nonzero"] == round(proj * 11 / 12) + qk


def test_gelu_erf_pattern_and_constant_node_weights_and_dynamic_batch():
    w = helper.make_tensor("wv", TensorProto.FLOAT, [4, 2], [0, 0, 1, 2, 3, 4, 5, 6])
    nodes = [
        helper.make_node("Constant", [], ["w"], value=w),
        helper.make_node("Gemm", ["x", "w"], ["h"], name="fc"),
        helper.make_node("Div", ["h", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]),
        helper.make_node("Mul", ["h", "e1"], ["m"]),
        helper.make_node("Mul", ["m", "half"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.float32(v), n) for n, v in (("sqrt2", 2 ** 0.5), ("one", 1), ("half", 0.5))]
    m = _model(nodes, [_f("x", ["batch", 4])], [_f("y", ["batch", 2])], inits)
    r = graph_metrics(m)
    assert r["activations"] == 1 and r["activations_by_type"] == {"Erf": 1}
    assert r["conv_gemm_layers"] == 1
    assert r["params"] == 8 + 3 and r["params_nonzero"] == 6 + 3
    assert r["macs_dense"] == 8  # symbolic batch counted as 1
    assert r["macs_nonzero"] == 6


def test_unknown_shapes_are_reported_not_guessed():
    w = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="c")]
    m = helper.make_model(
        helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    r = graph_metrics(m)
    assert r["macs_unknown_nodes"] == ["c"] and r["macs_dense"] == 0
    assert r["conv_gemm_layers"] == 1


def test_exported_resnet_matches_pytorch_counts():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, in_channels=1, width=4).eval()
    with torch.no_grad():
        model.layer2[0].conv1.weight[:3] = 0  # some sparsity the nonzero MACs must see
    f = io.BytesIO()
    x = torch.randn(1, 1, 16, 16)
    torch.onnx.export(model, x, f, dynamo=False, opset_version=17)
    r = graph_metrics(onnx.load_from_string(f.getvalue()))

    dense = nonzero = 0
    hooks = []

    def count(mod, inp, out):
        nonlocal dense, nonzero
        positions = out.numel() // out.shape[1]
        w = mod.weight
        dense += positions * w.numel()
        nonzero += positions * int((w != 0).sum())

    for mod in model.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            hooks.append(mod.register_forward_hook(count))
    with torch.no_grad():
        model(x)
    n_layers = len(hooks)
    for h in hooks:
        h.remove()
    assert r["conv_gemm_layers"] == n_layers == 21
    assert r["activations"] == 17
    assert r["longest_path_layers"] == 18  # stem + 8 blocks x 2 + fc
    assert r["macs_dense"] == dense
    assert r["macs_nonzero"] == pytest.approx(nonzero, rel=1e-9)
    assert r["macs_nonzero"] < r["macs_dense"]


def test_sparse_matmul_nonzero_macs_follow_the_weights_sparsity():
    # a long weight name: its characters must not be taken for operand names (2,048 reported before)
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    flat = w.reshape(-1)
    flat[rng.permutation(flat.size)[:1843]] = 0.0  # 90 % sparse: 205 of 2,048 weights left
    m = _model([helper.make_node("MatMul", ["x", "classifier.weight_matrix"], ["y"], name="fc")],
               [_f("x", [1, 64])], [_f("y", [1, 32])], [numpy_helper.from_array(w, "classifier.weight_matrix")])
    r = graph_metrics(m)
    assert r["conv_gemm_layers"] == 1
    assert r["macs_dense"] == 64 * 32
    assert r["macs_nonzero"] == 205
    # the constant operand may be the first one too (x^T W^T written as W @ x)
    m = _model([helper.make_node("MatMul", ["classifier.weight_t", "x"], ["y"], name="fc")],
               [_f("x", [64, 1])], [_f("y", [32, 1])], [numpy_helper.from_array(w.T.copy(), "classifier.weight_t")])
    assert graph_metrics(m)["macs_nonzero"] == 205
