"""Data-dependent strips: an activation whose channels each stayed in one linear region on the
calibration data is replaced by that per-channel linear map (identity when every channel was ON:
the node is simply deleted). Channels stuck OFF or saturated in an otherwise live activation are
pinned to their constant with a per-channel mask. The Mul/Add this leaves behind is folded into
the preceding Conv/Gemm by canonicalisation, and constant channels are then eliminated."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from egp_deploy.surgery._graph import bypass, fresh_name, new_const
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


def strip_plan(stats: ActivationStats) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(channels the strip replaces, per-channel scale, shift), or None where nothing is stripped:
    every channel when all are linear, else only the constant ones (pinned)."""
    if stats.smooth:
        return None
    linear, scale, shift = _affine_for(stats)
    if linear.all():
        return linear, scale, shift
    const = (scale == 0.0) & linear
    return (const, scale, shift) if const.any() else None


def _slope(stats: ActivationStats) -> np.ndarray:
    s = np.asarray(stats.extra.get("slope", 0.01), np.float64).reshape(-1)
    return np.broadcast_to(s, (stats.channels,)) if s.size in (1, stats.channels) else np.zeros(stats.channels)


def _rectify(stats: ActivationStats, x: np.ndarray) -> np.ndarray:
    if stats.op == "Clip":
        return np.clip(x, stats.low, stats.high)
    if stats.op == "Relu":
        return np.maximum(x, 0.0)
    return np.where(x > 0, x, x * _slope(stats))  # LeakyRelu / PRelu


def strip_error(measured: ActivationStats, other: ActivationStats) -> dict[str, Any] | None:
    """How far the strip made from ``measured`` is off on the data ``other`` was measured on: the
    largest |activation - strip| over the channels it replaces, relative to the largest |activation|
    there (both piecewise linear, so the extremes sit at the seen min/max or a kink between them),
    and how many of those channels left their calibration region. None where nothing is stripped."""
    plan = strip_plan(measured)
    if plan is None:
        return None
    applied, scale, shift = plan
    lo, hi = other.seen_min, other.seen_max
    if lo is None or hi is None or lo.shape != (measured.channels,) or other.op != measured.op:
        return {"held_out_error": float("inf"), "channels_left_region": int(applied.sum()),
                "channels_stripped": int(applied.sum())}
    lo, hi = lo.astype(np.float64), hi.astype(np.float64)
    points = np.stack([lo, hi] + [np.clip(k, lo, hi) for k in _kinks(measured)])
    f = _rectify(measured, points)
    dev = np.abs(f - (points * scale + shift))[:, applied].max()
    size = np.abs(f).max()
    err = 0.0 if dev == 0 else (float(dev / size) if size > 0 else float("inf"))
    left = applied & (other.channel_states() != measured.channel_states())
    return {"held_out_error": err, "channels_left_region": int(left.sum()), "channels_stripped": int(applied.sum())}


def _kinks(stats: ActivationStats) -> list[float]:
    """Where the rectifier changes slope (the finite bounds of a Clip; 0 for the others)."""
    if stats.op == "Clip":
        return [b for b in (stats.low, stats.high) if np.isfinite(b)]
    return [0.0]


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
        node.inputs = node.inputs[:1]
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
        plan = strip_plan(st)  # smooth ones: never exact, never stripped here
        if plan is None:
            continue
        applied, scale, shift = plan
        states = st.channel_states()
        pshape = _param_shape(st)
        summary = {r: int((states == r).sum()) for r in list(st.counts) + ["mixed"]}
        rec = {"node": node.name, "module": module_of(node.name), "op": node.op, "channels": st.channels,
               "always": summary, "entropy": st.layer_entropy, "data_dependent": True}
        if applied.all():
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
            const = applied
            y = node.outputs[0]
            mid = gs.Variable(fresh_name(node.name + ".out"), dtype=np.float32)
            node.outputs = [mid]
            m = np.where(const, 0.0, 1.0).astype(np.float32)
            s = np.where(const, shift, 0.0).astype(np.float32)
            _append_affine(graph, node, mid, m, s, pshape, y, tag=PIN_TAG)
            records.append({**rec, "action": f"pinned {int(const.sum())} constant channels",
                            "pinned": int(const.sum())})
    graph.cleanup().toposort()
    return records


LINEARIZABLE = ("Gelu", "SiLU", "HardSwish", "Mish")  # x * gate(x): gate ~1 when ON, ~0 when OFF


def _single_reader(graph: gs.Graph, t: gs.Tensor, op: str) -> gs.Node | None:
    if t in graph.outputs or len(t.outputs) != 1 or t.outputs[0].op != op:
        return None
    return t.outputs[0]


