"""Merging adjacent linear layers (nothing non-linear between them) into one.

Exact merges:
  Gemm -> Gemm                      W = W1 W2, b = b1 W2 + b2
  Conv (any k, grouped too) -> 1x1  one conv with the first conv's geometry
  1x1 -> Conv (any k)               one conv with the second conv's geometry; the first bias meets
                                    the second conv's zero padding, so near the border it becomes a
                                    position-dependent constant added after the merged conv
  Add(Conv(x), x)                   the residual identity folded in as +1 at the kernel centre
Inexact (only with allow_inexact): k x k -> k x k with padding on both, kernel k1 + s1 (k2 - 1);
the border ring differs because the intermediate map was zero-padded; verification reports it.
A cost model refuses any merge whose MACs exceed ``max_mac_growth`` x the pair's MACs.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from egp_deploy.surgery._graph import (
    constant_input_response, conv_attrs, conv_weights, dense_conv_weight, fresh_name, gemm_weights,
    has_padding, new_const, only_consumer, set_conv_attrs, set_conv_weights, set_gemm_weights,
    spatial_static, static_shape,
)


def _macs(w_shape, out_shape) -> int:
    return int(np.prod(w_shape)) * int(np.prod(out_shape[2:]))


def _is_pointwise(a: dict[str, Any]) -> bool:
    return all(k == 1 for k in a["kernel"]) and all(s == 1 for s in a["strides"]) and not has_padding(a)


def _fuse(graph: gs.Graph, first: gs.Node, second: gs.Node) -> None:
    """second now reads first's input; first is disconnected."""
    second.inputs[0] = first.inputs[0]
    first.outputs.clear()
    first.inputs.clear()


def _merge_conv_pair(graph, a_node, b_node, max_growth, allow_inexact) -> dict[str, Any] | None:
    wa, ba = conv_weights(a_node)
    wb, bb = conv_weights(b_node)
    aa, ab = conv_attrs(a_node, wa.shape), conv_attrs(b_node, wb.shape)
    mid, out = a_node.outputs[0], b_node.outputs[0]
    if aa is None or ab is None or wa.ndim != wb.ndim or wa.ndim not in (3, 4):
        return None
    ms, os_ = static_shape(mid), static_shape(out)
    if not spatial_static(mid) or not spatial_static(out):
        return None
    wa_d = dense_conv_weight(wa, aa["group"]).astype(np.float64)
    wb_d = dense_conv_weight(wb, ab["group"]).astype(np.float64)
    ba64 = np.zeros(wa.shape[0]) if ba is None else ba.astype(np.float64)
    bb64 = np.zeros(wb.shape[0]) if bb is None else bb.astype(np.float64)
    border = None
    inexact = False
    if _is_pointwise(ab):
        kind = "conv + 1x1"
        b2 = wb_d.reshape(wb.shape[0], -1)
        w = np.tensordot(b2, wa_d, axes=([1], [0]))
        bias = b2 @ ba64 + bb64
        attrs = dict(aa, group=1)
    elif _is_pointwise(aa):
        kind = "1x1 + conv"
        a2 = wa_d.reshape(wa.shape[0], -1)  # (C1, Cin)
        w = np.moveaxis(np.tensordot(wb_d, a2, axes=([1], [0])), -1, 1)
        uniform = wb_d.reshape(wb_d.shape[0], wb_d.shape[1], -1).sum(axis=2) @ ba64
        bias = uniform + bb64
        attrs = dict(ab, group=1)
        if has_padding(ab) and np.any(ba64 != 0):
            full = constant_input_response(ba64, wb_d, ab, [int(d) for d in ms[2:]])
            border = full - uniform.reshape((-1,) + (1,) * (full.ndim - 1))
            if not np.any(border != 0):
                border = None
    elif allow_inexact and all(d == 1 for d in aa["dilations"] + ab["dilations"]) \
            and all(s == 1 for s in ab["strides"]):
        kind = "k x k + k x k (inexact at the border)"
        inexact = True
        sa = aa["strides"]
        nd = wa.ndim - 2
        ka, kb = list(wa.shape[2:]), list(wb.shape[2:])
        kc = [ka[i] + sa[i] * (kb[i] - 1) for i in range(nd)]
        w = np.zeros((wb.shape[0], wa.shape[1] * aa["group"]) + tuple(kc))
        for p in np.ndindex(*kb):
            block = np.tensordot(wb_d[(slice(None), slice(None)) + p], wa_d, axes=([1], [0]))
            sl = tuple(slice(sa[i] * p[i], sa[i] * p[i] + ka[i]) for i in range(nd))
            w[(slice(None), slice(None)) + sl] += block
        bias = wb_d.reshape(wb_d.shape[0], wb_d.shape[1], -1).sum(axis=2) @ ba64 + bb64
        pads = [aa["pads"][i] + sa[i % nd] * ab["pads"][i] for i in range(2 * nd)]
        attrs = {"kernel": kc, "strides": sa, "dilations": [1] * nd, "pads": pads, "group": 1}
    else:
        return None
    before = _macs(wa.shape, ms) + _macs(wb.shape, os_)
    after = _macs(w.shape, os_)
    if after > max_growth * before:
        return None
    set_conv_attrs(b_node, attrs)
    set_conv_weights(b_node, w.astype(np.float32), bias.astype(np.float32))
    _fuse(graph, a_node, b_node)
    if border is not None:
        from egp_deploy.surgery.dead_channels import _add_after

        _add_after(graph, b_node, border.astype(np.float32)[None])
    return {"kind": kind, "first": a_node.name, "second": b_node.name, "macs_before": before,
            "macs_after": after, "exact": not inexact, "border_bias": border is not None}


