"""Transformer blocks: a constant MLP branch folds into one bias Add, dead hidden units narrow both
MatMuls, Swin-T / ViT with collapsed MLPs lose two linear layers per block, exactly, with either
torch exporter; swin_t carries torchvision's state_dict keys."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from egp_deploy.archs import create_model
from egp_deploy.surgery import SurgeryOptions, optimize
from egp_deploy.surgery.transformer_mlp import narrow_token_mlps
from test_surgery_helpers import apply, export_module, ops, outputs, randn, rel_error

EXACT = SurgeryOptions(batch_size=8, strip_activations=False)


class TokenMLP(nn.Module):
    """x + fc2(act(fc1(norm(x)))) on (N, L, C) tokens: a transformer block's MLP half."""

    def __init__(self, dim: int = 8, hidden: int = 32, act: nn.Module | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act or nn.GELU(), nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        x = x + self.fc2(self.act(self.fc1(self.norm(x))))
        return self.head(x)


def _layers(model: onnx.ModelProto) -> int:
    return sum(op in ("MatMul", "Gemm") for op in ops(model))


@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Hardswish()],
                         ids=["gelu_erf", "gelu_tanh", "silu", "hardswish"])
def test_all_zero_fc1_folds_branch_into_one_bias_add(act):
    torch.manual_seed(0)
    net = TokenMLP(act=act).eval()
    with torch.no_grad():
        net.fc1.weight.zero_()
        net.fc1.bias.normal_()
    model = export_module(net, (2, 5, 8))
    x = randn(8, 5, 8)
    res = optimize(model, x, randn(8, 5, 8, seed=1), EXACT)
    assert _layers(model) - _layers(res.model) == 2
    assert "LayerNormalization" not in ops(res.model)  # its only reader was the zero MatMul
    assert not {"Erf", "Tanh", "Sigmoid", "HardSwish"} & set(ops(res.model))
    # the residual branch is now one Add of a (1, 1, C) constant
    adds = [n for n in res.model.graph.node if n.op_type == "Add"]
    consts = {i.name: numpy_helper.to_array(i) for i in res.model.graph.initializer}
    assert any(c.shape == (1, 1, 8) for n in adds for c in (consts.get(i) for i in n.input) if c is not None)
    assert rel_error(outputs(model, x), outputs(res.model, x)) <= 1e-5
    with torch.no_grad():
        assert rel_error(net(torch.from_numpy(x)).numpy(), outputs(res.model, x)) <= 1e-5


def _gelu_op_model(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> onnx.ModelProto:
    """Hand-built opset-20 graph: x (N, L, C) -> MatMul -> Add -> Gelu -> MatMul -> Add -> + x."""
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Gelu", ["h1"], ["h2"], name="gelu"),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"], name="fc2"),
        helper.make_node("Add", ["h3", "b2"], ["h4"], name="fc2_bias"),
        helper.make_node("Add", ["x", "h4"], ["y"], name="residual"),
    ]
    c = w1.shape[0]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, c])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, c])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_gelu_op_zero_fc1_becomes_bias_add():
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    model = _gelu_op_model(np.zeros((8, 16), np.float32), f32(16), f32(16, 8), f32(8))
    x = randn(4, 6, 8)
    res = optimize(model, x, None, EXACT)
    assert ops(res.model) == ["Add"]
    assert rel_error(outputs(model, x), outputs(res.model, x)) <= 1e-6


def test_dead_hidden_units_narrow_both_matmuls():
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    w1, b1, w2, b2 = f32(8, 32), f32(32), f32(32, 8), f32(8)
    w1[:, :10] = 0.0  # units 0..9: constant pre-activation b1[j], so constant GELU(b1[j])
    w2[20:26] = 0.0  # units 20..25: read by nobody
    model = _gelu_op_model(w1, b1, w2, b2)
    narrowed, records = apply(model, lambda g: narrow_token_mlps(g, channel_multiple=1))
    assert records == [{"fc1": "fc1", "fc2": "fc2", "modules": ["fc1", "fc2"], "units_before": 32,
                        "units_after": 16, "constant": 10, "unused": 6}]
    weights = {i.name: i.dims for i in narrowed.graph.initializer}
    mm = {n.name: n for n in narrowed.graph.node if n.op_type == "MatMul"}
    assert list(weights[mm["fc1"].input[1]]) == [8, 16] and list(weights[mm["fc2"].input[1]]) == [16, 8]
    x = randn(4, 6, 8)
    assert rel_error(outputs(model, x), outputs(narrowed, x)) <= 1e-6
    # aligned to 8: 16 removable units stay 16 (a multiple of 8), 17 would keep 24
    _, records = apply(model, lambda g: narrow_token_mlps(g, channel_multiple=8))
    assert records[0]["units_after"] == 16


