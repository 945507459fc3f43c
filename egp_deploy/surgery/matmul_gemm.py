"""MatMul(x, W) + b with constant 2-D W and a bias along the last axis -> one Gemm (named as the
MatMul, so module names still resolve). For rank-2 x a Transpose on x or on W is absorbed as
transA/transB. Gemm needs rank-2 inputs, so for token tensors (N, L, C) the fusion is
Reshape(-1, K) -> Gemm -> Reshape and is only made where both Reshapes merge into neighbouring
reshapes (otherwise MatMul + Add is already the smallest form). MatMul chains are left to merge_linear.
Exact algebra (a Gemm sums in a different order than MatMul + Add: fp32 rounding).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from egp_deploy.surgery._graph import const_value, fresh_name, new_const, only_consumer, producer
from egp_deploy.surgery.layout_ops import RESHAPE_LIKE, _clear, _is_floating, _perm, _rank, _shape_copies_input_dims


def _bias_vector(add: gs.Node, mm_out: gs.Tensor, m: int, out_rank: int | None) -> np.ndarray | None:
    """The constant operand of Add(mm_out, b) as (M,) when it broadcasts along the last axis only."""
    if add.op != "Add" or len(add.inputs) != 2 or sum(t is mm_out for t in add.inputs) != 1:
        return None
    b = const_value(add.inputs[1] if add.inputs[0] is mm_out else add.inputs[0])
    if b is None or not _is_floating(b) or out_rank is None or b.ndim > out_rank:
        return None
    if b.size == 1:
        return np.full((m,), b.reshape(()), dtype=b.dtype)
    if b.shape[-1] != m or any(d != 1 for d in b.shape[:-1]):
        return None
    return b.reshape(m)


def _weight_operand(node: gs.Node) -> tuple[gs.Tensor, np.ndarray, bool, gs.Node | None] | None:
    """(constant, value as (K, M), transB, absorbed Transpose) for MatMul's right operand."""
    b = node.inputs[1]
    w = const_value(b)
    if w is not None:
        return (b, w, False, None) if w.ndim == 2 and _is_floating(w) else None
    t = producer(b)
    if t is not None and t.op == "Transpose" and len(b.outputs) == 1:
        c = const_value(t.inputs[0])
        if c is not None and c.ndim == 2 and _is_floating(c) and _perm(t) == [1, 0]:
            return t.inputs[0], c.T, True, t
    return None


def _constant_matmul(node: gs.Node | None) -> bool:
    return (node is not None and node.op == "MatMul" and len(node.inputs) == 2
            and (w := const_value(node.inputs[1])) is not None and w.ndim == 2)


def _in_matmul_chain(graph: gs.Graph, node: gs.Node, out: gs.Tensor) -> bool:
    """x @ W1 [+ b1] @ W2 is merge_linear's to merge (it only reads MatMuls): leave such chains alone."""
    p = producer(node.inputs[0])
    if p is not None and p.op == "Add" and len(p.inputs) == 2:
        live = [t for t in p.inputs if const_value(t) is None]
        p = producer(live[0]) if len(live) == 1 else None
    nxt = only_consumer(out, graph)
    return _constant_matmul(p) or (_constant_matmul(nxt) and nxt.inputs[0] is out)


def fuse_matmul_bias(graph: gs.Graph) -> list[dict[str, Any]]:
    """MatMul(x, W) [+ b] -> Gemm (see the module docstring); returns one record per fusion."""
    records = []
    for node in list(graph.nodes):
        if node.op != "MatMul" or len(node.inputs) != 2 or not isinstance(node.inputs[0], gs.Variable):
            continue
        if not node.outputs:  # cleared by an earlier fusion in this sweep
            continue
        weight = _weight_operand(node)
        x, mm_out = node.inputs[0], node.outputs[0]
        rank = _rank(x)
        if weight is None or rank is None or rank < 2:
            continue
        w_tensor, w, trans_b, w_transpose = weight
        k, m = w.shape
        add = only_consumer(mm_out, graph)  # None when mm_out is a graph output: it must stay
        bias = _bias_vector(add, mm_out, m, rank) if add is not None else None
        if bias is None:
            add = None
        elif bias.dtype != w.dtype:
            continue
        if _in_matmul_chain(graph, node, add.outputs[0] if add is not None else mm_out):
            continue
        if rank == 2:
            x_transpose = producer(x)
            trans_a = (x_transpose is not None and x_transpose.op == "Transpose" and _perm(x_transpose) == [1, 0]
                       and only_consumer(x, graph) is node)
            if not (add or trans_a or w_transpose):
                continue  # a lone MatMul: Gemm would not save a node
            data = x_transpose.inputs[0] if trans_a else x
            out = add.outputs[0] if add is not None else mm_out
            inputs = [data, w_tensor] + ([new_const(bias, node.name + ".bias")] if add is not None else [])
            gemm = gs.Node("Gemm", name=node.name, attrs={"alpha": 1.0, "beta": 1.0, "transA": int(trans_a),
                                                          "transB": int(trans_b)}, inputs=inputs, outputs=[out])
            absorbed = [n.name for n in (add, x_transpose if trans_a else None, w_transpose) if n is not None]
            _clear(node, add, x_transpose if trans_a else None, w_transpose)
            graph.nodes.append(gemm)
            records.append({"node": gemm.name, "absorbed": absorbed, "rank": 2})
            continue
        # Token tensors: only where Reshape(-1, K) / Reshape back merge into the reshapes around.
        before = producer(x)
        after = only_consumer(add.outputs[0], graph) if add is not None else None
        if (add is None or before is None or before.op not in RESHAPE_LIKE or only_consumer(x, graph) is not node
                or after is None or after.op != "Reshape" or after.inputs[0] is not add.outputs[0]
                or _shape_copies_input_dims(after)):
            continue
        flat = gs.Variable(fresh_name(node.name + "_2d_in"), dtype=x.dtype)
        gemm_out = gs.Variable(fresh_name(node.name + "_2d_out"), dtype=mm_out.dtype)
        to_2d = gs.Node("Reshape", name=before.name, inputs=[before.inputs[0], new_const(np.array([-1, k], np.int64),
                                                                                          before.name + ".shape")],
                        outputs=[flat])
        gemm = gs.Node("Gemm", name=node.name, attrs={"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": int(trans_b)},
                       inputs=[flat, w_tensor, new_const(bias, node.name + ".bias")], outputs=[gemm_out])
        absorbed = [n.name for n in (before, add, w_transpose) if n is not None]
        _clear(node, add, before, w_transpose)
        after.inputs[0] = gemm_out
        graph.nodes.extend([to_2d, gemm])
        records.append({"node": gemm.name, "absorbed": absorbed, "rank": rank, "reshapes_merged": [to_2d.name, after.name]})
    graph.cleanup().toposort()
    return records
