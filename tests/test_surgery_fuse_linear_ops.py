"""fuse_linear_ops on tiny hand-built graphs: fewer nodes, same numbers (onnxruntime), and the cases
that must be left alone (non-constant or non-last-axis bias, shared weights, dynamic shapes)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from test_surgery_helpers import apply, export_module, ops, outputs, randn, rel_error
from torch import nn

from egp_deploy.surgery import SurgeryOptions, optimize
from egp_deploy.surgery.canonicalize import canonicalize
from egp_deploy.surgery.fuse_linear_ops import (
    compose_transposes,
    constant_reshape_targets,
    fold_constant_transposes,
    fuse_matmul_bias,
    merge_reshapes,
    simplify_layout_chains,
    sink_reshapes_through_matmuls,
    unit_transposes_to_reshapes,
)

TOL = 1e-5


def _init(name, arr, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(arr, dtype), name)


def _shape(name, values):
    return _init(name, values, np.int64)


def _model(nodes, inits, in_shape, out_shape):
    g = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _same(model, out, *batches):
    for b in batches:
        x = randn(*b, seed=len(b) + b[0])
        assert rel_error(outputs(model, x), outputs(out, x)) <= TOL


def _weight_bytes(model) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer if t.data_type == TensorProto.FLOAT)


# ---------------------------------------------------------------- MatMul + bias -> Gemm
def test_rank2_matmul_plus_bias_becomes_one_gemm_named_as_the_matmul():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc/MatMul"),
             helper.make_node("Add", ["b", "h"], ["y"], name="fc/Add")]
    model = _model(nodes, [_init("w", rng.standard_normal((6, 5))), _init("b", rng.standard_normal(5))], ["N", 6], ["N", 5])
    out, recs = apply(model, fuse_matmul_bias)
    assert ops(out) == ["Gemm"] and out.graph.node[0].name == "fc/MatMul"
    assert recs == [{"node": "fc/MatMul", "absorbed": ["fc/Add"], "rank": 2}]
    _same(model, out, (3, 6), (1, 6))


def test_rank2_transposed_input_is_absorbed_as_trans_a():
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], name="t", perm=[1, 0]),
             helper.make_node("MatMul", ["xt", "w"], ["y"], name="mm")]
    model = _model(nodes, [_init("w", rng.standard_normal((4, 3)))], [4, 7], [7, 3])
    out, _ = apply(model, fuse_matmul_bias)
    assert ops(out) == ["Gemm"]
    gemm = out.graph.node[0]
    assert helper.get_attribute_value(next(a for a in gemm.attribute if a.name == "transA")) == 1
    _same(model, out, (4, 7))


def test_shared_weight_behind_a_transpose_is_read_through_trans_b_not_copied():
    """W is read by two layers, one through a Transpose: the Gemm takes W itself with transB=1."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], name="wT", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["h"], name="enc"),
             helper.make_node("Add", ["h", "b"], ["h2"], name="enc_bias"),
             helper.make_node("Gemm", ["x", "w"], ["g"], name="other", transB=1),  # the second reader of W
             helper.make_node("Mul", ["h2", "g"], ["y"], name="mix")]
    model = _model(nodes, [_init("w", rng.standard_normal((5, 6))), _init("b", rng.standard_normal(5))], [3, 6], [3, 5])
    out, recs = apply(model, fuse_matmul_bias)
    assert sorted(ops(out)) == ["Gemm", "Gemm", "Mul"] and recs[0]["absorbed"] == ["enc_bias", "wT"]
    assert _weight_bytes(out) <= _weight_bytes(model)  # W is stored once
    _same(model, out, (3, 6))