def test_narrowing_leaves_mlps_with_a_foreign_reader_alone():
    """A hidden tensor read by anything but fc2 (here a second graph output) cannot lose units."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    w1[:, :8] = 0
    model = _gelu_op_model(w1, np.ones(16, np.float32), np.ones((16, 8), np.float32), np.zeros(8, np.float32))
    model.graph.output.append(helper.make_tensor_value_info("h2", TensorProto.FLOAT, None))
    _, records = apply(model, lambda g: narrow_token_mlps(g))
    assert records == []


def _swin(**kw) -> nn.Module:
    torch.manual_seed(0)
    return create_model("swin_t", width=16, depths=(2, 2), heads=(2, 4), window_size=4, **kw).eval()


def _collapse_mlps(net: nn.Module, blocks) -> nn.Module:
    with torch.no_grad():
        for stage, i in blocks:
            net.features[stage][i].mlp[0].weight.zero_()
    return net


def _export(net: nn.Module, dynamo: bool, shape=(2, 3, 32, 32)) -> onnx.ModelProto:
    if not dynamo:
        return export_module(net, shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(net, (torch.randn(*shape),), dynamo=True, verbose=False).model_proto


def test_swin_t_keys_match_torchvision():
    """torchvision's swin_t state_dict layout (read from torchvision/models/swin_transformer.py)."""
    keys = set(create_model("swin_t", num_classes=1000).state_dict())
    for k in ("features.0.0.weight", "features.0.2.bias", "features.1.0.norm1.weight",
              "features.1.0.attn.qkv.weight", "features.1.0.attn.proj.bias",
              "features.1.0.attn.relative_position_bias_table", "features.1.0.attn.relative_position_index",
              "features.1.1.mlp.0.weight", "features.1.1.mlp.3.bias", "features.2.reduction.weight",
              "features.2.norm.weight", "features.5.5.norm2.weight", "features.7.1.mlp.3.weight",
              "features.6.reduction.weight", "norm.weight", "head.bias"):
        assert k in keys, k
    assert "features.2.reduction.bias" not in keys
    assert len([k for k in keys if k.endswith("mlp.0.weight")]) == 12  # 2 + 2 + 6 + 2 blocks
    n = sum(p.numel() for p in create_model("swin_t", num_classes=1000).parameters())
    assert n == 28288354  # torchvision's Swin_T_Weights meta "num_params"


def test_swin_t_collapsed_mlps_lose_two_layers_each_exact():
    net = _collapse_mlps(_swin(), [(1, 0), (3, 1)])
    model = _export(net, dynamo=False)
    cal, held = randn(16, 3, 32, 32), randn(8, 3, 32, 32, seed=1)
    res = optimize(model, cal, held, EXACT)
    assert res.report["before"]["conv_gemm_layers"] - res.report["after"]["conv_gemm_layers"] == 4
    assert sorted(res.report["layers_removed"]) == ["features.1.0.mlp.0", "features.1.0.mlp.3",
                                                    "features.3.1.mlp.0", "features.3.1.mlp.3"]
    assert res.report["verification"]["calibration"]["rel_error"] <= 1e-5
    assert res.report["verification"]["held_out"]["rel_error"] <= 1e-5
    with torch.no_grad():
        assert rel_error(net(torch.from_numpy(held)).numpy(), outputs(res.model, held)) <= 1e-5


def test_unpruned_swin_t_only_canonicalised():
    net = _swin()
    model = _export(net, dynamo=False)
    cal, held = randn(8, 3, 32, 32), randn(4, 3, 32, 32, seed=1)
    res = optimize(model, cal, held, EXACT)
    s = res.report["summary"]
    assert (s["constant_layers_folded"], s["channels_removed"], s["mlp_units_removed"], s["merges"]) == (0, 0, 0, 0)
    # (MACs and parameters are not compared: the legacy export's shape arithmetic hides static shapes
    # until folded, and folding precomputes the position-bias gathers and shift masks as constants)
    for key in ("conv_gemm_layers", "longest_path_layers"):
        assert res.report["after"][key] == res.report["before"][key], key
    kept = ("MatMul", "Gemm", "Conv", "LayerNormalization", "Softmax", "Erf")
    assert [o for o in ops(res.model) if o in kept] == [o for o in ops(model) if o in kept]
    assert res.report["after"]["nodes"] < res.report["before"]["nodes"]
    assert rel_error(outputs(model, held), outputs(res.model, held)) <= 1e-5


@pytest.mark.slow
def test_both_exporters_give_the_same_layer_counts():
    net = _collapse_mlps(_swin(), [(1, 1)])
    with torch.no_grad():
        net.features[3][0].mlp[0].weight[::2] = 0.0  # half of a block's hidden units constant
    cal = randn(8, 3, 32, 32)
    counts = {}
    for dynamo in (False, True):
        model = _export(net, dynamo)
        res = optimize(model, cal, None, EXACT)
        assert res.report["verification"]["calibration"]["rel_error"] <= 1e-5
        counts[dynamo] = (res.report["before"]["conv_gemm_layers"], res.report["after"]["conv_gemm_layers"],
                          res.report["summary"]["mlp_units_removed"])
    assert counts[False] == counts[True] == (19, 17, 64)
    assert sorted(res.report["layers_removed"]) == ["features.1.1.mlp.0", "features.1.1.mlp.3"]  # dynamo scopes


