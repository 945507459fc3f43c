"""Dead hidden units of token MLPs, removed exactly by narrowing both linear layers.

A transformer MLP as the exporters write it: ``fc1 = MatMul(x, W1)`` on (N, L, C) or (N, H, W, C)
activations, a bias Add, an element-wise activation (GELU as one op, or its Erf/Tanh arithmetic, or
any chain of unary/binary element-wise ops with scalar or per-unit constants), then
``fc2 = MatMul(h, W2)``. Hidden unit j lives on the LAST axis, which the channel groups of
dead_channels.py (dim 1) do not see. Unit j is

* constant when column j of W1 is zero: its pre-activation is b1[j], its activation a fixed
  value f(b1[j]) (computed with dead_channels' element-wise functions), which moves into fc2's bias
  as f(b1[j]) * W2[j];
* unused when row j of W2 is zero.

Either way W1 loses column j, every per-unit constant of the activation loses entry j and W2 loses
row j. An all-zero W1 is not handled here: constant_layers_to_constants folds the whole branch.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from egp_deploy.surgery._graph import const_value, fresh_name, new_const, static_shape
from egp_deploy.surgery.constant_channels import BINARY, UNARY_FN
from egp_deploy.surgery.dead_channels import aligned_keep


def _weight(node: gs.Node | None) -> np.ndarray | None:
    """The constant 2-D right operand of a MatMul whose left operand is live data."""
    if node is None or node.op != "MatMul" or len(node.inputs) != 2 or not isinstance(node.inputs[0], gs.Variable):
        return None
    w = const_value(node.inputs[1])
    return w if w is not None and w.ndim == 2 and w.dtype == np.float32 else None


def _unit_constant(c: np.ndarray, rank: int, units: int) -> bool:
    """A scalar, or a constant that varies only along the last axis (size ``units``)."""
    if c.size == 1:
        return c.ndim <= rank
    return c.ndim <= rank and c.shape[-1] == units and all(d == 1 for d in c.shape[:-1])


def _activation_region(graph: gs.Graph, fc1: gs.Node, units: int):
    """(element-wise nodes between fc1 and fc2, fc2) when fc1's output reaches exactly one MatMul with
    constant weights through element-wise ops only; None otherwise."""
    start = fc1.outputs[0]
    shape = static_shape(start)
    if shape is None or shape[-1] != units:
        return None
    rank = len(shape)
    region, members, exits, seen = {start.name}, [], [], set()
    frontier = [start]
    while frontier:
        t = frontier.pop()
        if t in graph.outputs:
            return None
        for node in t.outputs:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if _weight(node) is not None and node.inputs[0] is t:
                exits.append(node)
                continue
            if len(node.outputs) != 1 or static_shape(node.outputs[0]) != shape:
                return None
            if node.op in BINARY and len(node.inputs) == 2:
                ok = True
                for x in node.inputs:  # live inputs must be region tensors: checked once the walk is done
                    c = const_value(x)
                    if c is not None:
                        ok &= _unit_constant(c, rank, units)
                if not ok:
                    return None
            elif node.op in UNARY_FN or node.op == "Clip":
                if any(i > 0 and x.name and const_value(x) is None for i, x in enumerate(node.inputs)):
                    return None
            else:
                return None
            members.append(node)
            region.add(node.outputs[0].name)
            frontier.append(node.outputs[0])
    if len(exits) != 1:
        return None
    # a binary member may read a region tensor found later in the walk: check every live input now
    for node in members:
        if any(isinstance(x, gs.Variable) and x.name not in region for x in node.inputs):
            return None
    return _toposorted(members), exits[0]


def _toposorted(members: list[gs.Node]) -> list[gs.Node]:
    done: set[str] = set()
    out: list[gs.Node] = []
    names = {n.outputs[0].name for n in members}
    pending = list(members)
    while pending:
        for n in list(pending):
            if all(not isinstance(x, gs.Variable) or x.name not in names or x.name in done for x in n.inputs):
                out.append(n)
                done.add(n.outputs[0].name)
                pending.remove(n)
    return out


def _evaluate(members: list[gs.Node], start: str, value: np.ndarray) -> dict[str, np.ndarray]:
    """Every region tensor as a per-unit vector when fc1 outputs ``value`` (float64) at every position."""
    vals = {start: value}
    for node in members:
        if node.op in BINARY:
            a, b = (vals[x.name] if const_value(x) is None else const_value(x).astype(np.float64).reshape(-1)
                    for x in node.inputs)
            with np.errstate(all="ignore"):
                vals[node.outputs[0].name] = BINARY[node.op](a, b)
        elif node.op == "Clip":
            lo = const_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None
            hi = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
            lo = node.attrs.get("min", -np.inf) if lo is None else float(lo.reshape(()))
            hi = node.attrs.get("max", np.inf) if hi is None else float(hi.reshape(()))
            vals[node.outputs[0].name] = np.clip(vals[node.inputs[0].name], lo, hi)
        else:
            with np.errstate(all="ignore"):
                vals[node.outputs[0].name] = UNARY_FN[node.op](vals[node.inputs[0].name], node)
    return vals


def _fc2_bias_add(graph: gs.Graph, fc2: gs.Node, width: int) -> tuple[gs.Node, int] | None:
    """The Add of a per-output constant right after fc2 (its bias), with the constant's input index."""
    out = fc2.outputs[0]
    if out in graph.outputs or len(out.outputs) != 1:
        return None
    add = out.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    for ci in (0, 1):
        c = const_value(add.inputs[ci])
        if c is not None and add.inputs[1 - ci] is out and c.dtype == np.float32 and c.ndim == 1 \
                and c.shape[0] == width:
            return add, ci
    return None


