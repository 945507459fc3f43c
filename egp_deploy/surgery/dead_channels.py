"""Dead channels and constant layers, eliminated structurally (exact).

A channel is *constant* when every sample sees the same value in it at every position (an all-zero
weight row outputs its bias; a channel pinned by an always-OFF activation outputs 0; constants
stay constant through element-wise and pooling ops). A channel is *unused* when every layer that
reads it has all-zero weights for it. Either way the channel can go: its producer loses an output
row, every reader loses an input column and absorbs the constant into its bias (near a zero-padded
border the absorbed constant is position-dependent: it becomes a constant map added after the
reader, which needs static spatial shapes).

Channels are tracked through *channel groups*: tensors joined by ops that keep channel c in channel
c (element-wise ops, residual adds, BatchNormalization, pooling, depthwise convs, Flatten of a
(N, C, 1, 1) map). A channel of a residual stage can only go where it is dead in every producer of
the group. A tensor that is constant in all channels is replaced by a constant and folded forward
(an all-zero layer becomes its bias; a residual branch that became constant becomes a bias add).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from egp_deploy.surgery._graph import (
    channels, const_value, constant_input_response, conv_attrs, conv_weights, fresh_name, gemm_weights,
    has_padding, new_const, producer, redirect, set_conv_weights, set_gemm_weights, spatial_static,
    static_shape,
)

_UNARY_FN: dict[str, Callable[[np.ndarray, gs.Node], np.ndarray]] = {
    "Relu": lambda v, n: np.maximum(v, 0.0),
    "Identity": lambda v, n: v,
    "Dropout": lambda v, n: v,
    "LeakyRelu": lambda v, n: np.where(v > 0, v, v * n.attrs.get("alpha", 0.01)),
    "Sigmoid": lambda v, n: 1.0 / (1.0 + np.exp(-v)),
    "Tanh": lambda v, n: np.tanh(v),
    "Neg": lambda v, n: -v,
    "Abs": lambda v, n: np.abs(v),
    "HardSigmoid": lambda v, n: np.clip(v * n.attrs.get("alpha", 0.2) + n.attrs.get("beta", 0.5), 0, 1),
    # smooth activations and the pieces of GELU's Erf/Tanh forms: a constant channel stays constant
    "Erf": lambda v, n: _erf(v),
    "Gelu": lambda v, n: _gelu(v, n.attrs.get("approximate", "none")),
    "HardSwish": lambda v, n: v * np.clip(v / 6.0 + 0.5, 0, 1),
    "Softplus": lambda v, n: np.logaddexp(0.0, v),
    "Mish": lambda v, n: v * np.tanh(np.logaddexp(0.0, v)),
    "Exp": lambda v, n: np.exp(v),
    "Sqrt": lambda v, n: np.sqrt(v),
    "Softsign": lambda v, n: v / (1.0 + np.abs(v)),
    "Elu": lambda v, n: np.where(v > 0, v, n.attrs.get("alpha", 1.0) * np.expm1(np.minimum(v, 0))),
}
_UNARY_OTHER = {"Selu", "Celu"}
_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Max": np.maximum,
           "Min": np.minimum, "Pow": np.power}


def _erf(v: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(np.asarray(v, np.float64))


def _gelu(v: np.ndarray, approximate: str | bytes = "none") -> np.ndarray:
    v = np.asarray(v, np.float64)
    if (approximate.decode() if isinstance(approximate, bytes) else approximate) == "tanh":
        return 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
    return 0.5 * v * (1.0 + _erf(v / math.sqrt(2.0)))


def zero_matmul(node: gs.Node) -> bool:
    """MatMul(x, W) with a constant all-zero W: its output is 0 whatever x is."""
    if node.op != "MatMul" or len(node.inputs) != 2 or not isinstance(node.inputs[0], gs.Variable):
        return False
    w = const_value(node.inputs[1])
    return w is not None and w.ndim >= 2 and w.size > 0 and not np.any(w)
_POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}

Info = tuple[np.ndarray, np.ndarray]  # (constant mask, value) per channel


def _aligned(c: np.ndarray, rank: int) -> np.ndarray | None:
    if c.ndim > rank:
        return None
    return c.reshape((1,) * (rank - c.ndim) + c.shape)


def _per_channel(c: np.ndarray, rank: int, nch: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A broadcast constant operand as (value per channel, uniform-over-positions per channel)."""
    a = _aligned(c, rank)
    if a is None or a.shape[0] != 1 or a.shape[1] not in (1, nch):
        return None
    a = np.broadcast_to(a, (1, nch) + a.shape[2:]).reshape(nch, -1).astype(np.float64)
    return a[:, 0], np.all(a == a[:, :1], axis=1)


