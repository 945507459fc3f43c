"""Small helpers over onnx-graphsurgeon graphs shared by the passes."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from egp_deploy.surgery.changes import next_name_index


def fresh_name(base: str) -> str:
    """A tensor name no pass of this surgery has used yet (graphsurgeon does not dedupe names for
    us); numbered per surgery (changes.name_scope), so the same model gives the same names."""
    return f"{base}__egp{next_name_index()}"


def const_value(t: gs.Tensor | None) -> np.ndarray | None:
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    return None


def constant_operand(node: gs.Node, ops: tuple[str, ...] = ("Add",)) -> tuple[gs.Tensor, np.ndarray, int] | None:
    """(live input, constant, the constant's input index) of a two-input ``ops`` node with exactly one
    constant operand; None otherwise."""
    if node.op not in ops or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    vals = [const_value(t) for t in node.inputs]
    if (vals[0] is None) == (vals[1] is None):
        return None
    ci = 0 if vals[0] is not None else 1
    return node.inputs[1 - ci], vals[ci], ci


def new_const(values: np.ndarray, base: str) -> gs.Constant:
    return gs.Constant(fresh_name(base), np.ascontiguousarray(values))


def producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if len(t.inputs) else None


def only_consumer(t: gs.Tensor, graph: gs.Graph) -> gs.Node | None:
    """The single node reading ``t`` when nothing else (and no graph output) does."""
    if t in graph.outputs or len(t.outputs) != 1:
        return None
    return t.outputs[0]


def static_shape(t: gs.Tensor) -> list[Any] | None:
    shape = getattr(t, "shape", None)
    if shape is None:
        return None
    return list(shape)


def channels(t: gs.Tensor) -> int | None:
    """Dim 1 when statically known."""
    shape = static_shape(t)
    if shape is None or len(shape) < 2 or not isinstance(shape[1], (int, np.integer)):
        return None
    return int(shape[1])


def channel_vector(c: np.ndarray, out_rank: int, channels: int) -> np.ndarray | None:
    """A constant that broadcasts only along axis 1 of a rank-``out_rank`` tensor, as a (C,) vector."""
    if c.size == 1:
        return np.full((channels,), c.reshape(()), dtype=np.float32)
    if c.ndim > out_rank:
        return None
    shape = (1,) * (out_rank - c.ndim) + tuple(c.shape)
    if shape[0] != 1 or shape[1] != channels or any(d != 1 for d in shape[2:]):
        return None
    return c.reshape(channels).astype(np.float32)


def spatial_static(t: gs.Tensor) -> bool:
    shape = static_shape(t)
    return shape is not None and len(shape) >= 2 and all(isinstance(d, (int, np.integer)) and d > 0 for d in shape[1:])


def redirect(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> bool:
    """Make every reader of ``old`` read ``new`` instead; False (nothing done) if ``old`` is a graph output."""
    if old in graph.outputs:
        return False
    for node in list(old.outputs):
        node.inputs = [new if x is old else x for x in node.inputs]
    return True


def bypass(graph: gs.Graph, node: gs.Node, keep: int = 0) -> bool:
    """Remove a node whose output equals its input ``keep`` (Identity-like)."""
    x, y = node.inputs[keep], node.outputs[0]
    if y in graph.outputs:
        # The output name must survive: let x's producer write y instead, when that is safe.
        p = producer(x) if isinstance(x, gs.Variable) else None
        if p is None or x in graph.outputs or len(x.outputs) != 1:
            return False
        p.outputs = [y if o is x else o for o in p.outputs]
        node.outputs.clear()
        node.inputs.clear()
        return True
    redirect(graph, y, x)
    node.outputs.clear()
    node.inputs.clear()
    return True


def conv_attrs(node: gs.Node, weight_shape: tuple[int, ...]) -> dict[str, Any] | None:
    """Normalised Conv attributes (2-D and 1-D); None for auto_pad SAME (pads depend on the input)."""
    k = list(weight_shape[2:])
    nd = len(k)
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad not in ("NOTSET", "VALID"):
        return None
    pads = list(node.attrs.get("pads", [0] * (2 * nd)))
    if auto_pad == "VALID":
        pads = [0] * (2 * nd)
    return {
        "kernel": k,
        "strides": list(node.attrs.get("strides", [1] * nd)),
        "dilations": list(node.attrs.get("dilations", [1] * nd)),
        "pads": pads,
        "group": int(node.attrs.get("group", 1)),
    }


def set_conv_attrs(node: gs.Node, a: dict[str, Any]) -> None:
    node.attrs = {
        "kernel_shape": list(a["kernel"]),
        "strides": list(a["strides"]),
        "dilations": list(a["dilations"]),
        "pads": list(a["pads"]),
        "group": int(a["group"]),
    }


def conv_weights(node: gs.Node) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(W, b) of a Conv with constant weights (b None when absent)."""
    if node.op != "Conv" or len(node.inputs) < 2:
        return None
    w = const_value(node.inputs[1])
    if w is None or w.ndim < 3:
        return None
    b = None
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
        b = const_value(node.inputs[2])
        if b is None:
            return None
    return w, b


def set_conv_weights(node: gs.Node, w: np.ndarray, b: np.ndarray | None) -> None:
    base = node.name or "conv"
    inputs = [node.inputs[0], new_const(w.astype(np.float32, copy=False), base + ".weight")]
    if b is not None:
        inputs.append(new_const(b.astype(np.float32, copy=False), base + ".bias"))
    node.inputs = inputs


def gemm_weights(node: gs.Node) -> tuple[np.ndarray, np.ndarray | None] | None:
    """A Gemm with constant B as (W (K, M) with alpha folded, bias (M,) or None); transA unsupported."""
    if node.op != "Gemm" or node.attrs.get("transA", 0):
        return None
    b = const_value(node.inputs[1])
    if b is None or b.ndim != 2:
        return None
    w = (b.T if node.attrs.get("transB", 0) else b) * np.float32(node.attrs.get("alpha", 1.0))
    c = None
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
        c = const_value(node.inputs[2])
        if c is None:
            return None
        c = c * np.float32(node.attrs.get("beta", 1.0))
        if c.size == 1:
            c = np.full((w.shape[1],), c.reshape(()), dtype=np.float32)
        elif c.ndim == 2 and c.shape[0] == 1:
            c = c.reshape(-1)
        elif c.ndim != 1 or c.shape[0] != w.shape[1]:
            return None  # a per-row bias (N, M): not a weight
    return w.astype(np.float32, copy=False), c


def set_gemm_weights(node: gs.Node, w: np.ndarray, c: np.ndarray | None) -> None:
    base = node.name or "gemm"
    inputs = [node.inputs[0], new_const(np.ascontiguousarray(w.T).astype(np.float32), base + ".weight")]
    if c is not None:
        inputs.append(new_const(c.astype(np.float32), base + ".bias"))
    node.inputs = inputs
    node.attrs = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 1}


