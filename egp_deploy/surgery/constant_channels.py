"""Constant-channel analysis: which channels of which tensors are the same for every sample.

A channel is *constant* when every sample sees the same value in it at every position (an all-zero
weight row outputs its bias; a channel pinned by an always-OFF activation outputs 0; constants
stay constant through element-wise and pooling ops). ``constant_channels`` propagates (mask,
value) per channel through the graph; dead_channels and constant_layers act on it.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from egp_deploy.surgery._graph import (
    channels, const_value, conv_attrs, conv_weights, gemm_weights, has_padding, static_shape,
)

UNARY_FN: dict[str, Callable[[np.ndarray, gs.Node], np.ndarray]] = {
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
UNARY_OTHER = {"Selu", "Celu"}
BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Max": np.maximum,
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
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}

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
    if op in UNARY_FN or op in UNARY_OTHER:
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
    if op in POOLS:
        if len(node.outputs) > 1 and node.outputs[1].outputs:
            return None
        return [0] if channels(node.inputs[0]) == nch else None
    if op == "Flatten":
        s = static_shape(node.inputs[0])
        if node.attrs.get("axis", 1) == 1 and s and len(s) >= 2 and all(d == 1 for d in s[2:]):
            return [0]
        return None
    if op in BINARY and len(node.inputs) == 2:
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


def constant_channels(graph: gs.Graph, hook: Callable | None = None) -> dict[str, Info]:
    """Forward analysis: which channels of each tensor are sample-independent uniform constants.

    ``hook(node, get)``: infos of the outputs of nodes this analysis does not know (channel routes and
    grouped convs, channel_routes.constant_hook), or None."""
    info: dict[str, Info] = {}

    def get(t: gs.Tensor, nch: int) -> Info:
        i = info.get(t.name)
        if i is None or i[0].shape[0] != nch:
            return np.zeros(nch, bool), np.zeros(nch)
        return i

    for node in graph.nodes:
        if not node.outputs:
            continue
        extra = hook(node, get) if hook is not None else None
        if extra:
            info.update(extra)
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
            if node.op in BINARY:
                fn = BINARY[node.op]
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
            if node.op in UNARY_FN:
                with np.errstate(all="ignore"):
                    val = UNARY_FN[node.op](iv, node)
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
            elif node.op in POOLS or node.op == "Flatten":
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
