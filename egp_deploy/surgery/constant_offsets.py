"""Constant offsets that collapsed layers leave behind, moved out of the way (exact).

When a residual branch of a ResNet block collapses, the block becomes ``relu(r + c)`` with ``r`` the
output of the previous block's ReLU and ``c`` the branch's constant. Two exact rules turn that
into less depth:

* ``relu(relu(x) + c) == relu(x + min(c, 0)) + max(c, 0)`` element-wise for any constant ``c``
  (c >= 0: relu(x) + c is never negative; c < 0: where x < 0 both sides are 0). The inner offset
  folds into the layer that produced ``x``; the outer ReLU is gone.
* a per-channel constant added before a layer that does not pad (1x1 convs, Gemm, through global
  pooling and Flatten) folds into that layer's bias: ``W (x + c) + b == W x + (W c + b)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from egp_deploy.surgery._graph import (
    bypass, fresh_name, channel_vector, constant_operand, conv_attrs, conv_weights, dense_conv_weight, gemm_weights,
    has_padding, new_const, only_consumer, producer, set_conv_weights, set_gemm_weights, static_shape,
)


def _broadcast_keeps_shape(c: np.ndarray, x: gs.Tensor) -> bool:
    """True when adding ``c`` to ``x`` cannot change x's shape (the rewrite moves ``c`` elsewhere)."""
    xs = static_shape(x)
    if xs is None or c.ndim > len(xs):
        return False
    for dc, dx in zip(c.shape[::-1], xs[::-1]):
        if dc != 1 and dc != dx:
            return False
    return True


def merge_constant_adds(graph: gs.Graph) -> list[dict[str, Any]]:
    """(x + a) + b -> x + (a + b) when the inner sum feeds nothing else (a split leaves such pairs)."""
    done = []
    for outer in list(graph.nodes):
        operand = constant_operand(outer)
        if operand is None:
            continue
        mid, b, _ = operand
        inner = producer(mid) if isinstance(mid, gs.Variable) else None
        if inner is None or only_consumer(mid, graph) is not outer:
            continue
        inner_operand = constant_operand(inner)
        if inner_operand is None:
            continue
        x, a, _ = inner_operand
        if a.dtype != b.dtype:
            continue
        total = a + b
        if not _broadcast_keeps_shape(total, x) or static_shape(x) != static_shape(outer.outputs[0]):
            continue
        outer.inputs = [x, new_const(total, outer.name + ".offset")]
        done.append({"node": outer.name, "absorbed": inner.name})
    if done:
        graph.cleanup().toposort()
    return done


def split_relu_offsets(graph: gs.Graph) -> list[dict[str, Any]]:
    """relu(relu(x) + c) -> relu(x + min(c, 0)) + max(c, 0): one rectifier fewer per match."""
    done = []
    for outer in list(graph.nodes):
        if outer.op != "Relu" or not outer.inputs or not outer.outputs:
            continue
        add = producer(outer.inputs[0])
        if add is None or only_consumer(outer.inputs[0], graph) is not outer:
            continue
        operand = constant_operand(add)
        if operand is None:
            continue
        r, c, _ = operand
        inner = producer(r) if isinstance(r, gs.Variable) else None
        if inner is None or inner.op != "Relu" or only_consumer(r, graph) is not add:
            continue
        if not _broadcast_keeps_shape(c, r) or c.dtype != np.float32:
            continue
        low, high = np.minimum(c, 0).astype(np.float32), np.maximum(c, 0).astype(np.float32)
        x = inner.inputs[0]
        if np.any(low != 0):
            # fresh names: a later round can split the same rectifier again
            shifted = gs.Variable(fresh_name(x.name + "__offset"), dtype=x.dtype, shape=x.shape)
            graph.nodes.append(gs.Node("Add", name=fresh_name(inner.name + "/egp_offset"),
                                       inputs=[x, new_const(low, inner.name + ".offset")], outputs=[shifted]))
            inner.inputs = [shifted]
        add.inputs = [r, new_const(high, add.name + ".offset")]
        name = outer.name
        if bypass(graph, outer):
            done.append({"node": name, "into": inner.name, "negative_offsets": int((low != 0).sum()),
                         "positive_offsets": int((high != 0).sum())})
    if done:
        graph.cleanup().toposort()
    return done


