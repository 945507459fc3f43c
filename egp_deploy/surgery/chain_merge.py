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
    constant_input_response, conv_attrs, conv_weights, dense_conv_weight, gemm_weights, set_conv_attrs,
    set_conv_weights, set_gemm_weights, set_list, spatial_static, static_shape,
)
from egp_deploy.surgery.chain_plan import plan_segments

MAX_SEGMENT_LAYERS = 8  # bounds the candidates per layer; a longer run merges over successive rounds


# ---------------------------------------------------------------- affine maps
@dataclass
class Affine:
    """One layer or a composed segment: geometry always, weights (float64) once composed for real.

    conv: y = conv(x, w) + bias[:, None...] + border (border: position-dependent, or None)
    gemm: y = x @ w + bias"""

    kind: str  # "conv" | "gemm"
    cout: int
    cin: int  # dense input channels
    group: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    in_spatial: tuple[int, ...] = ()
    out_spatial: tuple[int, ...] = ()
    biased: bool = False  # some bias along the way is nonzero
    border: bool = False  # a position-dependent bias remains
    inexact: bool = False
    parts: tuple[str, ...] = ()
    w: np.ndarray | None = None  # conv: (cout, cin/group, *kernel); gemm: (cin, cout)
    bias: np.ndarray | None = None
    border_map: np.ndarray | None = None

    @property
    def macs(self) -> int:
        if self.kind == "gemm":
            return self.cin * self.cout
        return self.cout * (self.cin // self.group) * int(np.prod(self.kernel)) * int(np.prod(self.out_spatial))

    @property
    def pointwise(self) -> bool:
        return self.kind == "conv" and all(k == 1 for k in self.kernel) and all(s == 1 for s in self.strides) \
            and not any(self.pads)

    def attrs(self) -> dict[str, Any]:
        return {"kernel": list(self.kernel), "strides": list(self.strides), "dilations": list(self.dilations),
                "pads": list(self.pads), "group": self.group}

    def dense(self) -> np.ndarray:
        return dense_conv_weight(self.w, self.group).astype(np.float64)


def _describe(node: gs.Node, a: Affine) -> str:
    if a.kind == "gemm":
        return "gemm"
    k = "x".join(map(str, a.kernel))
    if a.group > 1:
        k = ("dw" if a.group == a.cin == a.cout else f"g{a.group} ") + k
    return k + ("/" + "x".join(map(str, a.strides)) if any(s != 1 for s in a.strides) else "")


def layer_affine(node: gs.Node) -> Affine | None:
    """The Affine of a Conv (static shapes) or Gemm (rank-2 input) with constant weights."""
    if node.op == "Conv":
        wb = conv_weights(node)
        if wb is None or wb[0].ndim not in (3, 4):
            return None
        w, b = wb
        a = conv_attrs(node, w.shape)
        if a is None or not spatial_static(node.inputs[0]) or not spatial_static(node.outputs[0]):
            return None
        xs, ys = static_shape(node.inputs[0]), static_shape(node.outputs[0])
        bias = np.zeros(w.shape[0]) if b is None else b.astype(np.float64).reshape(-1)
        aff = Affine("conv", int(w.shape[0]), int(w.shape[1]) * a["group"], a["group"], tuple(a["kernel"]),
                     tuple(a["strides"]), tuple(a["dilations"]), tuple(a["pads"]),
                     tuple(int(d) for d in xs[2:]), tuple(int(d) for d in ys[2:]), bool(np.any(bias != 0)),
                     w=w, bias=bias)
    elif node.op == "Gemm":
        wc = gemm_weights(node)
        shape = static_shape(node.inputs[0])
        if wc is None or shape is None or len(shape) != 2:
            return None
        w, c = wc
        bias = np.zeros(w.shape[1]) if c is None else c.astype(np.float64)
        aff = Affine("gemm", int(w.shape[1]), int(w.shape[0]), biased=bool(np.any(bias != 0)), w=w, bias=bias)
    else:
        return None
    return replace(aff, parts=(_describe(node, aff),))


def _taps(w: np.ndarray) -> np.ndarray:
    return w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2)