def test_vit_tiny_collapsed_mlp_folds():
    torch.manual_seed(0)
    net = create_model("vit_tiny", width=16, layers=2, heads=2).eval()
    with torch.no_grad():
        net.encoder.layers.encoder_layer_1.mlp[0].weight.zero_()
    model = export_module(net, (1, 3, 32, 32))
    cal = randn(8, 3, 32, 32)
    res = optimize(model, cal, None, EXACT)
    assert res.report["before"]["conv_gemm_layers"] - res.report["after"]["conv_gemm_layers"] == 2
    assert rel_error(outputs(model, cal), outputs(res.model, cal)) <= 1e-5


def test_noop_pads_slices_go_and_chained_slices_merge():
    """Swin's window padding is a zero Pad and its crop a whole-range Slice when the map is a multiple of the
    window; PatchMerging's x[..., 0::2, 1::2, :] is two Slices on different axes: one Slice each."""
    from egp_deploy.surgery.canonicalize import merge_slices, remove_identities

    i64 = lambda *v: numpy_helper.from_array(np.array(v, np.int64))  # noqa: E731
    inits = [numpy_helper.from_array(np.zeros(8, np.int64), "zero_pads")]
    for name, vals in (("s0", [0]), ("e_big", [2**62]), ("ax1", [1]), ("ax2", [2]), ("st2", [2]), ("s1", [1]),
                       ("e4", [4])):
        t = i64(*vals)
        t.name = name
        inits.append(t)
    nodes = [
        helper.make_node("Pad", ["x", "zero_pads"], ["p"], name="pad"),
        helper.make_node("Slice", ["p", "s0", "e4", "ax1"], ["c"], name="crop"),  # keeps all 4 rows
        helper.make_node("Slice", ["c", "s1", "e_big", "ax1", "st2"], ["r"], name="rows"),
        helper.make_node("Slice", ["r", "s0", "e_big", "ax2", "st2"], ["y"], name="cols"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 6, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2, 3, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, _ = apply(model, lambda g: (remove_identities(g), merge_slices(g)))
    assert ops(out) == ["Slice"]
    x = randn(2, 4, 6, 3)
    np.testing.assert_array_equal(outputs(out, x), x[:, 1::2, 0::2, :])


@pytest.mark.slow
def test_both_exporters_agree_on_vit_tiny():
    torch.manual_seed(0)
    net = create_model("vit_tiny", width=16, layers=2, heads=2).eval()
    with torch.no_grad():
        net.encoder.layers.encoder_layer_1.mlp[0].weight.zero_()
        net.encoder.layers.encoder_layer_0.mlp[0].weight[::2] = 0.0
    cal = randn(8, 3, 32, 32)
    seen = []
    for dynamo in (False, True):
        res = optimize(_export(net, dynamo, (1, 3, 32, 32)), cal, None, EXACT)
        assert res.report["verification"]["calibration"]["rel_error"] <= 1e-5
        seen.append((res.report["before"]["conv_gemm_layers"], res.report["after"]["conv_gemm_layers"],
                     res.report["summary"]["mlp_units_removed"], sorted(res.report["layers_removed"]),
                     [(a["kind"], a["channels"]) for a in res.report["activations"]]))
    assert seen[0] == seen[1]
    assert seen[0][:3] == (10, 8, 16)


def test_rank2_gelu_mlp_loses_constant_units_through_channel_groups():
    """(N, C) MLPs export as Gemm: dead_channels' groups now evaluate Erf-GELU on constant channels."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4)).eval()
    with torch.no_grad():
        net[0].weight[:16] = 0.0
    model = export_module(net, (2, 8), dynamic=True)
    x = randn(16, 8)
    res = optimize(model, x, None, EXACT)
    assert res.report["summary"]["channels_removed"] == 16
    assert rel_error(outputs(model, x), outputs(res.model, x)) <= 1e-6


def test_all_zero_fc2_removes_the_whole_branch():
    torch.manual_seed(0)
    net = TokenMLP().eval()
    with torch.no_grad():
        net.fc2.weight.zero_()
        net.fc2.bias.normal_()
    model = export_module(net, (2, 5, 8))
    x = randn(8, 5, 8)
    res = optimize(model, x, None, EXACT)
    assert _layers(model) - _layers(res.model) == 2 and "Erf" not in ops(res.model)
    assert rel_error(outputs(model, x), outputs(res.model, x)) <= 1e-5