def _member_data_inputs(node: gs.Node, graph: gs.Graph) -> list[int] | None:
    """Indices of the inputs that carry the channel map when ``node`` keeps channel c in channel c."""
    out = node.outputs[0] if node.outputs else None
    if out is None or not node.inputs or not isinstance(node.inputs[0], gs.Variable):
        return None
    nch = channels(out)
    if nch is None:
        return None
    op = node.op
    if op in _UNARY_FN or op in _UNARY_OTHER:
        if op == "Dropout" and len(node.outputs) > 1 and any(o.outputs or o in graph.outputs for o in node.outputs[1:]):
            return None
        return [0] if channels(node.inputs[0]) == nch else None
    if op == "Clip":
        if any(i > 0 and t.name and const_value(t) is None for i, t in enumerate(node.inputs)):
            return None
        return [0] if channels(node.inputs[0]) == nch else None
    if op == "PRelu":
        s = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        rank = len(static_shape(out))
        return [0] if s is not None and _per_channel(s, rank, nch) is not None else None
    if op == "BatchNormalization":
        if len(node.outputs) > 1 and any(o.outputs for o in node.outputs[1:]):
            return None
        if any(const_value(t) is None for t in node.inputs[1:5]):
            return None
        return [0]
    if op in _POOLS:
        if len(node.outputs) > 1 and node.outputs[1].outputs:
            return None
        return [0] if channels(node.inputs[0]) == nch else None
    if op == "Flatten":
        s = static_shape(node.inputs[0])
        if node.attrs.get("axis", 1) == 1 and s and len(s) >= 2 and all(d == 1 for d in s[2:]):
            return [0]
        return None
    if op in _BINARY and len(node.inputs) == 2:
        oshape = static_shape(out)
        if oshape is None:
            return None
        idx = []
        for i, t in enumerate(node.inputs):
            c = const_value(t)
            if c is None:
                if static_shape(t) != oshape:
                    return None
                idx.append(i)
            elif _per_channel(c, len(oshape), nch) is None:
                return None
        return idx or None
    if op == "Conv":
        wb = conv_weights(node)
        if wb is None:
            return None
        a = conv_attrs(node, wb[0].shape)
        if a and a["group"] == nch and wb[0].shape[1] == 1 and channels(node.inputs[0]) == nch:
            return [0]  # depthwise
    return None


def _producer_kind(node: gs.Node) -> str | None:
    if node.op == "Conv":
        wb = conv_weights(node)
        if wb is not None and conv_attrs(node, wb[0].shape) is not None and int(node.attrs.get("group", 1)) == 1:
            return "conv"
    if node.op == "Gemm" and gemm_weights(node) is not None:
        return "gemm"
    return None


def _contracting(node: gs.Node, t: gs.Tensor) -> str | None:
    """A layer that sums over the channels of ``t`` (its data input)."""
    if not node.inputs or node.inputs[0] is not t or any(x is t for x in node.inputs[1:]):
        return None
    kind = _producer_kind(node)
    if kind == "gemm":
        s = static_shape(t)
        return kind if s is not None and len(s) == 2 else None
    return kind


