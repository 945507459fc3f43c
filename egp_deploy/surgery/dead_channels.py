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
    add_constant_after, channels, const_value, constant_input_response, conv_attrs, conv_weights, gemm_weights,
    has_padding, new_const, producer, set_conv_weights, set_gemm_weights, spatial_static, static_shape,
)
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
    32 on onnxruntime's blocked CPU kernels (docs/surgery.md, "Channel alignment")."""
    info = constant_channels(graph)
    tensors = graph.tensors()
    uf = _UnionFind()
    member_of: dict[str, list[int]] = {}
    nodes_by_name = {}
    for node in graph.nodes:
        data = _member_data_inputs(node, graph) if _producer_kind(node) is None else None
        if data is None:
            continue
        member_of[node.name] = data
        nodes_by_name[node.name] = node
        for i in data:
            uf.union(node.inputs[i].name, node.outputs[0].name)
    groups: dict[str, set[str]] = {}
    for node in graph.nodes:
        for t in node.outputs:
            if isinstance(t, gs.Variable) and channels(t) is not None:
                groups.setdefault(uf.find(t.name), set()).add(t.name)
    records = []
    for names in groups.values():
        rec = _eliminate_group(graph, [tensors[n] for n in sorted(names)], member_of, info, module_of,
                               channel_multiple)
        if rec:
            records.append(rec)
    return records


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


def _eliminate_group(graph, members, member_of, info, module_of, channel_multiple: int = 1
                     ) -> dict[str, Any] | None:
    nch = channels(members[0])
    if nch is None or nch < 2 or any(channels(t) != nch for t in members):
        return None
    member_set = {t.name for t in members}
    producers, consumers, member_nodes = [], [], {}
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
        else:
            return None
        for n in t.outputs:
            if n.name in member_of and n.outputs[0].name in member_set:
                if any(x is t and i not in member_of[n.name] for i, x in enumerate(n.inputs)):
                    return None
                continue
            if _contracting(n, t):
                consumers.append((n, t))
            else:
                return None
    if not consumers:
        return None
    # Only what leaves the group matters: a channel pinned to a constant by a Mul(x, 0) inside the
    # group may be live upstream of the pin and still go everywhere.
    masks = [info.get(t.name, (np.zeros(nch, bool), None))[0] for _, t in consumers]
    if any(m.shape[0] != nch for m in masks):
        return None
    const_all = np.logical_and.reduce(masks)
    used = np.zeros(nch, bool)
    for n, t in consumers:
        if _producer_kind(n) == "conv":
            w = conv_weights(n)[0]
            used |= np.abs(w).reshape(w.shape[0], nch, -1).max(axis=(0, 2)) != 0
        else:
            used |= np.abs(gemm_weights(n)[0]).max(axis=1) != 0
    removable = const_all | ~used
    for n, t in consumers:  # a constant next to a zero-padded border needs the map's static shape
        if _producer_kind(n) == "conv" and has_padding(conv_attrs(n, conv_weights(n)[0].shape)):
            val = info.get(t.name, (None, np.zeros(nch)))[1]
            if not spatial_static(t):
                removable &= ~(used & (val != 0))
    keep = aligned_keep(removable, channel_multiple)
    removable = ~keep
    if not removable.any():
        return None
    new_c = int(keep.sum())
    # Rows first: a layer can read and write the same group (a residual branch), and its border
    # map must then be computed with the rows that remain.
    for p in producers:
        if _producer_kind(p) == "conv":
            w, b = conv_weights(p)
            set_conv_weights(p, np.ascontiguousarray(w[keep]), None if b is None else b[keep])
        else:
            w, c = gemm_weights(p)
            set_gemm_weights(p, w[:, keep], None if c is None else c[keep])
    for n, t in consumers:
        mask, val = info.get(t.name, (np.zeros(nch, bool), np.zeros(nch)))
        v = np.where(removable & mask & used, val, 0.0)[removable]
        if _producer_kind(n) == "conv":
            w, b = conv_weights(n)
            a = conv_attrs(n, w.shape)
            b = np.zeros(w.shape[0], np.float64) if b is None else b.astype(np.float64)
            w_rm = w[:, removable].astype(np.float64)
            uniform = w_rm.reshape(w.shape[0], w_rm.shape[1], -1).sum(axis=2) @ v
            if np.any(v != 0) and has_padding(a):
                full = constant_input_response(v, w_rm, a, [int(d) for d in static_shape(t)[2:]])
                border = full - uniform.reshape((-1,) + (1,) * (full.ndim - 1))
                if np.any(border != 0):
                    add_constant_after(graph, n, border.astype(np.float32)[None])
            set_conv_weights(n, np.ascontiguousarray(w[:, keep]), (b + uniform).astype(np.float32)
                             if (conv_weights(n)[1] is not None or np.any(uniform != 0)) else None)
        else:
            w, c = gemm_weights(n)
            c = (np.zeros(w.shape[1]) if c is None else c.astype(np.float64)) + v @ w[removable].astype(np.float64)
            set_gemm_weights(n, w[keep], c.astype(np.float32))
    for node in member_nodes.values():
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
    for t in members:
        t.shape = [t.shape[0], new_c] + list(t.shape[2:])
    names = [p.name for p in producers]
    return {
        "channels_before": nch, "channels_after": new_c,
        "constant": int((removable & const_all).sum()), "unused": int((removable & ~used & ~const_all).sum()),
        "producers": names, "modules": [module_of(n) or n for n in names],
        "readers": [n.name for n, _ in consumers],
    }
