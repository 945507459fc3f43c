"""Dead channels and constant layers, eliminated structurally (exact).

A channel is *constant* when every sample sees the same value in it at every position (an all-zero
weight row outputs its bias; a channel pinned by an always-OFF activation outputs 0; constants
stay constant through element-wise and pooling ops; constant_channels.py finds them). A channel is *unused* when every layer that
reads it has all-zero weights for it. Either way the channel can go: its producer loses an output
row, every reader loses an input column and absorbs the constant into its bias (near a zero-padded
border the absorbed constant is position-dependent: it becomes a constant map added after the
reader, which needs static spatial shapes).

Channels are tracked through *channel groups*: tensors joined by ops that keep channel c in channel
c (element-wise ops, residual adds, BatchNormalization, pooling, depthwise convs, Flatten of a
(N, C, 1, 1) map). A channel of a residual stage can only go where it is dead in every producer of
the group. A tensor that is constant in all channels is replaced by a constant and folded forward
(constant_layers.py).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from egp_deploy.surgery._graph import (
    add_constant_after, channels, const_value, constant_input_response, conv_attrs, conv_weights,
    dense_conv_weight, gemm_weights, has_padding, new_const, producer, set_conv_weights, set_gemm_weights,
    spatial_static, static_shape,
)
from egp_deploy.surgery.channel_routes import Route, constant_hook, find_routes, grouped_conv, rewrite_route
from egp_deploy.surgery.constant_channels import (
    BINARY, _aligned, _contracting, _member_data_inputs, _producer_kind, constant_channels,
)
from egp_deploy.surgery.constant_layers import constant_layers_to_constants

__all__ = ["aligned_keep", "constant_channels", "constant_layers_to_constants", "eliminate_dead_channels"]


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def _slice_channel_const(c: np.ndarray, rank: int, keep: np.ndarray) -> np.ndarray:
    a = _aligned(c, rank)
    if a.shape[1] == 1:
        return c
    return a[:, keep]


def eliminate_dead_channels(graph: gs.Graph, module_of: Callable[[str], str | None] = lambda n: None,
                            channel_multiple: int = 1) -> list[dict[str, Any]]:
    """One round over all channel groups; returns a record per group that lost channels.

    ``channel_multiple`` > 1 keeps every narrowed group at a multiple of it (some dead channels are
    kept, which is exact): runtimes block channels by 8 or 16, and 32 -> 30 channels runs SLOWER than
    32 on onnxruntime's blocked CPU kernels (docs/surgery.md, "Channel alignment"). Groups joined by
    channel routes or grouped convs are aligned together: a channel kept for one is kept in all."""
    routes = find_routes(graph)
    info = constant_channels(graph, constant_hook(routes))
    tensors = graph.tensors()
    uf = _UnionFind()
    member_of: dict[str, list[int]] = {}
    for node in graph.nodes:
        data = _member_data_inputs(node, graph) if _producer_kind(node) is None else None
        if data is None:
            continue
        member_of[node.name] = data
        for i in data:
            uf.union(node.inputs[i].name, node.outputs[0].name)
    groups: dict[str, set[str]] = {}
    for node in graph.nodes:
        for t in node.outputs:
            if isinstance(t, gs.Variable) and channels(t) is not None:
                groups.setdefault(uf.find(t.name), set()).add(t.name)
    links = _Links(routes, {id(n): {**gc, "node": n} for n in graph.nodes if (gc := grouped_conv(n)) is not None})
    analyses = {root: _analyze_group(graph, [tensors[n] for n in sorted(names)], member_of, info, links)
                for root, names in groups.items()}
    keeps = _solve_keeps(analyses, routes, links, uf.find, channel_multiple)
    narrowed = [(analyses[root], keep) for root, keep in keeps.items() if keep is not None and not keep.all()]
    records = []
    # Rows everywhere first: a layer can read one narrowed group and write another (or the same one,
    # a residual branch), and the border map it gets as a reader must have the rows that remain.
    for a, keep in narrowed:
        rec = _narrow_rows(a, keep, module_of)
        if rec["producers"]:  # a group a route writes lost the channels of its source's record
            records.append(rec)
    for a, keep in narrowed:
        _narrow_readers(graph, a, keep, info)
    keep_of = lambda t: keeps.get(uf.find(t.name))  # noqa: E731
    for node in list(graph.nodes):
        gc = links.grouped.get(id(node))
        if gc is not None:
            rec = _rewrite_grouped(graph, node, gc, keep_of(node.inputs[0]), keep_of(node.outputs[0]), info)
            if rec:
                for r in records:  # the record of the group this conv produces says how its groups went
                    if node.name in r["producers"]:
                        r.setdefault("conv_groups", {})[node.name] = rec
    for r in routes:
        if any(keep_of(t) is not None and not keep_of(t).all() for t in r.sources + r.destinations):
            rewrite_route(graph, r, lambda t: None if keep_of(t) is None or keep_of(t).all() else keep_of(t))
    if records:
        graph.cleanup()
    return records


class _Links:
    """Route and grouped-conv nodes by what they read and write."""

    def __init__(self, routes: list[Route], grouped: dict[int, dict]) -> None:
        self.grouped = grouped
        self.readers = {id(r.chain[0] if r.chain else r.node) for r in routes}
        self.writers = {id(r.node) for r in routes}


def _analyze_group(graph, members, member_of, info, links: _Links) -> dict[str, Any] | None:
    """Which channels of a channel group its exits allow to go (constant at every contracting exit, or
    read by none); None when something the group cannot narrow reads or writes it. Route exits and
    producers are left to the other side of the route (dead_channels joins them)."""
    nch = channels(members[0])
    if nch is None or nch < 2 or any(channels(t) != nch for t in members):
        return None
    member_set = {t.name for t in members}
    producers, grouped_producers, consumers, member_nodes = [], [], [], {}
    routed = False
    for t in members:
        if t in graph.outputs:
            return None
        p = producer(t)
        if p is None:
            return None
        if p.name in member_of and all(p.inputs[i].name in member_set for i in member_of[p.name]):
            member_nodes[p.name] = p
        elif _producer_kind(p) and p.outputs[0] is t:
            producers.append(p)
        elif id(p) in links.grouped and p.outputs[0] is t:
            grouped_producers.append(p)
        elif id(p) in links.writers:
            routed = True
        else:
            return None
        for n in t.outputs:
            if n.name in member_of and n.outputs[0].name in member_set:
                if any(x is t and i not in member_of[n.name] for i, x in enumerate(n.inputs)):
                    return None
                continue
            if _contracting(n, t) or (id(n) in links.grouped and n.inputs[0] is t
                                      and not any(x is t for x in n.inputs[1:])):
                consumers.append((n, t))
            elif id(n) in links.readers:
                routed = True
            else:
                return None
    if not consumers and not routed:
        return None
    # Only what leaves the group matters: a channel pinned to a constant by a Mul(x, 0) inside the
    # group may be live upstream of the pin and still go everywhere.
    masks = [info.get(t.name, (np.zeros(nch, bool), None))[0] for _, t in consumers]
    if any(m.shape[0] != nch for m in masks):
        return None
    const_all = np.logical_and.reduce(masks) if masks else np.ones(nch, bool)
    used = np.zeros(nch, bool)
    for n, t in consumers:
        w = _dense_weight(n)
        if w.ndim > 2:
            used |= np.abs(w).reshape(w.shape[0], nch, -1).max(axis=(0, 2)) != 0
        else:
            used |= np.abs(w).max(axis=1) != 0
    removable = const_all | ~used
    for n, t in consumers:  # a constant next to a zero-padded border needs the map's static shape
        if n.op == "Conv" and has_padding(conv_attrs(n, conv_weights(n)[0].shape)):
            val = info.get(t.name, (None, np.zeros(nch)))[1]
            if not spatial_static(t):
                removable &= ~(used & (val != 0))
    return {"members": members, "nch": nch, "producers": producers, "grouped_producers": grouped_producers,
            "consumers": consumers, "member_nodes": member_nodes, "const_all": const_all, "used": used,
            "removable": removable, "routed": routed}


def _dense_weight(n: gs.Node) -> np.ndarray:
    """A reader's weight over all input channels: (Cout, Cin, k...) for convs (grouped ones expanded),
    (K, M) for Gemm."""
    if n.op == "Conv":
        w = conv_weights(n)[0]
        return dense_conv_weight(w, int(n.attrs.get("group", 1)))
    return gemm_weights(n)[0]


def _solve_keeps(analyses, routes: list[Route], links: _Links, group_of, channel_multiple: int
                 ) -> dict[str, np.ndarray | None]:
    """The channels each group keeps. A channel goes only where it may go in every group a route joins
    it to; a grouped conv keeps the same number of input (and output) channels in each of its groups,
    or drops a group whole."""
    slots = _UnionFind()
    joined: set[str] = set()
    for r in routes:
        for src, si, dst, di in r.pairs:
            gs_, gd = group_of(src.name), group_of(dst.name)
            joined.update((gs_, gd))
            for a, b in zip(si, di):
                slots.union(f"{gs_}#{a}", f"{gd}#{b}")
    grouped_tensors = []
    for gc in links.grouped.values():
        node = gc["node"]
        gi, go = group_of(node.inputs[0].name), group_of(node.outputs[0].name)
        joined.update((gi, go))
        grouped_tensors.append((gc, gi, go))
    blocked: set[str] = set()  # slot classes that must stay
    for root, a in analyses.items():
        if root not in joined:
            continue
        for c in range(a["nch"] if a else 0):
            if not a["removable"][c]:
                blocked.add(slots.find(f"{root}#{c}"))
    for r in routes:  # a channel in a group that cannot narrow cannot go anywhere it is routed
        for src, si, dst, di in r.pairs:
            for t, idx in ((src, si), (dst, di)):
                if analyses.get(group_of(t.name)) is None:
                    blocked.update(slots.find(f"{group_of(t.name)}#{c}") for c in idx)

    def removable(root: str) -> np.ndarray | None:
        a = analyses.get(root)
        if a is None:
            return None
        if root not in joined:
            return a["removable"]
        return np.array([slots.find(f"{root}#{c}") not in blocked for c in range(a["nch"])])

    changed = True
    while changed:
        changed = False
        for gc, gi, go in grouped_tensors:
            rin, rout = removable(gi), removable(go)
            g = gc["groups"]
            rin = np.zeros(g * gc["cin_g"], bool) if rin is None else rin
            rout = np.zeros(g * gc["cout_g"], bool) if rout is None else rout
            rin_g, rout_g = rin.reshape(g, -1), rout.reshape(g, -1)
            dropped = rin_g.all(axis=1) & rout_g.all(axis=1)
            if dropped.all():
                dropped[0] = False
            for root, r_g in ((gi, rin_g), (go, rout_g)):
                if analyses.get(root) is None:
                    continue
                need = max(1, int((~r_g[~dropped]).sum(axis=1).max()))
                for k in np.flatnonzero(~dropped):
                    short = need - int((~r_g[k]).sum())
                    for c in np.flatnonzero(r_g[k])[:max(short, 0)]:
                        blocked.add(slots.find(f"{root}#{k * r_g.shape[1] + c}"))
                        changed = True
        for root in joined:  # a tensor keeps at least one channel, and an aligned number of them
            r = removable(root)
            if r is None or not r.any():
                continue
            kept = int((~r).sum())
            target = min(r.size, max(1, -(-kept // channel_multiple) * channel_multiple))
            for c in np.flatnonzero(r)[:target - kept]:
                blocked.add(slots.find(f"{root}#{c}"))
                changed = True
    keeps: dict[str, np.ndarray | None] = {}
    for root in analyses:
        r = removable(root)
        if r is None:
            keeps[root] = None
        elif root in joined:
            keeps[root] = ~r
        else:
            keeps[root] = aligned_keep(r, channel_multiple)
    return keeps


def aligned_keep(removable: np.ndarray, multiple: int) -> np.ndarray:
    """The channels to keep: all live ones, plus the first removable ones needed to make the count a
    multiple of ``multiple`` (never more than there are). A group where everything is removable keeps
    one channel (a graph cannot carry zero-width tensors)."""
    keep = ~removable
    if keep.sum() == 0:
        keep = keep.copy()
        keep[0] = True
        return keep
    if multiple <= 1:
        return keep
    target = min(removable.size, -(-int(keep.sum()) // multiple) * multiple)
    extra = np.flatnonzero(removable)[: target - int(keep.sum())]
    keep = keep.copy()
    keep[extra] = True
    return keep


def _narrow_rows(a: dict[str, Any], keep: np.ndarray, module_of) -> dict[str, Any]:
    """A group's producer rows, member parameters and tensor shapes narrowed to ``keep``; its record.
    Grouped convs are narrowed by _rewrite_grouped, routes by channel_routes.rewrite_route."""
    nch, removable = a["nch"], ~keep
    new_c = int(keep.sum())
    const_all, used = a["const_all"], a["used"]
    for p in a["producers"]:
        if _producer_kind(p) == "conv":
            w, b = conv_weights(p)
            set_conv_weights(p, np.ascontiguousarray(w[keep]), None if b is None else b[keep])
        else:
            w, c = gemm_weights(p)
            set_gemm_weights(p, w[:, keep], None if c is None else c[keep])
    for node in a["member_nodes"].values():
        rank = len(static_shape(node.outputs[0]))
        if node.op == "BatchNormalization":
            for i in range(1, 5):
                node.inputs[i] = new_const(const_value(node.inputs[i])[keep], node.name + ".bn")
        elif node.op == "PRelu" or node.op in BINARY:
            for i, t in enumerate(node.inputs):
                c = const_value(t)
                if c is not None:
                    node.inputs[i] = new_const(np.ascontiguousarray(_slice_channel_const(c, rank, keep)), node.name + ".c")
        elif node.op == "Conv":
            w, b = conv_weights(node)
            set_conv_weights(node, np.ascontiguousarray(w[keep]), None if b is None else b[keep])
            node.attrs["group"] = new_c
    for t in a["members"]:
        t.shape = [t.shape[0], new_c] + list(t.shape[2:])
    names = [p.name for p in a["producers"] + a["grouped_producers"]]
    rec = {
        "channels_before": nch, "channels_after": new_c,
        "constant": int((removable & const_all).sum()), "unused": int((removable & ~used & ~const_all).sum()),
        "producers": names, "modules": [module_of(n) or n for n in names],
        "readers": [n.name for n, _ in a["consumers"]],
    }
    if a["routed"]:
        rec["routed"] = True  # joined to other groups through Concat / Split / Slice / a channel permutation
    return rec


def _narrow_readers(graph, a: dict[str, Any], keep: np.ndarray, info) -> None:
    """A group's dense readers lose the removed columns; their constants move into the bias, with a
    border map where zero padding makes them position-dependent."""
    nch, removable, used = a["nch"], ~keep, a["used"]
    for n, t in a["consumers"]:
        kind = _producer_kind(n)
        if kind is None:  # a grouped conv
            continue
        mask, val = info.get(t.name, (np.zeros(nch, bool), np.zeros(nch)))
        v = np.where(removable & mask & used, val, 0.0)[removable]
        if kind == "conv":
            w, b = conv_weights(n)
            at = conv_attrs(n, w.shape)
            b = np.zeros(w.shape[0], np.float64) if b is None else b.astype(np.float64)
            w_rm = w[:, removable].astype(np.float64)
            uniform = w_rm.reshape(w.shape[0], w_rm.shape[1], -1).sum(axis=2) @ v
            if np.any(v != 0) and has_padding(at):
                full = constant_input_response(v, w_rm, at, [int(d) for d in static_shape(t)[2:]])
                border = full - uniform.reshape((-1,) + (1,) * (full.ndim - 1))
                if np.any(border != 0):
                    add_constant_after(graph, n, border.astype(np.float32)[None])
            set_conv_weights(n, np.ascontiguousarray(w[:, keep]), (b + uniform).astype(np.float32)
                             if (conv_weights(n)[1] is not None or np.any(uniform != 0)) else None)
        else:
            w, c = gemm_weights(n)
            c = (np.zeros(w.shape[1]) if c is None else c.astype(np.float64)) + v @ w[removable].astype(np.float64)
            set_gemm_weights(n, w[keep], c.astype(np.float32))


def _rewrite_grouped(graph, node: gs.Node, gc: dict, keep_in: np.ndarray | None, keep_out: np.ndarray | None,
                     info) -> list[int] | None:
    """Narrow a grouped conv to the kept input and output channels: groups whose channels all went are
    dropped whole, the others keep the same number each (the solver made sure); the constants of
    removed inputs move into the bias. Returns [groups before, after], or None when nothing changed."""
    w, b = conv_weights(node)
    g, cin_g, cout_g = int(node.attrs.get("group", 1)), w.shape[1], w.shape[0] // int(node.attrs.get("group", 1))
    cin, cout = cin_g * g, w.shape[0]
    keep_in = np.ones(cin, bool) if keep_in is None else keep_in
    keep_out = np.ones(cout, bool) if keep_out is None else keep_out
    if keep_in.all() and keep_out.all():
        return None
    at = conv_attrs(node, w.shape)
    x = node.inputs[0]
    mask, val = info.get(x.name, (np.zeros(cin, bool), np.zeros(cin)))
    dense = dense_conv_weight(w, g).astype(np.float64)
    removed = ~keep_in
    v = np.where(removed & mask, val, 0.0)[removed]
    w_rm = dense[:, removed]
    uniform = w_rm.reshape(cout, w_rm.shape[1], -1).sum(axis=2) @ v
    bias = (np.zeros(cout) if b is None else b.astype(np.float64)) + uniform
    live = ~((~keep_in).reshape(g, cin_g).all(axis=1) & (~keep_out).reshape(g, cout_g).all(axis=1))
    if np.any(v != 0) and has_padding(at):  # the analysis made sure the map is static
        full = constant_input_response(v, w_rm, at, [int(d) for d in static_shape(x)[2:]])
        border = (full - uniform.reshape((-1,) + (1,) * (full.ndim - 1)))[keep_out]
        if np.any(border != 0):
            add_constant_after(graph, node, border.astype(np.float32)[None])
    blocks = []
    for k in np.flatnonzero(live):
        rows = k * cout_g + np.flatnonzero(keep_out[k * cout_g:(k + 1) * cout_g])
        cols = np.flatnonzero(keep_in[k * cin_g:(k + 1) * cin_g])
        blocks.append(w[rows][:, cols])
    set_conv_weights(node, np.ascontiguousarray(np.concatenate(blocks)),
                     bias[keep_out].astype(np.float32) if (b is not None or np.any(uniform != 0)) else None)
    node.attrs["group"] = int(live.sum())
    return [g, int(live.sum())]
