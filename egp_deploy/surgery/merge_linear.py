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

from egp_deploy.surgery._graph import fresh_name, new_const, only_consumer
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