def _token_mlp(dynamic: bool, reshape_after: bool = True, reshape_before: bool = True):
    """x (N, 4, 6) -> [Reshape (N, 2, 2, 6) -> Reshape (N, 4, 6)] -> MatMul W (6, 5) + b -> [Reshape (N, 20)]."""
    rng = np.random.default_rng(3)
    nodes, src = [], "x"
    if reshape_before:
        nodes.append(helper.make_node("Unsqueeze", ["x", "ax"], ["xu"], name="unsq"))
        src = "xu"
    nodes.append(helper.make_node("MatMul", [src, "w"], ["h"], name="proj/MatMul"))
    nodes.append(helper.make_node("Add", ["h", "b"], ["hb" if reshape_after else "y"], name="proj/Add"))
    if reshape_after:
        nodes.append(helper.make_node("Reshape", ["hb", "s"], ["y"], name="flat"))
    n = "N" if dynamic else 2
    in_shape = [n, 4, 6]
    out_shape = [n, 20] if reshape_after else ([n, 1, 4, 5] if reshape_before else [n, 4, 5])
    inits = [_init("w", rng.standard_normal((6, 5))), _init("b", rng.standard_normal((1, 1, 5))),
             _shape("s", [-1, 20]), _shape("ax", [1])]
    return _model(nodes, inits, in_shape, out_shape)


@pytest.mark.parametrize("dynamic", [False, True])
def test_token_matmul_between_reshapes_becomes_reshape_gemm_reshape(dynamic):
    model = _token_mlp(dynamic)
    out, recs = apply(model, fuse_matmul_bias)
    assert ops(out) == ["Reshape", "Gemm", "Reshape"] and len(out.graph.node) < len(model.graph.node)
    assert recs[0]["node"] == "proj/MatMul" and recs[0]["rank"] == 4
    _same(model, out, *([(2, 4, 6), (3, 4, 6)] if dynamic else [(2, 4, 6)]))


@pytest.mark.parametrize("before,after", [(False, True), (True, False), (False, False)])
def test_token_matmul_without_reshapes_on_both_sides_stays_matmul_add(before, after):
    model = _token_mlp(True, reshape_after=after, reshape_before=before)
    out, recs = apply(model, fuse_matmul_bias)
    assert recs == [] and ops(out) == ops(model)


def test_non_constant_bias_is_not_fused():
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("MatMul", ["x", "w2"], ["h2"], name="mm2"),
             helper.make_node("Add", ["h", "h2"], ["y"], name="add")]
    model = _model(nodes, [_init("w", rng.standard_normal((6, 5))), _init("w2", rng.standard_normal((6, 5)))],
                   [3, 6], [3, 5])
    out, recs = apply(model, fuse_matmul_bias)
    assert recs == [] and ops(out) == ["MatMul", "MatMul", "Add"]