def dense_conv_weight(w: np.ndarray, group: int) -> np.ndarray:
    """Expand a grouped conv weight (Cout, Cin/g, k...) to the equivalent dense (Cout, Cin, k...)."""
    if group == 1:
        return w
    cout, cin_g = w.shape[:2]
    out_g = cout // group
    dense = np.zeros((cout, cin_g * group) + w.shape[2:], dtype=w.dtype)
    for g in range(group):
        dense[g * out_g:(g + 1) * out_g, g * cin_g:(g + 1) * cin_g] = w[g * out_g:(g + 1) * out_g]
    return dense


def conv_macs(w_shape: tuple[int, ...], out_shape: list[Any] | None) -> int | None:
    if out_shape is None or not all(isinstance(d, (int, np.integer)) for d in out_shape[2:]):
        return None
    return int(np.prod(w_shape)) * int(np.prod(out_shape[2:]) if len(out_shape) > 2 else 1)


def constant_input_response(
    values: np.ndarray, w: np.ndarray, attrs: dict[str, Any], in_spatial: list[int]
) -> np.ndarray:
    """Output map (Cout, *out_spatial) of a dense conv (no bias) whose input channel c is the constant
    ``values[c]`` everywhere: zero padding makes it position-dependent near the border.

    Separable per spatial axis, so it is a couple of einsums, not a convolution."""
    a = np.tensordot(w, values.astype(np.float64), axes=([1], [0]))  # (Cout, k...)
    masks = []
    for axis, size in enumerate(in_spatial):
        k, s, d = attrs["kernel"][axis], attrs["strides"][axis], attrs["dilations"][axis]
        p0, p1 = attrs["pads"][axis], attrs["pads"][axis + len(in_spatial)]
        out = (size + p0 + p1 - d * (k - 1) - 1) // s + 1
        pos = np.arange(out)[:, None] * s - p0 + np.arange(k)[None, :] * d
        masks.append(((pos >= 0) & (pos < size)).astype(np.float64))  # (out, k)
    if len(in_spatial) == 1:
        res = np.einsum("ok,yk->oy", a, masks[0])
    elif len(in_spatial) == 2:
        res = np.einsum("okl,yk,xl->oyx", a, masks[0], masks[1])
    else:
        raise ValueError("only 1-D and 2-D convolutions")
    return res.astype(np.float32)


def has_padding(attrs: dict[str, Any]) -> bool:
    return any(p != 0 for p in attrs["pads"])


def opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 0


def add_constant_after(graph: gs.Graph, node: gs.Node, const: np.ndarray | gs.Tensor) -> None:
    """node's output := node's output + const (an Add node; the output name is kept). ``const`` is an
    array, or a tensor computed from constants only (constant folding then evaluates it)."""
    out = node.outputs[0]
    mid = gs.Variable(fresh_name(out.name + ".pre_border"), dtype=out.dtype, shape=out.shape)
    node.outputs[0] = mid
    if not isinstance(const, gs.Tensor):
        const = new_const(const, (node.name or "conv") + ".border_bias")
    graph.nodes.append(gs.Node("Add", name=fresh_name((node.name or "conv") + "/egp_border_bias"),
                               inputs=[mid, const], outputs=[out]))
