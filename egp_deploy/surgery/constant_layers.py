"""Tensors constant in every channel become constants, folded forward (an all-zero layer becomes its
bias; a residual branch that became constant becomes a bias add)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from egp_deploy.surgery._graph import new_const, redirect, spatial_static, static_shape
from egp_deploy.surgery.constant_channels import BINARY, POOLS, UNARY_FN, UNARY_OTHER, constant_channels


_CONST_SAFE = set(UNARY_FN) | UNARY_OTHER | set(BINARY) | POOLS | {
    "Conv", "Gemm", "MatMul", "BatchNormalization", "Clip", "PRelu", "Flatten"}


def constant_layers_to_constants(graph: gs.Graph, module_of: Callable[[str], str | None] = lambda n: None
                                 ) -> list[dict[str, Any]]:
    """Tensors constant in every channel (static shape) become a (1, C, ...) constant; what reads only
    constants is then folded by constant folding, down to the next broadcast Add/Mul with live data."""
    info = constant_channels(graph)
    records = []
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
        folded = _constant_closure(graph, t)
        if folded is None:
            continue
        shape = [1] + [int(d) for d in static_shape(t)[1:]]
        value = np.broadcast_to(i[1].reshape((-1,) + (1,) * (len(shape) - 2)), shape[1:])[None]
        const = new_const(np.ascontiguousarray(value, dtype=np.float32), t.name + ".const")
        if redirect(graph, t, const):
            names = [node.name] + folded
            records.append({"producer": node.name, "module": module_of(node.name),
                            "folded_nodes": names, "folded_modules": [module_of(n) or n for n in names]})
    return records


def _constant_closure(graph: gs.Graph, t: gs.Tensor) -> list[str] | None:
    """Nodes that become constant if ``t`` is; None when the constant would reach a graph output or
    an op where a batch-1 constant could change the result's shape."""
    const_tensors = {t.name}
    closure = []
    for node in graph.nodes:
        ins = [x for x in node.inputs if isinstance(x, gs.Variable)]
        hit = [x for x in ins if x.name in const_tensors]
        if not hit:
            continue
        if len(hit) == len(ins):
            if node.op not in _CONST_SAFE:
                return None
            if any(o in graph.outputs for o in node.outputs):
                return None
            closure.append(node.name)
            const_tensors.update(o.name for o in node.outputs)
        elif node.op not in BINARY:
            return None
    return closure
