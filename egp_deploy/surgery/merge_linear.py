"""Merging linear layers with nothing non-linear between them.

Conv and Gemm layers go by whole chains (chain_merge: the segmentation a dynamic program finds
cheapest under a MAC or measured-latency cost, residual identities folded in, exact unless
allow_inexact). MatMul pairs x @ W1 [+ b1] @ W2 -> x @ (W1 W2) [+ b1 W2] are merged here when the
product costs at most ``max_mac_growth`` x the pair.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from egp_deploy.surgery._graph import (
    add_constant_after, fresh_name, new_const, only_consumer, set_conv_attrs, set_conv_weights, set_gemm_weights,
)
from egp_deploy.surgery.affine_maps import compose, layer_affine
from egp_deploy.surgery.chain_merge import MacCost, merge_chains


def _matmul_weight(node: gs.Node) -> np.ndarray | None:
    """The constant 2-D right operand of x @ W."""
    if node.op != "MatMul" or len(node.inputs) != 2 or not isinstance(node.inputs[0], gs.Variable):
        return None
    from egp_deploy.surgery._graph import const_value

    w = const_value(node.inputs[1])
    return w if w is not None and w.ndim == 2 else None


def _merge_matmul_chain(graph, first: gs.Node, max_growth) -> dict[str, Any] | None:
    """x @ W1 [+ b1] @ W2  ->  x @ (W1 W2) [+ b1 W2] (exact; b1 must broadcast along the last axis)."""
    from egp_deploy.surgery._graph import const_value

    w1 = _matmul_weight(first)
    if w1 is None:
        return None
    nxt = only_consumer(first.outputs[0], graph)
    bias, bias_node = None, None
    if nxt is not None and nxt.op == "Add" and len(nxt.inputs) == 2:
        other = nxt.inputs[1] if nxt.inputs[0] is first.outputs[0] else nxt.inputs[0]
        b = const_value(other)
        if b is None or b.size != w1.shape[1] or (b.ndim > 1 and b.shape[-1] != w1.shape[1]):
            return None
        bias, bias_node = b.reshape(-1).astype(np.float64), nxt
        nxt = only_consumer(nxt.outputs[0], graph)
    if nxt is None or _matmul_weight(nxt) is None or nxt.inputs[0] is not (bias_node or first).outputs[0]:
        return None
    w2 = _matmul_weight(nxt)
    if w2.shape[0] != w1.shape[1]:
        return None
    before, after = w1.size + w2.size, w1.shape[0] * w2.shape[1]
    if after > max_growth * before:
        return None
    w = (w1.astype(np.float64) @ w2.astype(np.float64)).astype(np.float32)
    nxt.inputs[1] = new_const(w, (nxt.name or "matmul") + ".weight")
    nxt.inputs[0] = first.inputs[0]
    for n in (first, bias_node):
        if n is not None:
            n.outputs.clear()
            n.inputs.clear()
    if bias is not None and np.any(bias != 0):
        out = nxt.outputs[0]
        mid = gs.Variable(fresh_name(out.name + ".pre_bias"), dtype=out.dtype)
        nxt.outputs[0] = mid
        graph.nodes.append(gs.Node("Add", name=fresh_name((nxt.name or "matmul") + "/egp_bias"),
                                   inputs=[mid, new_const((bias @ w2.astype(np.float64)).astype(np.float32),
                                                          (nxt.name or "matmul") + ".bias")],
                                   outputs=[out]))
    return {"kind": "matmul + matmul", "first": first.name, "second": nxt.name, "macs_before": before,
            "macs_after": after, "exact": True, "border_bias": False}


def merge_shared_layers(graph: gs.Graph, max_mac_growth: float = 1.0,
                        module_of: Callable[[str], str | None] = lambda n: None) -> list[dict[str, Any]]:
    """A Conv/Gemm read only by two or more layers of its kind (a squeeze feeding two expands) is a
    chain with a fork, which the chains do not follow: merge a copy of it into each reader when every
    composition is exact and their MACs together are at most ``max_mac_growth`` x those of the shared
    layer and its readers; the shared layer then goes."""
    records = []
    for node in list(graph.nodes):
        if node.op not in ("Conv", "Gemm") or not node.outputs or not node.inputs:
            continue
        t = node.outputs[0]
        readers = list(t.outputs)
        if t in graph.outputs or len(readers) < 2 or any(
                r.op != node.op or not r.inputs or r.inputs[0] is not t or any(x is t for x in r.inputs[1:])
                for r in readers):
            continue
        first = layer_affine(node)
        seconds = [layer_affine(r) for r in readers]
        if first is None or any(b is None for b in seconds):
            continue
        shapes = [compose(first, b, False, values=False) for b in seconds]
        if any(m is None or m.inexact for m in shapes):
            continue
        before, after = first.macs + sum(b.macs for b in seconds), sum(m.macs for m in shapes)
        if after > max_mac_growth * before:
            continue
        for r, b in zip(readers, seconds):
            m = compose(first, b, False, values=True)
            if m.kind == "gemm":
                set_gemm_weights(r, m.w.astype(np.float32), m.bias.astype(np.float32))
            else:
                set_conv_attrs(r, m.attrs())
                set_conv_weights(r, m.w.astype(np.float32), m.bias.astype(np.float32))
            r.inputs[0] = node.inputs[0]
            if m.border_map is not None:
                add_constant_after(graph, r, m.border_map.astype(np.float32)[None])
        node.inputs.clear()
        node.outputs.clear()
        names = [node.name] + [r.name for r in readers]
        records.append({"kind": f"{first.parts[0]} shared by {len(readers)}, merged into each", "first": node.name,
                        "second": readers[0].name, "nodes": names, "macs_before": before, "macs_after": after,
                        "exact": True, "border_bias": any(m.border for m in shapes), "shared": len(readers),
                        "modules": [module_of(n) or n for n in names]})
    if records:
        graph.cleanup().toposort()
    return records


def merge_linear(graph: gs.Graph, max_mac_growth: float = 1.0, allow_inexact: bool = False,
                 module_of: Callable[[str], str | None] = lambda n: None, cost_model=None,
                 log: list[dict[str, Any]] | None = None, inexact_allowed: frozenset | None = None
                 ) -> list[dict[str, Any]]:
    """Conv/Gemm chains merged as planned (chain_merge; cost_model: MacCost(max_mac_growth) unless
    given; ``inexact_allowed``: see merge_chains), then MatMul pairs until none is left; one record per
    merge, every planned candidate in log."""
    records = merge_chains(graph, cost_model or MacCost(max_mac_growth), allow_inexact, module_of, log,
                           inexact_allowed)
    for rec in records:
        rec["modules"] = rec.pop("layers")
    if cost_model is None or isinstance(cost_model, MacCost):  # priced by MACs only (not timed)
        records.extend(merge_shared_layers(graph, max_mac_growth, module_of))
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if node.op != "MatMul" or not node.outputs or not node.inputs:
                continue
            rec = _merge_matmul_chain(graph, node, max_mac_growth)
            if rec:
                rec["modules"] = [module_of(rec["first"]) or rec["first"], module_of(rec["second"]) or rec["second"]]
                records.append(rec)
                changed = True
        graph.cleanup().toposort()
    return records
