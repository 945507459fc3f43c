"""Channel routes: ops that move channels from one tensor to another without mixing them.

Concat and Split on the channel axis, a Slice of a channel range, and any chain of Reshape/Transpose
that permutes the channels of a 4-D map (ShuffleNet's channel shuffle). Each is a list of pairs
(source tensor, its channels, destination tensor, its channels): channel ``src_idx[i]`` of the
source IS channel ``dst_idx[i]`` of the destination. dead_channels joins the channel groups on both
sides through them: a channel constant or unused on one side is so on the other, and goes on both.

Grouped (not depthwise) convs are not routes (they mix channels within a group); ``grouped_conv``
says what dead_channels needs of one, and ``constant_hook`` gives constant_channels the constant
channels after a route or a grouped conv.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from egp_deploy.surgery._graph import (
    channels, const_value, conv_attrs, conv_weights, dense_conv_weight, has_padding, new_const, static_shape,
)

LAYOUT_OPS = ("Reshape", "Transpose")


@dataclass
class Route:
    node: gs.Node  # the Concat / Split / Slice, or the last node of a permutation chain
    kind: str  # "concat" | "split" | "slice" | "permute"
    pairs: list[tuple[gs.Tensor, np.ndarray, gs.Tensor, np.ndarray]]
    chain: list[gs.Node] = field(default_factory=list)  # permute: the layout nodes, first to last

    @property
    def sources(self) -> list[gs.Tensor]:
        return [p[0] for p in self.pairs]

    @property
    def destinations(self) -> list[gs.Tensor]:
        return [p[2] for p in self.pairs]


def _axis(node: gs.Node, rank: int, default: int = 0) -> int:
    a = int(node.attrs.get("axis", default))
    return a + rank if a < 0 else a


def _concat(node: gs.Node) -> Route | None:
    out = node.outputs[0]
    s = static_shape(out)
    if s is None or len(s) < 2 or _axis(node, len(s)) != 1 or channels(out) is None:
        return None
    pairs, off = [], 0
    for t in node.inputs:
        c = channels(t)
        if not isinstance(t, gs.Variable) or c is None:
            return None
        pairs.append((t, np.arange(c), out, off + np.arange(c)))
        off += c
    return Route(node, "concat", pairs) if off == channels(out) else None


def _split(node: gs.Node) -> Route | None:
    x = node.inputs[0]
    s = static_shape(x)
    if s is None or len(s) < 2 or _axis(node, len(s)) != 1 or channels(x) is None:
        return None
    sizes = [channels(t) for t in node.outputs]
    if None in sizes or sum(sizes) != channels(x):
        return None
    pairs, off = [], 0
    for t, c in zip(node.outputs, sizes):
        pairs.append((x, off + np.arange(c), t, np.arange(c)))
        off += c
    return Route(node, "split", pairs)


def _slice(node: gs.Node) -> Route | None:
    x, y = node.inputs[0], node.outputs[0]
    cx, cy = channels(x), channels(y)
    if cx is None or cy is None or len(node.inputs) < 4:
        return None
    starts, ends, axes = (const_value(t) for t in node.inputs[1:4])
    steps = const_value(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4].name else None
    if starts is None or ends is None or axes is None or starts.size != 1 or (steps is not None and steps.size != 1):
        return None
    rank = len(static_shape(x))
    if int(axes.reshape(())) % rank != 1 or (steps is not None and int(steps.reshape(())) != 1):
        return None
    start, end = (int(v.reshape(())) for v in (starts, ends))
    start, end = (min(max(v + cx if v < 0 else v, 0), cx) for v in (start, end))
    if end - start != cy:
        return None
    return Route(node, "slice", [(x, start + np.arange(cy), y, np.arange(cy))])


def _replay(chain: list[gs.Node], shape: list[int]) -> np.ndarray | None:
    """The chain applied to an index array of ``shape`` (run-time Reshape targets must be constant)."""
    a = np.arange(int(np.prod(shape))).reshape(shape)
    for n in chain:
        if n.op == "Transpose":
            perm = n.attrs.get("perm")
            if perm is None or len(perm) != a.ndim:
                return None
            a = a.transpose(perm)
        else:
            target = const_value(n.inputs[1]) if len(n.inputs) > 1 else None
            if target is None or (n.attrs.get("allowzero", 0) and not np.all(target)):
                return None  # allowzero: a 0 is a zero-size dim (nothing a model permutes)
            target = [a.shape[i] if int(d) == 0 else int(d) for i, d in enumerate(target.reshape(-1))]
            try:
                a = a.reshape(target)
            except ValueError:
                return None
    return a


def _permutation(graph: gs.Graph, first: gs.Node) -> Route | None:
    """A Reshape/Transpose chain from a 4-D map back to the same shape that moves whole channels."""
    src = first.inputs[0]
    shape = static_shape(src)
    if shape is None or len(shape) != 4 or not all(isinstance(d, (int, np.integer)) for d in shape[1:]):
        return None
    chain, t = [first], first.outputs[0]
    while static_shape(t) != shape or len(chain) < 2:
        if t in graph.outputs or len(t.outputs) != 1 or t.outputs[0].op not in LAYOUT_OPS or len(chain) > 6:
            return None
        chain.append(t.outputs[0])
        t = chain[-1].outputs[0]
    batch = shape[0] if isinstance(shape[0], (int, np.integer)) else 1
    full = [int(batch)] + [int(d) for d in shape[1:]]
    out = _replay(chain, full)
    if out is None or list(out.shape) != full:
        return None
    c, plane = full[1], full[2] * full[3]
    idx = np.arange(int(np.prod(full))).reshape(full)
    p = out.reshape(full[0], c, -1)[0, :, 0] // plane % c
    if not np.array_equal(out, idx[:, p]):
        return None
    return Route(chain[-1], "permute", [(src, p, t, np.arange(c))], chain)


def find_routes(graph: gs.Graph) -> list[Route]:
    routes, in_chain = [], set()
    for node in graph.nodes:
        if not node.outputs or not node.inputs:
            continue
        r = None
        if node.op == "Concat":
            r = _concat(node)
        elif node.op == "Split":
            r = _split(node)
        elif node.op == "Slice":
            r = _slice(node)
        elif node.op in LAYOUT_OPS and id(node) not in in_chain and channels(node.inputs[0]) is not None:
            r = _permutation(graph, node)
            if r is not None:
                in_chain.update(id(n) for n in r.chain)
        if r is not None:
            routes.append(r)
    return routes


# ---------------------------------------------------------------- grouped convs
def grouped_conv(node: gs.Node) -> dict | None:
    """A Conv with 1 < group < channels (depthwise convs are channel-group members): its weight,
    bias, attributes and per-group sizes."""
    if node.op != "Conv":
        return None
    wb = conv_weights(node)
    if wb is None:
        return None
    a = conv_attrs(node, wb[0].shape)
    if a is None or a["group"] <= 1:
        return None
    w, b = wb
    g = a["group"]
    cin = channels(node.inputs[0])
    if cin is None or w.shape[1] == 1 and g == cin and w.shape[0] == cin:
        return None  # depthwise
    if cin != w.shape[1] * g or w.shape[0] % g:
        return None
    return {"w": w, "b": b, "attrs": a, "groups": g, "cin_g": w.shape[1], "cout_g": w.shape[0] // g}


def constant_hook(routes: list[Route]) -> Callable:
    """For constant_channels: (node, get) -> {tensor name: (mask, value)} after a route or a grouped conv."""
    by_node = {id(r.node): r for r in routes}

    def hook(node: gs.Node, get) -> dict | None:
        r = by_node.get(id(node))
        if r is not None:
            out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            for src, si, dst, di in r.pairs:
                m, v = get(src, channels(src))
                mask, val = out.setdefault(dst.name, (np.zeros(channels(dst), bool), np.zeros(channels(dst))))
                mask[di], val[di] = m[si], v[si]
            return out
        gc = grouped_conv(node)
        if gc is None:
            return None
        w = dense_conv_weight(gc["w"], gc["groups"])
        cin = w.shape[1]
        im, iv = get(node.inputs[0], cin)
        nz = np.abs(w).reshape(w.shape[0], cin, -1).max(axis=2) != 0
        cv = np.where(im, iv, 0.0)
        mask = ~(nz[:, ~im].any(axis=1))
        bias = np.zeros(w.shape[0]) if gc["b"] is None else gc["b"].astype(np.float64)
        if has_padding(gc["attrs"]):
            mask &= ~((nz & (cv != 0)[None, :]).any(axis=1))
            val = bias
        else:
            val = bias + w.reshape(w.shape[0], cin, -1).sum(axis=2).astype(np.float64) @ cv
        return {node.outputs[0].name: (mask, np.where(mask, val, 0.0))}

    return hook


# ---------------------------------------------------------------- rewriting routes
def rewrite_route(graph: gs.Graph, r: Route, keep_of: Callable[[gs.Tensor], np.ndarray | None]) -> bool:
    """Adapt a route to its narrowed tensors (``keep_of(t)``: the kept channels, None if unchanged)."""
    if r.kind == "concat":
        return False  # its inputs and output narrow together
    if r.kind == "split":
        sizes = [int(keep_of(t).sum()) if keep_of(t) is not None else channels(t) for t in r.destinations]
        if len(r.node.inputs) > 1 and r.node.inputs[1].name:
            r.node.inputs[1] = new_const(np.asarray(sizes, np.int64), r.node.name + ".split")
        elif "split" in r.node.attrs:
            r.node.attrs["split"] = sizes
        elif len(set(sizes)) != 1:  # num_outputs (opset 18): equal parts only
            r.node.inputs.append(new_const(np.asarray(sizes, np.int64), r.node.name + ".split"))
            r.node.attrs.pop("num_outputs", None)
        return True
    src, si, dst, di = r.pairs[0]
    keep = keep_of(src)
    if keep is None:
        return False
    if r.kind == "slice":
        start = int(keep[: si[0]].sum())
        r.node.inputs[1] = new_const(np.asarray([start], np.int64), r.node.name + ".starts")
        r.node.inputs[2] = new_const(np.asarray([start + int(keep[si].sum())], np.int64), r.node.name + ".ends")
        return True
    # permute: the kept channels in their new order, as one Gather on the channel axis
    new_index = np.cumsum(keep) - 1
    kept_dst = keep_of(dst)
    order = [int(new_index[si[j]]) for j in range(len(si)) if kept_dst is None or kept_dst[j]]
    for n in r.chain:
        n.outputs.clear()
        n.inputs.clear()
    graph.nodes.append(gs.Node("Gather", name=r.node.name or "channel_permutation", attrs={"axis": 1},
                               inputs=[src, new_const(np.asarray(order, np.int64), (r.node.name or "perm") + ".idx")],
                               outputs=[dst]))
    return True