def compose(a: Affine, b: Affine, allow_inexact: bool = False, values: bool = True) -> Affine | None:
    """b after a as one Affine, or None when that is not one layer (exactly, or inexactly if allowed).

    values=False composes the geometry only (cheap: what the planner prices)."""
    if a.kind != b.kind or a.cout != b.cin:
        return None
    parts = a.parts + b.parts
    biased = a.biased or b.biased
    if a.kind == "gemm":
        out = replace(a, cout=b.cout, biased=biased, parts=parts, w=None, bias=None)
        if values:
            out.w = a.w.astype(np.float64) @ b.w.astype(np.float64)
            out.bias = a.bias @ b.w.astype(np.float64) + b.bias
        return out
    if len(a.kernel) != len(b.kernel) or a.out_spatial != b.in_spatial:
        return None
    geo = dict(cout=b.cout, cin=a.cin, group=1, in_spatial=a.in_spatial, out_spatial=b.out_spatial,
               biased=biased, inexact=a.inexact or b.inexact, parts=parts, w=None, bias=None, border_map=None)
    if b.pointwise:  # channel mixing after a: a's geometry
        out = replace(a, **geo, border=a.border or b.border)
        if values:
            b2 = b.dense().reshape(b.cout, -1)
            out.w = np.tensordot(b2, a.dense(), axes=([1], [0]))
            out.bias = b2 @ a.bias + b.bias
            out.border_map = _add_maps(None if a.border_map is None else np.tensordot(b2, a.border_map, axes=([1], [0])),
                                       b.border_map)
            out.border = out.border_map is not None
        return out
    if a.pointwise and not a.border:  # channel mixing before b: b's geometry
        border = b.border or (a.biased and any(b.pads))
        out = replace(b, **geo, border=border)
        if values:
            wb = b.dense()
            out.w = np.moveaxis(np.tensordot(wb, a.dense().reshape(a.cout, -1), axes=([1], [0])), -1, 1)
            uniform = _taps(wb) @ a.bias
            out.bias = uniform + b.bias
            extra = None
            if any(b.pads) and np.any(a.bias != 0):
                full = constant_input_response(a.bias, wb, b.attrs(), list(b.in_spatial)).astype(np.float64)
                extra = full - uniform.reshape((-1,) + (1,) * len(b.kernel))
                if not np.any(np.abs(extra) > 1e-12 * max(1.0, float(np.max(np.abs(full))))):
                    extra = None
            out.border_map = _add_maps(extra, b.border_map)
            out.border = out.border_map is not None
        return out
    if a.border or any(d != 1 for d in a.dilations + b.dilations):
        return None
    padded = any(a.pads) or any(b.pads)
    if padded and not (allow_inexact and all(s == 1 for s in b.strides)):
        return None
    nd = len(a.kernel)
    kc = tuple(a.kernel[i] + a.strides[i] * (b.kernel[i] - 1) for i in range(nd))
    pads = tuple(a.pads[i] + a.strides[i % nd] * b.pads[i] for i in range(2 * nd))
    strides = tuple(a.strides[i] * b.strides[i] for i in range(nd))
    out = replace(a, **geo, kernel=kc, strides=strides, pads=pads, border=b.border)
    out.inexact = out.inexact or padded
    if values:
        wa, wb = a.dense(), b.dense()
        w = np.zeros((b.cout, a.cin) + kc)
        for p in np.ndindex(*b.kernel):
            block = np.tensordot(wb[(slice(None), slice(None)) + p], wa, axes=([1], [0]))
            sl = tuple(slice(a.strides[i] * p[i], a.strides[i] * p[i] + a.kernel[i]) for i in range(nd))
            w[(slice(None), slice(None)) + sl] += block
        out.w = w
        out.bias = _taps(wb) @ a.bias + b.bias  # exact without padding; the inexact case ignores the ring
        out.border_map = b.border_map
    return out


def _add_maps(x: np.ndarray | None, y: np.ndarray | None) -> np.ndarray | None:
    if x is None:
        return y
    return x if y is None else x + y


def add_identity(m: Affine, values: bool = True) -> Affine | None:
    """m + identity (a residual x + m(x)), or None when the identity is not one kernel tap of m."""
    if m.cout != m.cin:
        return None
    if m.kind == "gemm":
        out = replace(m, parts=m.parts + ("identity",))
        if values:
            out.w = m.w.astype(np.float64) + np.eye(m.cin)
        return out
    nd = len(m.kernel)
    if m.in_spatial != m.out_spatial or any(s != 1 for s in m.strides) or any(
            k % 2 == 0 or m.pads[i] != m.pads[i + nd] or m.pads[i] != m.dilations[i] * (k // 2)
            for i, k in enumerate(m.kernel)):
        return None
    out = replace(m, parts=m.parts + ("identity",))
    if values:
        w = m.w.astype(np.float64, copy=True)
        idx = np.arange(m.cout)
        # grouped: output o and input o share a group (cout == cin), at in-group index o % (cin / group)
        w[(idx, idx % w.shape[1]) + tuple(k // 2 for k in m.kernel)] += 1.0
        out.w = w
    return out


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


def _candidates(chain: Chain, allow_inexact: bool) -> tuple[list[Candidate], list[dict[str, Any]]]:
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
            cands.append(Candidate(a, b, seg[0], seg[1], span))
    return cands, refused


def merge_chains(graph: gs.Graph, cost_model=None, allow_inexact: bool = False,
                 module_of: Callable[[str], str | None] = lambda n: None,
                 log: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Plan every chain with ``cost_model`` (MacCost() by default) and merge what the plan says.

    Returns one record per merged segment; every candidate that was priced goes to ``log``."""
    cost_model = cost_model or MacCost()
    planned = []
    for chain in find_chains(graph):
        if len(chain) < 2 and not chain.residual_end:
            continue
        cands, refused = _candidates(chain, allow_inexact)
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
    set_list(node.outputs, [out])
    if m.border_map is not None:
        from egp_deploy.surgery.dead_channels import _add_after

        _add_after(graph, node, m.border_map.astype(np.float32)[None])
    if a == b:
        kind = "residual identity folded (+I) into " + m.parts[0]
    else:
        kind = " + ".join(m.parts)
    return {"kind": kind, "first": chain.nodes[a].name, "second": node.name,
            "layers": names[a:b + 1], "macs_before": cand.macs_span, "macs_after": m.macs,
            "exact": not m.inexact, "border_bias": m.border_map is not None,
            "residuals_folded": len(absorbed), **({"cost": cand.info} if cand.info else {})}