@pytest.mark.parametrize("bias_shape", [(3, 1), (3, 5), (2, 1, 5)])
def test_bias_not_along_the_last_axis_is_not_fused(bias_shape):
    """A per-row bias (3, 1), a full (3, 5) one, or one that adds a leading axis is not a Gemm bias."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["y"], name="add")]
    out_shape = [2, 3, 5] if len(bias_shape) == 3 else [3, 5]
    model = _model(nodes, [_init("w", rng.standard_normal((6, 5))), _init("b", rng.standard_normal(bias_shape))],
                   [3, 6], out_shape)
    out, recs = apply(model, fuse_matmul_bias)
    assert recs == [] and ops(out) == ["MatMul", "Add"]


def test_lone_matmul_is_left_as_it_is():
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [_init("w", np.ones((6, 5)))],
                   [3, 6], [3, 5])
    out, recs = apply(model, fuse_matmul_bias)
    assert recs == [] and ops(out) == ["MatMul"]


# ---------------------------------------------------------------- transposes
def test_transpose_of_an_unshared_constant_folds():
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], name="wT", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["y"], name="mm")]
    model = _model(nodes, [_init("w", rng.standard_normal((5, 6)))], ["N", 4, 6], ["N", 4, 5])
    out, recs = apply(model, fold_constant_transposes)
    assert ops(out) == ["MatMul"] and recs[0]["how"] == "folded"
    _same(model, out, (2, 4, 6))


def test_transpose_of_a_shared_constant_is_not_copied():
    """W feeds a token MatMul through a Transpose and another MatMul directly: folding would store W twice."""
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], name="wT", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["h"], name="mm"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="mm2")]
    model = _model(nodes, [_init("w", rng.standard_normal((5, 6)))], ["N", 4, 6], ["N", 4, 6])
    for fn in (fold_constant_transposes, fuse_matmul_bias):
        out, recs = apply(model, fn)
        assert recs == [] and ops(out) == ops(model) and _weight_bytes(out) == _weight_bytes(model)


@pytest.mark.parametrize("p1,p2,left", [([0, 2, 3, 1], [0, 3, 1, 2], []), ([1, 0, 2, 3], [0, 2, 1, 3], ["Transpose"])])
def test_consecutive_transposes_compose_with_dynamic_batch(p1, p2, left):
    nodes = [helper.make_node("Transpose", ["x"], ["t"], name="t1", perm=p1),
             helper.make_node("Transpose", ["t"], ["u"], name="t2", perm=p2),
             helper.make_node("Relu", ["u"], ["y"], name="relu")]
    x_shape = ["N", 2, 3, 4]
    t_shape = [x_shape[p] for p in p1]
    model = _model(nodes, [], x_shape, [t_shape[p] for p in p2])
    out, recs = apply(model, compose_transposes)
    assert ops(out) == left + ["Relu"] and recs
    _same(model, out, (2, 2, 3, 4) if p1[0] == 0 else (1, 2, 3, 4))


def test_reshapes_merge_and_keep_the_dynamic_batch():
    nodes = [helper.make_node("Unsqueeze", ["x", "ax"], ["u"], name="unsq"),
             helper.make_node("Reshape", ["u", "s1"], ["r"], name="r1"),
             helper.make_node("Reshape", ["r", "s2"], ["y"], name="r2")]
    model = _model(nodes, [_shape("ax", [1]), _shape("s1", [-1, 3, 8]), _shape("s2", [-1, 24])], ["N", 6, 4], ["N", 24])
    out, recs = apply(model, merge_reshapes)
    assert ops(out) == ["Reshape"] and len(recs) == 2
    _same(model, out, (2, 6, 4), (5, 6, 4))


def test_run_time_reshape_target_becomes_a_constant_with_the_batch_as_minus_one():
    """What exporters write for a dynamic batch: Reshape(x, Concat(Shape(x)[0], 24)): 4 nodes go."""
    nodes = [helper.make_node("Shape", ["x"], ["sh"], name="shape"),
             helper.make_node("Gather", ["sh", "i0"], ["n"], name="gather", axis=0),
             helper.make_node("Unsqueeze", ["n", "ax"], ["n1"], name="unsq"),
             helper.make_node("Concat", ["n1", "rest"], ["target"], name="concat", axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"], name="flat")]
    inits = [_shape("i0", 0), _shape("ax", [0]), _shape("rest", [24])]
    model = _model(nodes, inits, ["N", 6, 4], ["N", 24])
    out, recs = apply(model, constant_reshape_targets)
    assert ops(out) == ["Reshape"] and recs == [{"node": "flat", "shape": [-1, 24]}]
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    _same(model, out, (1, 6, 4), (3, 6, 4))


def test_reshape_with_two_unknown_dims_keeps_its_run_time_target():
    nodes = [helper.make_node("Shape", ["x"], ["sh"], name="shape"),
             helper.make_node("Slice", ["sh", "s0", "s2"], ["nl"], name="slice"),
             helper.make_node("Concat", ["nl", "rest"], ["target"], name="concat", axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"], name="r")]
    inits = [_shape("s0", [0]), _shape("s2", [2]), _shape("rest", [2, 2])]
    model = _model(nodes, inits, ["N", "L", 4], ["N", "L", 2, 2])
    out, recs = apply(model, constant_reshape_targets)
    assert recs == [] and ops(out) == ops(model)


def test_reshape_that_copies_input_dims_is_not_merged():
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["r"], name="r1"),
             helper.make_node("Reshape", ["r", "s2"], ["y"], name="r2")]
    model = _model(nodes, [_shape("s1", [2, 12, 2]), _shape("s2", [0, -1])], [2, 6, 4], [2, 24])
    out, recs = apply(model, merge_reshapes)
    assert recs == [] and ops(out) == ["Reshape", "Reshape"]


# ---------------------------------------------------------------- layout chains
def _attention_key_chain(batch):
    """(L, B, C) head split as nn.MultiheadAttention exports it: Reshape, Transpose, Reshape, Transpose."""
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["a"], name="Reshape_4"),
             helper.make_node("Transpose", ["a"], ["b"], name="Transpose_3", perm=[1, 0, 2]),
             helper.make_node("Reshape", ["b", "s2"], ["c"], name="Reshape_7"),
             helper.make_node("Transpose", ["c"], ["y"], name="Transpose_5", perm=[0, 1, 3, 2])]
    inits = [_shape("s1", [5, 4 * batch, 3]), _shape("s2", [batch, 4, 5, 3])]
    return _model(nodes, inits, [5, batch, 12], [batch, 4, 3, 5])


@pytest.mark.parametrize("batch", [1, 2])
def test_layout_chain_becomes_at_most_reshape_and_transpose(batch):
    model = _attention_key_chain(batch)
    out, recs = apply(model, simplify_layout_chains)
    assert len(out.graph.node) == 2 and sorted(ops(out)) == ["Reshape", "Transpose"]
    assert recs[0]["before"] == ["Reshape", "Transpose", "Reshape", "Transpose"]
    assert {n.name for n in out.graph.node} <= {"Reshape_4", "Transpose_3", "Reshape_7", "Transpose_5"}
    _same(model, out, (5, batch, 12))


def test_transposes_that_cancel_through_reshapes_vanish():
    """(1, 6, 4) -> Reshape (6, 1, 4) -> Transpose back to (1, 6, 4) -> Relu: the chain is the identity."""
    nodes = [helper.make_node("Reshape", ["x", "s"], ["a"], name="r"),
             helper.make_node("Transpose", ["a"], ["b"], name="t", perm=[1, 0, 2]),
             helper.make_node("Relu", ["b"], ["y"], name="relu")]
    model = _model(nodes, [_shape("s", [6, 1, 4])], [1, 6, 4], [1, 6, 4])
    out, recs = apply(model, simplify_layout_chains)
    assert ops(out) == ["Relu"] and recs[0]["after"] == []
    _same(model, out, (1, 6, 4))


def test_transpose_moving_only_a_unit_dim_becomes_a_reshape():
    model = _model([helper.make_node("Transpose", ["x"], ["y"], name="t", perm=[1, 0, 2])], [], [1, 6, 4], [6, 1, 4])
    out, recs = apply(model, simplify_layout_chains)
    assert ops(out) == ["Reshape"] and out.graph.node[0].name == "t" and recs[0]["after"] == ["reshape"]
    _same(model, out, (1, 6, 4))


def test_real_transpose_and_dynamic_chains_are_left_alone():
    real = _model([helper.make_node("Transpose", ["x"], ["y"], name="t", perm=[0, 2, 1])], [], [2, 6, 4], [2, 4, 6])
    dyn = _model([helper.make_node("Reshape", ["x", "s"], ["a"], name="r"),
                  helper.make_node("Transpose", ["a"], ["y"], name="t", perm=[0, 2, 1])],
                 [_shape("s", [-1, 3, 8])], ["N", 24], ["N", 8, 3])
    for model in (real, dyn):
        out, recs = apply(model, simplify_layout_chains)
        assert recs == [] and ops(out) == ops(model)


# ---------------------------------------------------------------- unit-axis transposes, reshapes past MatMul
@pytest.mark.parametrize("perm,in_shape", [([1, 0, 2], [1, 6, 4]), ([0, 2, 1, 3], [6, 1, 1, 4]),
                                           ([2, 0, 1], [6, 4, 1]), ([1, 0, 2], [2, 1, 4])])
def test_transpose_that_moves_only_unit_axes_becomes_a_reshape(perm, in_shape):
    out_shape = [in_shape[p] for p in perm]
    model = _model([helper.make_node("Transpose", ["x"], ["y"], name="t", perm=perm)], [], in_shape, out_shape)
    out, recs = apply(model, unit_transposes_to_reshapes)
    assert ops(out) == ["Reshape"] and out.graph.node[0].name == "t" and recs[0]["perm"] == perm
    _same(model, out, tuple(in_shape))


@pytest.mark.parametrize("perm,in_shape", [([0, 2, 1], [1, 6, 4]), ([1, 0, 2], ["N", 6, 4])])
def test_transpose_that_moves_data_or_has_an_unknown_dim_stays(perm, in_shape):
    """(1, 6, 4) -> (1, 4, 6) reorders elements; a dynamic batch is not known to be 1."""
    out_shape = [in_shape[p] for p in perm]
    model = _model([helper.make_node("Transpose", ["x"], ["y"], name="t", perm=perm)], [], in_shape, out_shape)
    out, recs = apply(model, unit_transposes_to_reshapes)
    assert recs == [] and ops(out) == ["Transpose"]


def _reshape_matmul_then(k_kept: bool, after_op: str = "Reshape"):
    """(1, 6, 4) -> Reshape -> MatMul W -> Reshape (6, 5) or Relu; the first Reshape keeps K = 4 or splits it."""
    rng = np.random.default_rng(1)
    first = [6, 1, 4] if k_kept else [6, 2, 2]
    w = rng.standard_normal((first[-1], 5))
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["a"], name="r1"),
             helper.make_node("MatMul", ["a", "w"], ["b"], name="mm")]
    inits = [_shape("s1", first), _init("w", w)]
    if after_op == "Reshape":
        nodes.append(helper.make_node("Reshape", ["b", "s2"], ["y"], name="r2"))
        inits.append(_shape("s2", [-1, 5]))
        out_shape = [6 if k_kept else 12, 5]
    else:
        nodes.append(helper.make_node("Relu", ["b"], ["y"], name="relu"))
        out_shape = first[:-1] + [5]
    return _model(nodes, inits, [1, 6, 4], out_shape)


def test_reshape_keeping_the_contracted_axis_sinks_below_the_matmul_and_merges():
    model = _reshape_matmul_then(True)
    out, recs = apply(model, sink_reshapes_through_matmuls)
    assert recs == [{"node": "r1", "matmul": "mm"}] and ops(out) == ["MatMul", "Reshape", "Reshape"]
    assert out.graph.node[0].input[0] == "x"
    _same(model, out, (1, 6, 4))
    merged, _ = apply(out, merge_reshapes)
    assert ops(merged) == ["MatMul", "Reshape"]
    _same(model, merged, (1, 6, 4))


@pytest.mark.parametrize("k_kept,after_op", [(False, "Reshape"), (True, "Relu")])
def test_reshape_is_not_sunk_when_it_splits_the_contracted_axis_or_nothing_would_merge(k_kept, after_op):
    model = _reshape_matmul_then(k_kept, after_op)
    out, recs = apply(model, sink_reshapes_through_matmuls)
    assert recs == [] and ops(out) == ops(model)


# ---------------------------------------------------------------- through canonicalize / optimize
def test_canonicalize_reports_the_fusions():
    model = _token_mlp(False)
    out, done = apply(model, canonicalize)
    assert done["matmul_bias_fused"] and len(out.graph.node) < len(model.graph.node)
    _same(model, out, (2, 4, 6))
    _, again = apply(out, canonicalize)  # a fixed point: nothing left to report
    assert not any(again.values())


class _TinyAttention(nn.Module):
    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.Linear(16, dim))
        with torch.no_grad():
            self.attn.in_proj_bias.normal_()  # the default zero bias would hide the bias fusion

    def forward(self, x):  # (N, L, C), batch-first around a sequence-first attention
        t = x.transpose(0, 1)
        t = self.attn(t, t, t, need_weights=False)[0].transpose(0, 1)
        return self.mlp(x + t)


def test_tiny_attention_block_loses_nodes_and_stays_exact(monkeypatch):
    torch.manual_seed(0)
    model = export_module(_TinyAttention(), (1, 6, 8))
    x = randn(16, 6, 8)
    res = optimize(model, x, x, SurgeryOptions(strip_activations=False, simplify_layout_chains=True))
    passes = {c["pass"] for c in res.report["changes"]["canonicalized"]}
    assert {"layout_chains_simplified", "matmul_bias_fused"} <= passes
    default = optimize(model, x, x, SurgeryOptions(strip_activations=False))  # layout chains are opt-in
    assert "layout_chains_simplified" not in {c["pass"] for c in default.report["changes"]["canonicalized"]}
    assert len(res.model.graph.node) <= len(default.model.graph.node)
    import egp_deploy.surgery.canonicalize as canon

    monkeypatch.setattr(canon, "fuse_linear_ops", lambda graph, **kw: {})  # the pipeline without the new passes
    without = optimize(model, x, x, SurgeryOptions(strip_activations=False)).model
    assert len(res.model.graph.node) < len(without.graph.node)
    assert res.report["verification"]["calibration"]["rel_error"] <= TOL
    y = randn(1, 6, 8, seed=3)
    assert rel_error(outputs(model, y), outputs(res.model, y)) <= TOL



@pytest.mark.parametrize("seed", range(24))
def test_random_static_layout_chains_stay_exact(seed):
    """Random Reshape/Transpose/Unsqueeze chains: never more nodes, same numbers as the chain."""
    rng = np.random.default_rng(seed)
    shape = [int(d) for d in rng.choice([1, 2, 3, 4], size=int(rng.integers(2, 5)))]
    nodes, inits, src = [], [], "x"
    current = list(shape)
    for i in range(int(rng.integers(2, 6))):
        dst = f"t{i}"
        kind = rng.choice(["transpose", "reshape", "unsqueeze"])
        if kind == "transpose":
            perm = [int(p) for p in rng.permutation(len(current))]
            nodes.append(helper.make_node("Transpose", [src], [dst], name=f"n{i}", perm=perm))
            current = [current[p] for p in perm]
        elif kind == "unsqueeze":
            axis = int(rng.integers(0, len(current) + 1))
            inits.append(_shape(f"a{i}", [axis]))
            nodes.append(helper.make_node("Unsqueeze", [src, f"a{i}"], [dst], name=f"n{i}"))
            current = current[:axis] + [1] + current[axis:]
        else:  # regroup the elements into a random factorisation of the same size
            factors = [p for d in current for p in ([2, d // 2] if d == 4 and rng.random() < 0.5 else [d])]
            factors = [f for f in factors if f != 1 or rng.random() < 0.5]
            rng.shuffle(factors)
            current = factors or [1]
            inits.append(_shape(f"s{i}", current))
            nodes.append(helper.make_node("Reshape", [src, f"s{i}"], [dst], name=f"n{i}"))
        src = dst
    nodes.append(helper.make_node("Relu", [src], ["y"], name="relu"))
    model = _model(nodes, inits, shape, current)
    out, _ = apply(model, simplify_layout_chains)
    assert len(out.graph.node) <= len(model.graph.node) and len(out.graph.node) <= 4
    _same(model, out, tuple(shape))


@pytest.mark.parametrize("with_bias", [False, True])
def test_rank2_matmul_chain_is_still_merged_into_one_layer(with_bias):
    """MatMul chains belong to merge_linear (it reads MatMuls): the Gemm fusion must not get there first."""
    rng = np.random.default_rng(8)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1")]
    src = "h"
    if with_bias:
        nodes.append(helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"))
        src = "hb"
    nodes += [helper.make_node("MatMul", [src, "w2"], ["h2"], name="mm2"),
              helper.make_node("Add", ["h2", "b2"], ["y"], name="bias2")]
    inits = [_init("w1", rng.standard_normal((6, 3))), _init("w2", rng.standard_normal((3, 5))),
             _init("b1", rng.standard_normal(3)), _init("b2", rng.standard_normal(5))]
    model = _model(nodes, inits, ["N", 6], ["N", 5])
    x = randn(32, 6)
    res = optimize(model, x, x, SurgeryOptions(strip_activations=False))
    assert ops(res.model) == ["Gemm"] and res.report["changes"]["merged"]
    _same(model, res.model, (4, 6))
