"""Data-dependent strips: an activation whose channels each stayed in one linear region on the
calibration data is replaced by that per-channel linear map (identity when every channel was ON:
the node is simply deleted). Channels stuck OFF or saturated in an otherwise live activation are
pinned to their constant with a per-channel mask. The Mul/Add this leaves behind is folded into
the preceding Conv/Gemm by canonicalisation, and constant channels are then eliminated."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from egp_deploy.surgery._graph import set_list, bypass, fresh_name, new_const
from egp_deploy.surgery.activation_stats import ActivationStats


def _affine_for(stats: ActivationStats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per channel (linear?, scale, shift) for the region each channel stayed in."""
    states = stats.channel_states()
    c = stats.channels
    scale = np.ones(c, np.float32)
    shift = np.zeros(c, np.float32)
    linear = states != "mixed"
    if stats.op in ("Relu", "Clip"):
        const = (states == "off") | (states == "sat")
        scale[const] = 0.0
        shift[states == "off"] = 0.0 if stats.op == "Relu" else stats.low
        shift[states == "sat"] = stats.high
    else:  # LeakyRelu / PRelu: the negative region is a scale
        slope = np.broadcast_to(np.asarray(stats.extra.get("slope", 0.01), np.float32).reshape(-1), (c,)) \
            if np.asarray(stats.extra.get("slope", 0.01)).size in (1, c) else None
        neg = states == "neg"
        if slope is None:
            linear &= ~neg
        else:
            scale[neg] = slope[neg]
    return linear, scale, shift


def _param_shape(stats: ActivationStats) -> tuple[int, ...]:
    if stats.channel_axis == stats.rank - 1 or stats.rank < 2:
        return (stats.channels,)
    return (stats.channels,) + (1,) * (stats.rank - 2)


def _append_affine(graph: gs.Graph, node: gs.Node, src: gs.Tensor, scale: np.ndarray, shift: np.ndarray,
                   pshape: tuple[int, ...], keep_output: gs.Tensor, tag: str = "egp_") -> None:
    """keep_output := src * scale + shift (only the ops that are not neutral)."""
    steps = []
    if np.any(scale != 1.0):
        steps.append(("Mul", scale))
    if np.any(shift != 0.0):
        steps.append(("Add", shift))
    cur = src
    for i, (op, vec) in enumerate(steps):
        last = i == len(steps) - 1
        out = keep_output if last else gs.Variable(fresh_name(node.name + "." + op.lower()), dtype=np.float32)
        graph.nodes.append(gs.Node(op, name=fresh_name(node.name + "/" + tag + op.lower()),
                                   inputs=[cur, new_const(vec.reshape(pshape), node.name + "." + op.lower())],
                                   outputs=[out]))
        cur = out


PIN_TAG = "egp_pin_"


def unpin_survivors(graph: gs.Graph, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pins exist only so that dead-channel elimination can remove the pinned channels. Where a pin
    is still in the graph, its remaining channels could not be removed: drop the pin (the original
    activation is more faithful off the calibration data) and report only what was eliminated."""
    remaining: dict[str, int] = {}
    for node in list(graph.nodes):
        if PIN_TAG not in node.name or not node.outputs:
            continue
        owner = node.name.split("/" + PIN_TAG)[0]
        if node.op == "Mul":
            m = np.asarray(node.inputs[1].values) if isinstance(node.inputs[1], gs.Constant) else None
            remaining[owner] = remaining.get(owner, 0) + (int((m == 0).sum()) if m is not None else 0)
        set_list(node.inputs, node.inputs[:1])
        bypass(graph, node)
    graph.cleanup()
    kept = []
    for rec in records:
        if "pinned" not in rec:
            kept.append(rec)
            continue
        eliminated = rec["pinned"] - remaining.get(rec["node"], 0)
        if eliminated > 0:
            kept.append({**rec, "pinned": eliminated,
                         "action": f"{eliminated} always-constant channels eliminated"})
    return kept


def strip_activations(
    graph: gs.Graph, stats: dict[str, ActivationStats], module_of: Callable[[str], str | None] = lambda n: None,
) -> list[dict[str, Any]]:
    """Apply the strips; returns one record per touched activation (all data-dependent)."""
    records = []
    for node in list(graph.nodes):
        st = stats.get(node.name)
        if st is None or node.op != st.op or not node.outputs:
            continue
        linear, scale, shift = _affine_for(st)
        states = st.channel_states()
        pshape = _param_shape(st)
        summary = {r: int((states == r).sum()) for r in list(st.counts) + ["mixed"]}
        rec = {"node": node.name, "module": module_of(node.name), "op": node.op, "channels": st.channels,
               "always": summary, "entropy": st.layer_entropy, "data_dependent": True}
        if linear.all():
            y = node.outputs[0]
            x = node.inputs[0]
            if np.all(scale == 1.0) and np.all(shift == 0.0):
                if bypass(graph, node):
                    records.append({**rec, "action": "removed (always linear)"})
                continue
            node.outputs.clear()
            node.inputs.clear()
            _append_affine(graph, node, x, scale, shift, pshape, y)
            records.append({**rec, "action": "replaced by per-channel linear map"})
        else:
            const = (scale == 0.0) & linear
            if not const.any():
                continue
            y = node.outputs[0]
            mid = gs.Variable(fresh_name(node.name + ".out"), dtype=np.float32)
            set_list(node.outputs, [mid])
            m = np.where(const, 0.0, 1.0).astype(np.float32)
            s = np.where(const, shift, 0.0).astype(np.float32)
            _append_affine(graph, node, mid, m, s, pshape, y, tag=PIN_TAG)
            records.append({**rec, "action": f"pinned {int(const.sum())} constant channels",
                            "pinned": int(const.sum())})
    graph.cleanup().toposort()
    return records
