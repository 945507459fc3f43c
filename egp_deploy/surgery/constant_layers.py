"""Tensors constant in every channel become constants, folded forward (an all-zero layer becomes its
bias; a residual branch that became constant becomes a bias add).

The constant stands in for the tensor with a batch of 1; it is carried forward through every op that
treats the batch axis as an independent axis (element-wise ops, layers, pooling, and layout ops that
keep axis 0 by itself: the permutes and transposes around a ConvNeXt or token-mixing MLP), down to
where it meets live data: a broadcast Add/Mul (the residual add), a channel Concat whose readers
can take the constant slice into their weights (concat_constants.py), or, with a static batch of 1,
any Concat (the stand-in is then the tensor itself).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from egp_deploy.surgery._graph import const_value, new_const, redirect, spatial_static, static_shape
from egp_deploy.surgery.concat_constants import (
    absorb_concat_constants, concat_region, is_channel_concat, sample_independent,
)
from egp_deploy.surgery.constant_channels import BINARY, POOLS, UNARY_FN, UNARY_OTHER, constant_channels
from egp_deploy.surgery.layout_ops import _perm


_CONST_SAFE = set(UNARY_FN) | UNARY_OTHER | set(BINARY) | POOLS | {
    "Conv", "Gemm", "MatMul", "BatchNormalization", "Clip", "PRelu", "Flatten"}


def constant_layers_to_constants(graph: gs.Graph, module_of: Callable[[str], str | None] = lambda n: None
                                 ) -> list[dict[str, Any]]:
    """Tensors constant in every channel (static shape) become a (1, C, ...) constant; what reads only
    constants is then folded by constant folding, down to the next broadcast Add/Mul with live data.
    A channel Concat that the constant reaches loses that input: its readers absorb it."""
    info = constant_channels(graph)
    records = []
    concats: dict[str, tuple[gs.Node, list[dict[str, Any]]]] = {}  # Concat reached -> the records that reached it
    for node in list(graph.nodes):
        if not node.outputs or len(node.outputs) != 1:
            continue
        t = node.outputs[0]
        i = info.get(t.name)
        if i is None or not i[0].all() or not spatial_static(t) or t in graph.outputs:
            continue
        live_inputs = [x for x in node.inputs if isinstance(x, gs.Variable)]
        if not live_inputs or all(x.name in info and info[x.name][0].all() for x in live_inputs):
            continue  # not where constness starts
        found = _constant_closure(graph, t)
        if found is None:
            continue
        folded, reached = found
        shape = [1] + [int(d) for d in static_shape(t)[1:]]
        value = np.broadcast_to(i[1].reshape((-1,) + (1,) * (len(shape) - 2)), shape[1:])[None]
        const = new_const(np.ascontiguousarray(value, dtype=np.float32), t.name + ".const")
        if redirect(graph, t, const):
            names = [node.name] + folded
            record = {"producer": node.name, "module": module_of(node.name),
                      "folded_nodes": names, "folded_modules": [module_of(n) or n for n in names]}
            records.append(record)
            for c in reached:
                concats.setdefault(c.name, (c, []))[1].append(record)
    # Only now, with every constant in place: a Concat two constant branches reach may be all constant
    # (then it was folded as part of the second closure and stays as it is).
    constant = sample_independent(graph)
    for concat, reached_by in concats.values():
        done = absorb_concat_constants(graph, concat, constant)
        if done:
            done["reader_modules"] = [module_of(n) or n for n in done["readers"]]
            for record in reached_by:
                record.setdefault("concats", []).append(done)
    return records


def _keeps_batch_axis(node: gs.Node) -> bool:
    """A layout op whose axis 0 stays axis 0, alone: a batch-1 stand-in is then still one."""
    x, y = static_shape(node.inputs[0]), static_shape(node.outputs[0])
    if x is None or y is None or not x or not y:
        return False
    if node.op == "Transpose":
        perm = _perm(node)
        return perm is not None and perm[0] == 0
    if node.op == "Flatten":
        axis = int(node.attrs.get("axis", 1))
        return (axis + len(x) if axis < 0 else axis) >= 1
    if node.op in ("Squeeze", "Unsqueeze"):
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
            axes = const_value(node.inputs[1])
        if axes is None:  # Squeeze of every unit dim would drop a batch of 1
            return False
        rank = len(x) if node.op == "Squeeze" else len(y)
        return all((int(a) + rank if int(a) < 0 else int(a)) != 0 for a in np.asarray(axes).reshape(-1))
    if node.op == "Reshape":
        target = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if target is None or target.ndim != 1 or target.size == 0 or x[0] != y[0]:
            return False
        first = int(target[0])
        if first == 0:  # copies the batch dim
            return not node.attrs.get("allowzero", 0)
        if first == -1:  # the rest is one sample's shape, so a batch of 1 stays 1
            return all(int(d) >= 0 for d in target[1:])
        return first == 1 and x[0] == 1
    return False


def _const_safe(node: gs.Node) -> bool:
    if node.op in _CONST_SAFE:
        return True
    if node.op == "Concat":  # of constants only: any axis but the batch's
        rank = len(static_shape(node.outputs[0]) or [])
        axis = int(node.attrs.get("axis", 0))
        return rank > 0 and (axis + rank if axis < 0 else axis) != 0
    return node.op in ("Transpose", "Flatten", "Squeeze", "Unsqueeze", "Reshape") and _keeps_batch_axis(node)


def _constant_closure(graph: gs.Graph, t: gs.Tensor) -> tuple[list[str], list[gs.Node]] | None:
    """(Nodes that become constant if ``t`` is, channel Concats it reaches next to live inputs); None
    when the constant would reach a graph output or an op where a batch-1 constant could change the
    result's shape."""
    const_tensors = {t.name}
    closure, concats = [], []
    for node in graph.nodes:
        ins = [x for x in node.inputs if isinstance(x, gs.Variable)]
        hit = [x for x in ins if x.name in const_tensors]
        if not hit:
            continue
        if len(hit) == len(ins):
            if not _const_safe(node):
                return None
            if any(o in graph.outputs for o in node.outputs):
                return None
            closure.append(node.name)
            const_tensors.update(o.name for o in node.outputs)
        elif is_channel_concat(node) and concat_region(graph, node) is not None:
            concats.append(node)
        elif node.op == "Concat" and _const_safe(node) and (static_shape(node.outputs[0]) or [None])[0] == 1:
            continue  # a static batch of 1: the stand-in is the tensor itself, a valid Concat input
        elif node.op not in BINARY:
            return None
    return closure, concats