def _channel_vector(c: np.ndarray, x: gs.Tensor) -> np.ndarray | None:
    """``c`` as a (C,) float64 vector when it is constant along everything but dim 1 of ``x``."""
    xs = static_shape(x)
    if xs is None or len(xs) < 2 or not isinstance(xs[1], (int, np.integer)):
        return None
    vec = channel_vector(c, len(xs), int(xs[1]))
    return None if vec is None else vec.astype(np.float64)


def push_constant_adds(graph: gs.Graph) -> list[dict[str, Any]]:
    """Move per-channel constant Adds forward through global pooling / Flatten and into the bias of
    the next unpadded Conv or Gemm."""
    done = []
    changed = True
    while changed:
        changed = False
        for add in list(graph.nodes):
            operand = constant_operand(add)
            if operand is None or not add.outputs:
                continue
            x, c, _ = operand
            vec = _channel_vector(c, x)
            nxt = only_consumer(add.outputs[0], graph)
            if vec is None or nxt is None or not _broadcast_keeps_shape(c, x):
                continue
            rec = _push_one(graph, add, x, vec, nxt)
            if rec:
                done.append(rec)
                changed = True
                break
    if done:
        graph.cleanup().toposort()
    return done


def _push_one(graph: gs.Graph, add: gs.Node, x: gs.Tensor, vec: np.ndarray, nxt: gs.Node) -> dict | None:
    y = add.outputs[0]
    if nxt.op == "GlobalAveragePool" or (nxt.op == "Flatten" and nxt.attrs.get("axis", 1) == 1
                                         and (static_shape(x) or [0])[2:] == [1] * (len(static_shape(x)) - 2)):
        # mean(x + c) = mean(x) + c, flatten(x + c) = flatten(x) + c: swap the two nodes
        out = nxt.outputs[0]
        rank = len(static_shape(out) or [])
        if rank < 2:
            return None
        nxt.inputs = [x]
        moved = gs.Variable(fresh_name(out.name + "__pre_offset"), dtype=out.dtype, shape=out.shape)
        nxt.outputs = [moved]
        add.inputs = [moved, new_const(vec.astype(np.float32).reshape((1, -1) + (1,) * (rank - 2)),
                                               add.name + ".offset")]
        add.outputs = [out]
        return {"node": add.name, "through": nxt.name}
    if nxt.op == "Conv" and nxt.inputs[0] is y:
        wb = conv_weights(nxt)
        if wb is None:
            return None
        w, b = wb
        attrs = conv_attrs(nxt, w.shape)
        if attrs is None or has_padding(attrs):
            return None  # at a zero-padded border the constant is position-dependent
        dense = dense_conv_weight(w, int(nxt.attrs.get("group", 1))).astype(np.float64)
        if dense.shape[1] != vec.shape[0]:
            return None
        shift = dense.reshape(dense.shape[0], dense.shape[1], -1).sum(axis=2) @ vec
        base = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
        set_conv_weights(nxt, w, (base + shift).astype(np.float32))
    elif nxt.op == "Gemm" and nxt.inputs[0] is y and len(static_shape(y) or []) == 2:
        wc = gemm_weights(nxt)
        if wc is None:
            return None
        w, bias = wc
        if w.shape[0] != vec.shape[0]:
            return None
        base = np.zeros(w.shape[1]) if bias is None else bias.astype(np.float64)
        set_gemm_weights(nxt, w, (base + vec @ w.astype(np.float64)).astype(np.float32))
    else:
        return None
    nxt.inputs = [x] + list(nxt.inputs[1:])
    add.inputs.clear()
    add.outputs.clear()
    return {"node": add.name, "into": nxt.name}
