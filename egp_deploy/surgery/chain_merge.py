"""Linear chains of Conv or Gemm layers, merged segment by segment as the planner (chain_plan) decides.

A chain is a run of Conv (or Gemm) layers with constant weights where each layer reads the previous
one's output directly: after strips and folds nothing non-linear is left between them (removed
activations, folded BN, per-channel affine maps and constant adds are already inside the weights
and biases). Residual Adds ``x_i + out_j`` whose skip starts at the input of layer i and ends at the
output of layer j of the same chain belong to it. Any segment of consecutive layers is one affine
map; it becomes one layer when that is exact:

  Gemm ... Gemm                  W = W1 W2 ..., b = b1 W2 + b2 ...
  kxk (grouped too) then 1x1     one conv with the first conv's geometry
  1x1 then kxk                   the second conv's geometry; the first bias meets the zero padding,
                                 so near the border it is a position-dependent map: a constant Add
                                 after the merged conv ("border bias")
  kxk then kxk, no padding       kernel k1 + s1 (k2 - 1), stride s1 s2 (exact: no padding involved)
  + residual x_i + out_j         the identity folded in as +1 at the kernel centre (stride 1, 'same'
                                 padding, channels match), so 1x1 -> depthwise kxk -> 1x1 + x is one
                                 dense kxk conv
Inexact (only with allow_inexact): kxk then kxk with padding, kernel k1 + s1 (k2 - 1); the border
ring differs because the intermediate map was zero-padded, and verification reports the error.

Segments are first priced on their geometry alone (shapes, kernels, MACs: no weights are
multiplied), the planner picks the cheapest segmentation, and only the chosen segments get their
weights composed (in float64). A segment may not cut a residual span in two (its skip source or its
Add would become an internal tensor), nor contain a tensor that something outside the chain reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from egp_deploy.surgery._graph import (
    add_constant_after, set_conv_attrs, set_conv_weights, set_gemm_weights, static_shape,
)
from egp_deploy.surgery.affine_maps import Affine, add_identity, compose, layer_affine

__all__ = ["Affine", "Candidate", "Chain", "MacCost", "find_chains", "layer_affine", "merge_chains",
           "unique_candidates"]
from egp_deploy.surgery.chain_plan import plan_segments

MAX_SEGMENT_LAYERS = 8  # bounds the candidates per layer; a longer run merges over successive rounds


# ---------------------------------------------------------------- chains in the graph
@dataclass
class Chain:
    nodes: list[gs.Node]
    layers: list[Affine]
    inputs: list[gs.Tensor]  # inputs[i]: what layer i reads (x_i)
    residual_end: dict[int, int] = field(default_factory=dict)  # skip start i -> end j
    adds: dict[int, gs.Node] = field(default_factory=dict)  # end j -> its Add
    boundaries: set[int] = field(default_factory=set)  # k: layers k-1 and k may not share a segment

    def __len__(self) -> int:
        return len(self.nodes)

    def residual_start(self, j: int) -> int | None:
        return next((i for i, e in self.residual_end.items() if e == j), None)


def _closing_add(graph: gs.Graph, t: gs.Tensor, chain: Chain, j: int) -> tuple[gs.Node, int] | None:
    """The Add that reads t (= out_j) and a chain input x_i, i <= j, with equal shapes."""
    if t in graph.outputs or len(t.outputs) != 1 or j in chain.adds:
        return None
    add = t.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2 or len(add.outputs) != 1:
        return None
    other = add.inputs[1] if add.inputs[0] is t else add.inputs[0]
    if other is t:
        return None
    for i in range(j, -1, -1):
        if chain.inputs[i] is other:
            if i in chain.residual_end or static_shape(other) != static_shape(t) or static_shape(t) is None:
                return None
            return add, i
    return None


def find_chains(graph: gs.Graph) -> list[Chain]:
    """Every maximal chain, walking from each not yet visited Conv/Gemm in topological order."""
    graph.toposort()
    seen: set[int] = set()
    chains = []
    for node in graph.nodes:
        if id(node) in seen or node.op not in ("Conv", "Gemm") or not node.inputs or not node.outputs:
            continue
        first = layer_affine(node)
        if first is None:
            continue
        chain = Chain([node], [first], [node.inputs[0]])
        seen.add(id(node))
        extra_readers: dict[int, list[gs.Node]] = {}
        while True:
            j = len(chain) - 1
            t = chain.nodes[j].outputs[0]
            closing = _closing_add(graph, t, chain, j)
            if closing is not None:
                add, i = closing
                chain.residual_end[i], chain.adds[j] = j, add
                t = add.outputs[0]
            if t in graph.outputs:
                break
            nexts = [c for c in t.outputs if c.op == node.op and c.inputs and c.inputs[0] is t and id(c) not in seen]
            aff = layer_affine(nexts[0]) if len(nexts) == 1 else None
            if aff is None:
                break
            chain.nodes.append(nexts[0])
            chain.layers.append(aff)
            chain.inputs.append(t)
            seen.add(id(nexts[0]))
            extra_readers[j + 1] = [c for c in t.outputs if c is not nexts[0]]
        closing_adds = {id(a) for a in chain.adds.values()}
        for k, readers in extra_readers.items():
            if any(id(r) not in closing_adds for r in readers):
                chain.boundaries.add(k)  # x_k is read outside the chain: it must stay materialised
        chains.append(chain)
    return chains


def segment_allowed(chain: Chain, a: int, b: int) -> bool:
    """Structure only: no cut residual span, no internal tensor read from outside."""
    if b - a + 1 > MAX_SEGMENT_LAYERS or any(a < k <= b for k in chain.boundaries):
        return False
    for i, j in chain.residual_end.items():
        if a < i <= b < j or i < a <= j < b:
            return False
    return True


def segment_affine(chain: Chain, a: int, b: int, allow_inexact: bool, values: bool) -> tuple[Affine, bool] | None:
    """(the segment's Affine, whether the residual ending at b, if any, is folded into it)."""
    if a == b:
        m = chain.layers[a] if values else replace(chain.layers[a])
        i = chain.residual_start(b)
        if i == a:
            with_id = add_identity(m, values)
            if with_id is not None:
                return with_id, True
        return m, False
    acc: Affine | None = None
    k = a
    while k <= b:
        j = chain.residual_end.get(k)
        if j is not None and j <= b and (k, j) != (a, b):
            piece = segment_affine(chain, k, j, allow_inexact, values)
            if piece is None or not piece[1]:
                return None  # a residual inside the segment must fold into it
            piece, k_next = piece[0], j + 1
        else:
            piece, k_next = chain.layers[k], k + 1
        acc = piece if acc is None else compose(acc, piece, allow_inexact, values)
        if acc is None:
            return None
        k = k_next
    if chain.residual_end.get(a) == b:
        acc = add_identity(acc, values)
        if acc is None:
            return None
    start = chain.residual_start(b)
    return acc, start is not None and start >= a  # a residual ending at b is inside: folded above


# ---------------------------------------------------------------- pricing and planning
@dataclass
class Candidate:
    """A segment the planner may choose, as priced; the report's row."""

    a: int
    b: int
    geometry: Affine
    folds_residual: bool
    macs_span: int
    cost: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def merges(self) -> bool:
        return self.b > self.a or self.folds_residual


class MacCost:
    """Deterministic cost: MACs; a merged segment counts 1 / max_mac_growth of its MACs, so it is taken
    when it costs at most that factor times the MACs of the layers it replaces (the pairwise rule of
    old, extended to whole segments)."""

    name = "macs"

    def __init__(self, max_mac_growth: float = 1.0) -> None:
        self.max_mac_growth = max_mac_growth

    def price(self, chains: list[tuple[Chain, list[Candidate]]]) -> None:
        for _, cands in chains:
            for c in cands:
                c.cost = c.geometry.macs / (self.max_mac_growth if c.b > c.a else 1.0)

    def describe(self) -> dict[str, Any]:
        return {"cost": "macs", "max_mac_growth": self.max_mac_growth}


def segment_key(chain: Chain, a: int, b: int) -> tuple[str, ...]:
    """The node names of a segment: how the pipeline names an inexact merge it lets through or drops."""
    return tuple(n.name for n in chain.nodes[a:b + 1])


def _candidates(chain: Chain, allow_inexact: bool, inexact_allowed: frozenset | None = None
                ) -> tuple[list[Candidate], list[dict[str, Any]]]:
    cands, refused = [], []
    for b in range(len(chain)):
        for a in range(max(0, b - MAX_SEGMENT_LAYERS + 1), b + 1):
            if a < b and not segment_allowed(chain, a, b):
                continue
            seg = segment_affine(chain, a, b, allow_inexact, values=False)
            span = sum(chain.layers[k].macs for k in range(a, b + 1))
            if seg is None:
                inexact = not allow_inexact and segment_affine(chain, a, b, True, values=False) is not None
                refused.append({"a": a, "b": b, "why": "needs --allow-inexact-merge (padded k x k + k x k: wrong "
                                "at the border)" if inexact else "not one layer (geometry, or a residual that "
                                "cannot fold)"})
                continue
            if seg[0].inexact and inexact_allowed is not None and segment_key(chain, a, b) not in inexact_allowed:
                refused.append({"a": a, "b": b, "why": "inexact merge dropped: its error was above the inexact "
                                "tolerance (changes.dropped_merges)"})
                continue
            cands.append(Candidate(a, b, seg[0], seg[1], span))
    return cands, refused


def merge_chains(graph: gs.Graph, cost_model=None, allow_inexact: bool = False,
                 module_of: Callable[[str], str | None] = lambda n: None,
                 log: list[dict[str, Any]] | None = None, inexact_allowed: frozenset | None = None
                 ) -> list[dict[str, Any]]:
    """Plan every chain with ``cost_model`` (MacCost() by default) and merge what the plan says.

    ``inexact_allowed``: with ``allow_inexact``, the only inexact segments (``segment_key``) that may be
    merged (None: any). Returns one record per merged segment; every candidate that was priced goes
    to ``log``."""
    cost_model = cost_model or MacCost()
    planned = []
    for chain in find_chains(graph):
        if len(chain) < 2 and not chain.residual_end:
            continue
        cands, refused = _candidates(chain, allow_inexact, inexact_allowed)
        if any(c.merges for c in cands):
            planned.append((chain, cands, refused))
        elif log is not None:
            names = [module_of(n.name) or n.name for n in chain.nodes]
            log.extend({"layers": names[r["a"]:r["b"] + 1], "decision": "kept", "why": r["why"]} for r in refused)
    if not planned:
        return []
    cost_model.price([(ch, cands) for ch, cands, _ in planned])
    records = []
    for chain, cands, refused in planned:
        by_span = {(c.a, c.b): c for c in cands}
        _, segments = plan_segments(len(chain), {k: c.cost for k, c in by_span.items()})
        chosen = {s for s in segments}
        names = [module_of(n.name) or n.name for n in chain.nodes]
        alone = {k: by_span[(k, k)].cost for k in range(len(chain))}
        for c in cands:
            if not c.merges or log is None:
                continue
            parts = sum(alone[k] for k in range(c.a, c.b + 1))
            taken = (c.a, c.b) in chosen
            why = ("in the cheapest segmentation" if taken else
                   f"costs more than its layers apart ({c.cost:.4g} > {parts:.4g})" if c.cost > parts else
                   "another segmentation of the chain is cheaper")
            log.append({"layers": names[c.a:c.b + 1], "kind": " + ".join(c.geometry.parts),
                        "macs_span": c.macs_span, "macs_merged": c.geometry.macs, "cost": c.cost,
                        "cost_of_layers_apart": parts, "exact": not c.geometry.inexact, **c.info,
                        "decision": "merged" if taken else "kept", "why": why})
        for a, b in segments:
            c = by_span[(a, b)]
            if c.merges:
                records.append(_rewrite_segment(graph, chain, c, allow_inexact, names))
        if log is not None:
            for r in refused:
                log.append({"layers": names[r["a"]:r["b"] + 1], "decision": "kept", "why": r["why"]})
    graph.cleanup().toposort()
    return records


def unique_candidates(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The log without the repeats of later planning rounds (same layers, same decision)."""
    seen, out = set(), []
    for row in log:
        key = (tuple(row["layers"]), row.get("kind"), row["decision"])
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def _rewrite_segment(graph: gs.Graph, chain: Chain, cand: Candidate, allow_inexact: bool,
                     names: list[str]) -> dict[str, Any]:
    a, b = cand.a, cand.b
    m, folded = segment_affine(chain, a, b, allow_inexact, values=True)
    node = chain.nodes[b]
    out = chain.adds[b].outputs[0] if folded else node.outputs[0]
    absorbed = [chain.adds[j] for i, j in chain.residual_end.items() if a <= i and j <= b and (j < b or folded)]
    for n in chain.nodes[a:b] + absorbed:
        n.inputs.clear()
        n.outputs.clear()
    if m.kind == "gemm":
        set_gemm_weights(node, m.w.astype(np.float32), m.bias.astype(np.float32))
    else:
        set_conv_attrs(node, m.attrs())
        set_conv_weights(node, m.w.astype(np.float32), m.bias.astype(np.float32))
    node.inputs[0] = chain.inputs[a]
    node.outputs = [out]
    if m.border_map is not None:
        add_constant_after(graph, node, m.border_map.astype(np.float32)[None])
    if a == b:
        kind = "residual identity folded (+I) into " + m.parts[0]
    else:
        kind = " + ".join(m.parts)
    return {"kind": kind, "first": chain.nodes[a].name, "second": node.name, "nodes": list(segment_key(chain, a, b)),
            "layers": names[a:b + 1], "macs_before": cand.macs_span, "macs_after": m.macs,
            "exact": not m.inexact, "border_bias": m.border_map is not None,
            "residuals_folded": len(absorbed), **({"cost": cand.info} if cand.info else {})}
