"""Sample-independent inputs of a channel Concat, folded into the layers that read it (exact).

An all-zero conv outputs its bias everywhere; inside a dense-concatenation block (DenseNet), an
Inception-style branch or a fire module that constant is one input of a channel Concat, so the
Concat's output is live data in some channels and a known tensor in the others. Everything between
the Concat and the layers that contract its channels keeps channel c in channel c (BatchNormalization,
activations, per-channel constants, pooling, depthwise convs, and further channel Concats: DenseNet
concatenates every layer's output onto its input). Each of those ops is split into the same op on the
live channels and on the constant ones, and each contracting layer ``W [x; c] + b`` into
``W_x x + b`` followed by an Add of ``W_c c``: the zero padding of a kxk reader makes that Add a
border map, as in dead_channels. The constant side is built as ordinary nodes whose inputs are all
constants; constant folding then evaluates it with onnxruntime's own kernels, so a non-uniform
constant (a zero 1x1 conv followed by a padded 3x3) and a pooled one come out exact too. A uniform
response is later shrunk to ``(1, C, 1, 1)`` and folded into the reader's bias by the canonical passes.

The constant side keeps a batch of 1 and only meets live data in those Adds, where it broadcasts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from egp_deploy.surgery._graph import (
    add_constant_after, bypass, channels, const_value, conv_weights, fresh_name, gemm_weights, new_const,
    set_conv_weights, set_gemm_weights, static_shape,
)
from egp_deploy.surgery.constant_channels import (
    BINARY, _aligned, _contracting, _member_data_inputs, _producer_kind,
)


@dataclass
class ConcatRegion:
    """What a channel Concat's output reaches through channel-keeping ops, up to the layers that
    contract its channels."""

    nodes: list[gs.Node]  # channel-keeping ops and channel Concats, in graph order
    exits: list[tuple[gs.Node, gs.Tensor]]  # (Conv or Gemm, the region tensor it contracts)


def is_channel_concat(node: gs.Node) -> bool:
    """A Concat along axis 1 with a known output rank and static channel counts on every input."""
    if node.op != "Concat" or len(node.outputs) != 1 or not node.inputs:
        return False
    shape = static_shape(node.outputs[0])
    if shape is None or len(shape) < 2:
        return False
    axis = int(node.attrs.get("axis", 1))
    return (axis + len(shape) if axis < 0 else axis) == 1 and all(channels(x) is not None for x in node.inputs)


def _keeps_channels_of(node: gs.Node, t: gs.Tensor, graph: gs.Graph) -> bool:
    """``node`` maps channel c of ``t``, its only live data input (read once), to channel c of its output."""
    if _producer_kind(node) is not None or sum(x is t for x in node.inputs) != 1:
        return False
    return _member_data_inputs(node, graph) == [[x is t for x in node.inputs].index(True)]


def concat_region(graph: gs.Graph, concat: gs.Node) -> ConcatRegion | None:
    """The region of ``concat``'s output, or None when some reader cannot be split (a graph output, a
    layout op, an element-wise op with a second live input, a grouped conv, ...)."""
    if not is_channel_concat(concat):
        return None
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    nodes: dict[int, gs.Node] = {}
    exits: list[tuple[gs.Node, gs.Tensor]] = []
    frontier, seen = [concat.outputs[0]], {concat.outputs[0].name}
    while frontier:
        t = frontier.pop()
        if t in graph.outputs:
            return None
        for n in t.outputs:
            if _contracting(n, t):
                exits.append((n, t))
                continue
            if not is_channel_concat(n) and not _keeps_channels_of(n, t, graph):
                return None
            out = n.outputs[0]
            nodes[id(n)] = n
            if out.name not in seen:
                seen.add(out.name)
                frontier.append(out)
    if not exits:
        return None
    return ConcatRegion(sorted(nodes.values(), key=lambda n: order[id(n)]), exits)


def sample_independent(graph: gs.Graph) -> Callable[[gs.Tensor], bool]:
    """A predicate: the tensor is computed from constants only (the same for every sample). One pass
    over the (topologically sorted) nodes, so deep graphs cost no recursion."""
    fixed: set[str] = set()
    for node in graph.nodes:
        ins = [x for x in node.inputs if x.name]
        if (ins or node.op == "Constant") and all(isinstance(x, gs.Constant) or x.name in fixed for x in ins):
            fixed.update(o.name for o in node.outputs)
    return lambda t: isinstance(t, gs.Constant) or t.name in fixed


def _concat(graph: gs.Graph, parts: list[gs.Tensor], base: str) -> gs.Tensor:
    if len(parts) == 1:
        return parts[0]
    out = gs.Variable(fresh_name(base + ".constant_part"), dtype=parts[0].dtype)
    graph.nodes.append(gs.Node("Concat", name=fresh_name(base + "/egp_constant_part"), attrs={"axis": 1},
                               inputs=list(parts), outputs=[out]))
    return out


def _channel_slice(node: gs.Node, x: gs.Tensor, nch: int, rank: int, sel: np.ndarray) -> gs.Tensor:
    """``x``, a constant operand of a channel-keeping op, restricted to the channels ``sel``."""
    c = const_value(x)
    if c is None:
        return x
    if node.op == "BatchNormalization":
        return new_const(np.ascontiguousarray(c[sel]), node.name + ".bn")
    if node.op == "PRelu" or node.op in BINARY:
        a = _aligned(c, rank)
        return x if a is None or a.shape[1] != nch else new_const(np.ascontiguousarray(a[:, sel]), node.name + ".c")
    if node.op == "Conv":  # depthwise: weight and bias rows
        return new_const(np.ascontiguousarray(c[sel]), node.name + ".weight")
    return x


def _split_member(graph: gs.Graph, node: gs.Node, t: gs.Tensor, side: gs.Tensor, removed: np.ndarray) -> gs.Tensor:
    """Narrow a channel-keeping op to the live channels; return its copy on the constant channels."""
    out = node.outputs[0]
    nch, rank = removed.size, len(static_shape(out))
    part = gs.Variable(fresh_name(out.name + ".constant_part"), dtype=out.dtype)
    copy_attrs = dict(node.attrs)
    if node.op == "Conv":
        copy_attrs["group"] = int(removed.sum())
        node.attrs["group"] = int((~removed).sum())
    copy_inputs = [side if x is t else _channel_slice(node, x, nch, rank, removed) for x in node.inputs]
    node.inputs = [x if x is t else _channel_slice(node, x, nch, rank, ~removed) for x in node.inputs]
    graph.nodes.append(gs.Node(node.op, name=fresh_name(node.name + "/egp_constant_part"), attrs=copy_attrs,
                               inputs=copy_inputs, outputs=[part]))
    return part


def absorb_concat_constants(graph: gs.Graph, concat: gs.Node, constant: Callable[[gs.Tensor], bool]
                            ) -> dict[str, Any] | None:
    """Drop the inputs of ``concat`` that ``constant`` says are sample-independent and fold them into
    the readers of its region; None (nothing changed) when the region cannot be split or when no
    input, or every input, is constant."""
    region = concat_region(graph, concat)
    if region is None:
        return None
    is_const = [constant(x) for x in concat.inputs]
    if all(is_const) or not any(is_const):
        return None
    start = concat.outputs[0]
    removed = {start.name: np.concatenate([np.full(channels(x), c) for x, c in zip(concat.inputs, is_const)])}
    side = {start.name: _concat(graph, [x for x, c in zip(concat.inputs, is_const) if c], concat.name)}
    live = {start.name: start}
    concat.inputs = [x for x, c in zip(concat.inputs, is_const) if not c]
    for node in region.nodes:
        out = node.outputs[0]
        live[out.name] = out
        if node.op == "Concat":
            removed[out.name] = np.concatenate([removed.get(x.name, np.zeros(channels(x), bool)) for x in node.inputs])
            side[out.name] = _concat(graph, [side[x.name] for x in node.inputs if x.name in side], node.name)
        else:
            t = next(x for x in node.inputs if x.name in removed)
            removed[out.name] = removed[t.name]
            side[out.name] = _split_member(graph, node, t, side[t.name], removed[t.name])
    for node, t in region.exits:
        rm = removed[t.name]
        response = gs.Variable(fresh_name(node.outputs[0].name + ".constant_part"), dtype=node.outputs[0].dtype)
        name = fresh_name(node.name + "/egp_constant_part")
        if _producer_kind(node) == "conv":
            w, b = conv_weights(node)
            weight = new_const(np.ascontiguousarray(w[:, rm]), node.name + ".weight")
            graph.nodes.append(gs.Node("Conv", name=name, attrs=dict(node.attrs), inputs=[side[t.name], weight],
                                       outputs=[response]))
            set_conv_weights(node, np.ascontiguousarray(w[:, ~rm]), b)
        else:
            w, c = gemm_weights(node)
            weight = new_const(np.ascontiguousarray(w[rm]), node.name + ".weight")
            graph.nodes.append(gs.Node("MatMul", name=name, inputs=[side[t.name], weight], outputs=[response]))
            set_gemm_weights(node, np.ascontiguousarray(w[~rm]), c)
        add_constant_after(graph, node, response)
    for name, rm in removed.items():  # the live tensors keep their other dims
        t = live[name]
        t.shape = [t.shape[0], int((~rm).sum())] + list(t.shape[2:])
    record = {"concat": concat.name, "channels_before": int(removed[start.name].size),
              "channels_after": int((~removed[start.name]).sum()),
              "readers": [n.name for n, _ in region.exits]}
    if len(concat.inputs) == 1:
        bypass(graph, concat)
    return record