def narrow_token_mlps(graph: gs.Graph, module_of: Callable[[str], str | None] = lambda n: None,
                      channel_multiple: int = 1) -> list[dict[str, Any]]:
    """One pass over all fc1 -> activation -> fc2 patterns; a record per MLP that lost hidden units."""
    records = []
    for fc1 in list(graph.nodes):
        w1 = _weight(fc1)
        if w1 is None or not fc1.outputs or not np.any(w1):
            continue
        units = w1.shape[1]
        found = _activation_region(graph, fc1, units)
        if found is None:
            continue
        members, fc2 = found
        w2 = _weight(fc2)
        if w2.shape[0] != units:
            continue
        constant = ~np.any(w1, axis=0)
        unused = ~np.any(w2, axis=1)
        keep = aligned_keep(constant | unused, channel_multiple)
        if keep.all():
            continue
        removed = ~keep
        vals = _evaluate(members, fc1.outputs[0].name, np.zeros(units))
        h = vals[fc2.inputs[0].name]
        moved = np.where(removed & constant & ~unused, h, 0.0)
        if not np.all(np.isfinite(moved)):
            continue
        shift = moved @ w2.astype(np.float64)  # what the removed constant units added to fc2's output
        bias = _fc2_bias_add(graph, fc2, w2.shape[1])
        if np.any(shift != 0) and bias is None:
            _append_bias(graph, fc2, shift.astype(np.float32))
        elif bias is not None:
            add, ci = bias
            add.inputs[ci] = new_const((const_value(add.inputs[ci]) + shift).astype(np.float32), add.name + ".bias")
        fc1.inputs[1] = new_const(np.ascontiguousarray(w1[:, keep]), fc1.name + ".weight")
        fc2.inputs[1] = new_const(np.ascontiguousarray(w2[keep]), fc2.name + ".weight")
        new_units = int(keep.sum())
        for node in members:
            for i, x in enumerate(node.inputs):
                c = const_value(x)
                if c is not None and c.size == units and c.size > 1:
                    node.inputs[i] = new_const(np.ascontiguousarray(c[..., keep]), node.name + ".c")
        for t in [fc1.outputs[0]] + [n.outputs[0] for n in members]:
            t.shape = list(t.shape[:-1]) + [new_units]
        records.append({
            "fc1": fc1.name, "fc2": fc2.name, "modules": [module_of(fc1.name) or fc1.name, module_of(fc2.name) or fc2.name],
            "units_before": units, "units_after": new_units,
            "constant": int((removed & constant).sum()), "unused": int((removed & unused & ~constant).sum()),
        })
    if records:
        graph.cleanup().toposort()
    return records


def _append_bias(graph: gs.Graph, fc2: gs.Node, bias: np.ndarray) -> None:
    out = fc2.outputs[0]
    mid = gs.Variable(fresh_name(out.name + ".pre_bias"), dtype=out.dtype, shape=out.shape)
    fc2.outputs = [mid]
    graph.nodes.append(gs.Node("Add", name=fresh_name((fc2.name or "fc2") + "/egp_bias"),
                               inputs=[mid, new_const(bias, (fc2.name or "fc2") + ".bias")], outputs=[out]))