def _merge_gemm_pair(graph, a_node, b_node, max_growth) -> dict[str, Any] | None:
    wa, ca = gemm_weights(a_node)
    wb, cb = gemm_weights(b_node)
    w = wa.astype(np.float64) @ wb.astype(np.float64)
    c = (np.zeros(wa.shape[1]) if ca is None else ca.astype(np.float64)) @ wb + \
        (np.zeros(wb.shape[1]) if cb is None else cb.astype(np.float64))
    before, after = wa.size + wb.size, w.size
    if after > max_growth * before:
        return None
    set_gemm_weights(b_node, w.astype(np.float32), c.astype(np.float32))
    _fuse(graph, a_node, b_node)
    return {"kind": "gemm + gemm", "first": a_node.name, "second": b_node.name, "macs_before": before,
            "macs_after": after, "exact": True, "border_bias": False}


def _matmul_weight(node: gs.Node) -> np.ndarray | None:
    """The constant 2-D right operand of x @ W."""
    if node.op != "MatMul" or len(node.inputs) != 2 or not isinstance(node.inputs[0], gs.Variable):
        return None
    from egp_deploy.surgery._graph import const_value

    w = const_value(node.inputs[1])
    return w if w is not None and w.ndim == 2 else None


def _merge_matmul_chain(graph, first: gs.Node, max_growth) -> dict[str, Any] | None:
    """x @ W1 [+ b1] @ W2  ->  x @ (W1 W2) [+ b1 W2] (exact; b1 must broadcast along the last axis)."""
    from egp_deploy.surgery._graph import const_value

    w1 = _matmul_weight(first)
    if w1 is None:
        return None
    nxt = only_consumer(first.outputs[0], graph)
    bias, bias_node = None, None
    if nxt is not None and nxt.op == "Add" and len(nxt.inputs) == 2:
        other = nxt.inputs[1] if nxt.inputs[0] is first.outputs[0] else nxt.inputs[0]
        b = const_value(other)
        if b is None or b.size != w1.shape[1] or (b.ndim > 1 and b.shape[-1] != w1.shape[1]):
            return None
        bias, bias_node = b.reshape(-1).astype(np.float64), nxt
        nxt = only_consumer(nxt.outputs[0], graph)
    if nxt is None or _matmul_weight(nxt) is None or nxt.inputs[0] is not (bias_node or first).outputs[0]:
        return None
    w2 = _matmul_weight(nxt)
    if w2.shape[0] != w1.shape[1]:
        return None
    before, after = w1.size + w2.size, w1.shape[0] * w2.shape[1]
    if after > max_growth * before:
        return None
    w = (w1.astype(np.float64) @ w2.astype(np.float64)).astype(np.float32)
    nxt.inputs[1] = new_const(w, (nxt.name or "matmul") + ".weight")
    nxt.inputs[0] = first.inputs[0]
    for n in (first, bias_node):
        if n is not None:
            n.outputs.clear()
            n.inputs.clear()
    if bias is not None and np.any(bias != 0):
        out = nxt.outputs[0]
        mid = gs.Variable(fresh_name(out.name + ".pre_bias"), dtype=out.dtype)
        nxt.outputs[0] = mid
        graph.nodes.append(gs.Node("Add", name=fresh_name((nxt.name or "matmul") + "/egp_bias"),
                                   inputs=[mid, new_const((bias @ w2.astype(np.float64)).astype(np.float32),
                                                          (nxt.name or "matmul") + ".bias")],
                                   outputs=[out]))
    return {"kind": "matmul + matmul", "first": first.name, "second": nxt.name, "macs_before": before,
            "macs_after": after, "exact": True, "border_bias": False}