def _other_input(node: gs.Node, t: gs.Tensor) -> gs.Tensor | None:
    others = [x for x in node.inputs if x is not t]
    return others[0] if len(node.inputs) == 2 and len(others) == 1 else None


def _is_const(t: gs.Tensor, value: float) -> bool:
    return isinstance(t, gs.Constant) and np.asarray(t.values).size == 1 \
        and np.isclose(float(np.asarray(t.values).reshape(())), value)


def _gelu_like_span(graph: gs.Graph, node: gs.Node, kind: str) -> tuple[gs.Tensor, gs.Tensor] | None:
    """(pre-activation x, activation output y) of the activation measured at ``node``."""
    if kind in ("Gelu", "HardSwish") and node.op in ("Gelu", "HardSwish"):
        return node.inputs[0], node.outputs[0]
    x = node.inputs[0]
    if kind == "SiLU":  # Sigmoid(x) -> Mul(x, .)
        mul = _single_reader(graph, node.outputs[0], "Mul")
        return (x, mul.outputs[0]) if mul is not None and _other_input(mul, node.outputs[0]) is x else None
    if kind == "Mish":  # Softplus(x) -> Tanh -> Mul(x, .)
        tanh = _single_reader(graph, node.outputs[0], "Tanh")
        mul = _single_reader(graph, tanh.outputs[0], "Mul") if tanh is not None else None
        return (x, mul.outputs[0]) if mul is not None and _other_input(mul, tanh.outputs[0]) is x else None
    if kind != "Gelu" or node.op not in ("Erf", "Tanh"):
        return None
    # Erf/Tanh form: core -> Add(1) -> Mul with x (or 0.5 x) -> optionally Mul(0.5)
    if node.op == "Erf":
        scaled = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
        pre = scaled.inputs[0] if scaled is not None else None
    add = _single_reader(graph, node.outputs[0], "Add")
    if add is None or not _is_const(_other_input(add, node.outputs[0]), 1.0):
        return None
    mul = _single_reader(graph, add.outputs[0], "Mul")
    if mul is None:
        return None
    partner = _other_input(mul, add.outputs[0])
    half = _single_reader(graph, mul.outputs[0], "Mul")
    if half is not None and _is_const(_other_input(half, mul.outputs[0]), 0.5):
        y, xs = half.outputs[0], partner  # x * (1 + erf) * 0.5
    else:
        y = mul.outputs[0]
        p = partner.inputs[0] if partner is not None and partner.inputs else None
        if p is None or p.op != "Mul" or not any(_is_const(t, 0.5) for t in p.inputs):
            return None
        xs = next(t for t in p.inputs if not _is_const(t, 0.5))  # (0.5 x) * (1 + erf)
    if node.op == "Erf" and xs is not pre:
        return None
    return xs, y


def linearize_smooth(graph: gs.Graph, stats: dict[str, ActivationStats],
                     module_of: Callable[[str], str | None] = lambda n: None) -> list[dict[str, Any]]:
    """Opt-in and NEVER exact: a GELU-like activation whose channels each stayed ON (pre-activation > 0)
    or OFF on the calibration data becomes x (ON) or 0 (OFF) per channel; the error is what
    verification then measures against the input graph."""
    records = []
    for node in list(graph.nodes):
        st = stats.get(node.name)
        if st is None or not st.smooth or st.kind not in LINEARIZABLE or node.op != st.op:
            continue
        states = st.channel_states()
        if np.any(states == "mixed"):
            continue
        span = _gelu_like_span(graph, node, st.kind)
        if span is None:
            continue
        x, y = span
        y_node = y.inputs[0]
        y_node.outputs = [gs.Variable(fresh_name(y.name + ".replaced"), dtype=np.float32)]
        scale = np.where(states == "lin", 1.0, 0.0).astype(np.float32)
        if np.all(scale == 1.0):
            graph.nodes.append(gs.Node("Identity", name=fresh_name(node.name + "/egp_linear"), inputs=[x], outputs=[y]))
        else:
            _append_affine(graph, node, x, scale, np.zeros_like(scale), _param_shape(st), y, tag="egp_linear_")
        records.append({"node": node.name, "module": module_of(node.name), "op": node.op, "kind": st.kind,
                        "channels": st.channels, "on": int((states == "lin").sum()),
                        "off": int((states == "off").sum()), "entropy": st.layer_entropy,
                        "action": "replaced by x (ON channels) / 0 (OFF channels)", "exact": False,
                        "data_dependent": True})
    graph.cleanup().toposort()
    return records
