"""A Conv or Gemm layer as an affine map (weights, bias, geometry) and the exact compositions of two
of them (and of a layer with a residual identity) that chain_merge turns into one layer; see
chain_merge for the table of what composes exactly."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from egp_deploy.surgery._graph import (
    constant_input_response, conv_attrs, conv_weights, dense_conv_weight, gemm_weights, spatial_static, static_shape,
)


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