def constant_channels(graph: gs.Graph) -> dict[str, Info]:
    """Forward analysis: which channels of each tensor are sample-independent uniform constants."""
    info: dict[str, Info] = {}

    def get(t: gs.Tensor, nch: int) -> Info:
        i = info.get(t.name)
        if i is None or i[0].shape[0] != nch:
            return np.zeros(nch, bool), np.zeros(nch)
        return i

    for node in graph.nodes:
        if not node.outputs:
            continue
        out = node.outputs[0]
        nch = channels(out)
        if nch is None:
            continue
        kind = _producer_kind(node)
        data = None if kind else _member_data_inputs(node, graph)
        if kind is None and zero_matmul(node):  # an all-zero token linear layer (fc1 of a pruned MLP)
            info[out.name] = (np.ones(nch, bool), np.zeros(nch))
        elif kind == "conv":
            w, b = conv_weights(node)
            a = conv_attrs(node, w.shape)
            cin = w.shape[1]
            im, iv = get(node.inputs[0], cin)
            nz = np.abs(w).reshape(w.shape[0], cin, -1).max(axis=2) != 0
            cv = np.where(im, iv, 0.0)
            mask = ~(nz[:, ~im].any(axis=1))
            bias = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
            if has_padding(a):
                mask &= ~((nz & (cv != 0)[None, :]).any(axis=1))
                val = bias
            else:
                val = bias + w.reshape(w.shape[0], cin, -1).sum(axis=2).astype(np.float64) @ cv
            info[out.name] = (mask, val)
        elif kind == "gemm":
            w, c = gemm_weights(node)
            im, iv = get(node.inputs[0], w.shape[0])
            nz = w != 0
            mask = ~(nz[~im, :].any(axis=0))
            val = (np.zeros(w.shape[1]) if c is None else c.astype(np.float64)) + np.where(im, iv, 0.0) @ w
            info[out.name] = (mask, val)
        elif data is not None:
            rank = len(static_shape(out))
            if node.op in _BINARY:
                fn = _BINARY[node.op]
                parts = []
                for t in node.inputs:
                    c = const_value(t)
                    if c is None:
                        parts.append(get(t, nch))
                    else:
                        v, uni = _per_channel(c, rank, nch)
                        parts.append((uni, v))
                (m0, v0), (m1, v1) = parts
                with np.errstate(all="ignore"):
                    val = fn(v0, v1)
                mask = m0 & m1
                if node.op == "Mul":  # x * 0 is 0 whatever x is
                    zero = (m0 & (v0 == 0)) | (m1 & (v1 == 0))
                    mask |= zero
                    val = np.where(zero, 0.0, val)
                mask &= np.isfinite(val)
                info[out.name] = (mask, np.where(mask, val, 0.0))
                continue
            im, iv = get(node.inputs[0], nch)
            if node.op in _UNARY_FN:
                with np.errstate(all="ignore"):
                    val = _UNARY_FN[node.op](iv, node)
            elif node.op == "Clip":
                lo = const_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None
                hi = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
                lo = node.attrs.get("min", -np.inf) if lo is None else float(lo.reshape(()))
                hi = node.attrs.get("max", np.inf) if hi is None else float(hi.reshape(()))
                val = np.clip(iv, lo, hi)
            elif node.op == "PRelu":
                slope, _ = _per_channel(const_value(node.inputs[1]), rank, nch)
                val = np.where(iv > 0, iv, iv * slope)
            elif node.op == "BatchNormalization":
                g, beta, mean, var = (const_value(t).astype(np.float64) for t in node.inputs[1:5])
                val = (iv - mean) / np.sqrt(var + node.attrs.get("epsilon", 1e-5)) * g + beta
            elif node.op in _POOLS or node.op == "Flatten":
                val = iv
                if node.op == "AveragePool" and node.attrs.get("count_include_pad", 0) and any(node.attrs.get("pads", [])):
                    im = im & (iv == 0)
            elif node.op == "Conv":  # depthwise
                w, b = conv_weights(node)
                a = conv_attrs(node, w.shape)
                wz = np.abs(w).reshape(nch, -1).max(axis=1) == 0
                bias = np.zeros(nch) if b is None else b.astype(np.float64)
                if has_padding(a):
                    im = wz | (im & (iv == 0))
                    val = bias
                else:
                    im = wz | im
                    val = bias + np.where(wz, 0.0, w.reshape(nch, -1).sum(axis=1) * iv)
            else:
                continue
            with np.errstate(all="ignore"):
                im = im & np.isfinite(val)  # e.g. Sqrt of a negative constant: not a usable constant
            info[out.name] = (im, np.where(im, val, 0.0))
    return info


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
                    _add_after(graph, n, border.astype(np.float32)[None])
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
        elif node.op == "PRelu" or node.op in _BINARY:
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


def _add_after(graph: gs.Graph, node: gs.Node, const: np.ndarray) -> None:
    """node's output := node's output + const (an Add node; the output name is kept)."""
    out = node.outputs[0]
    mid = gs.Variable(fresh_name(out.name + ".pre_border"), dtype=out.dtype, shape=out.shape)
    node.outputs[0] = mid
    graph.nodes.append(gs.Node("Add", name=fresh_name((node.name or "conv") + "/egp_border_bias"),
                               inputs=[mid, new_const(const, (node.name or "conv") + ".border_bias")],
                               outputs=[out]))


_CONST_SAFE = set(_UNARY_FN) | _UNARY_OTHER | set(_BINARY) | _POOLS | {
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
        elif node.op not in _BINARY:
            return None
    return closure