def _fold_residual(graph: gs.Graph, add: gs.Node) -> dict[str, Any] | None:
    """Add(Conv(x), x) with a 'same' stride-1 conv and Cout == Cin: +1 at the kernel centre."""
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    for ci in (0, 1):
        y, x = add.inputs[ci], add.inputs[1 - ci]
        conv = y.inputs[0] if isinstance(y, gs.Variable) and y.inputs else None
        if conv is None or conv.op != "Conv" or conv.inputs[0] is not x or only_consumer(y, graph) is not add:
            continue
        wb = conv_weights(conv)
        if wb is None:
            continue
        w, b = wb
        a = conv_attrs(conv, w.shape)
        if a is None or a["group"] != 1 or w.shape[0] != w.shape[1] or any(s != 1 for s in a["strides"]):
            continue
        nd = w.ndim - 2
        k = a["kernel"]
        centre = []
        ok = True
        for i in range(nd):
            if k[i] % 2 == 0 or a["pads"][i] != a["pads"][i + nd] or a["pads"][i] != a["dilations"][i] * (k[i] // 2):
                ok = False
            centre.append(k[i] // 2)
        xs, ys = static_shape(x), static_shape(y)
        if not ok or xs is None or ys is None or list(xs) != list(ys):
            continue
        w = w.copy()
        idx = np.arange(w.shape[0])
        w[(idx, idx) + tuple(centre)] += 1.0
        set_conv_weights(conv, w, b)
        out = add.outputs[0]
        add.outputs.clear()
        add.inputs.clear()
        conv.outputs[0] = out
        return {"kind": "residual identity folded (+I)", "first": conv.name, "second": add.name,
                "macs_before": None, "macs_after": None, "exact": True, "border_bias": False}
    return None


def merge_linear(graph: gs.Graph, max_mac_growth: float = 1.0, allow_inexact: bool = False,
                 module_of: Callable[[str], str | None] = lambda n: None) -> list[dict[str, Any]]:
    """Merge until nothing more merges; returns one record per merge."""
    records = []
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if not node.outputs or not node.inputs:
                continue
            rec = None
            if node.op == "Add":
                rec = _fold_residual(graph, node)
            elif node.op == "MatMul":
                rec = _merge_matmul_chain(graph, node, max_mac_growth)
            elif node.op in ("Conv", "Gemm"):
                nxt = only_consumer(node.outputs[0], graph)
                if nxt is None or nxt.op != node.op or not nxt.inputs or nxt.inputs[0] is not node.outputs[0]:
                    continue
                if node.op == "Conv" and conv_weights(node) and conv_weights(nxt):
                    rec = _merge_conv_pair(graph, node, nxt, max_mac_growth, allow_inexact)
                elif node.op == "Gemm" and gemm_weights(node) and gemm_weights(nxt):
                    rec = _merge_gemm_pair(graph, node, nxt, max_mac_growth)
            if rec:
                rec["modules"] = [module_of(rec["first"]) or rec["first"], module_of(rec["second"]) or rec["second"]]
                records.append(rec)
                changed = True
        graph.cleanup().toposort()
    return records
