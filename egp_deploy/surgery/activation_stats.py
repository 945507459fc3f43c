"""Activation states of an ONNX graph itself, measured with onnxruntime on calibration inputs.

Every rectifier's input (its pre-activation) is exposed as an extra graph output; one pass over
the data counts, per channel, how often each linear region is hit:
    Relu              off: x <= 0            lin: x > 0            (exact zeros count as OFF)
    Clip (ReLU6)      off: x <= min          lin: min < x < max    sat: x >= max
    LeakyRelu/PRelu   neg: x <= 0 (slope a)  lin: x > 0
A channel whose samples all fall in one region is a linear map there (identity, constant, or a
scale); a layer whose channels are all like that has zero entropy and can be stripped. Channel and
layer entropy are egp_deploy.numeric's, the same as egp-prune's: the Shannon entropy of the region
counts (three regions for Clip/ReLU6, so a channel split between OFF and saturated has entropy).

Smooth activations are measured too, with EGP's ON proxy (pre-activation > 0; "lin" counts ON):
Gelu (one op, or its Erf form x*0.5*(1+erf(x/sqrt2)): the Erf's input has the sign of x),
Tanh (alone or inside tanh-GELU: the same sign argument), Sigmoid (SiLU when it multiplies its
own input), HardSwish, HardSigmoid, Mish, Softplus. No region of theirs is linear: they are never
stripped (``SurgeryOptions.linearize_smooth`` replaces the GELU-like ones on request, inexactly).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from egp_deploy.errors import DataError, NonFiniteError
from egp_deploy.numeric import layer_entropy, region_entropy_bits
from egp_deploy.runners.ort import open_cpu_session, run_batched, single_input_plan

RECTIFIERS = ("Relu", "Clip", "LeakyRelu", "PRelu")
SMOOTH = ("Gelu", "Erf", "Tanh", "Sigmoid", "HardSwish", "HardSigmoid", "Mish", "Softplus")
ON_PROXY = "pre-activation > 0 (EGP's ON proxy for smooth activations; removing them is not exact)"


@dataclass
class ActivationStats:
    """Per-channel region counts of one activation node (``counts[region][c]``)."""

    node: str
    op: str
    tensor: str
    channel_axis: int
    rank: int
    total: int  # samples x positions per channel
    counts: dict[str, np.ndarray]  # "off"/"lin"/"sat" (Relu, Clip) or "neg"/"lin" (LeakyRelu, PRelu)
    low: float = 0.0  # Clip min (or 0)
    high: float = float("inf")  # Clip max
    extra: dict[str, Any] = field(default_factory=dict)
    seen_min: np.ndarray | None = None  # per channel: the smallest pre-activation seen
    seen_max: np.ndarray | None = None  # ... and the largest (how far a strip is off on other data)

    @property
    def smooth(self) -> bool:
        return self.op in SMOOTH

    @property
    def kind(self) -> str:
        """What the site computes: the op, or the pattern it belongs to (Gelu for Erf/Tanh forms, SiLU)."""
        return str(self.extra.get("kind", self.op))

    @property
    def channels(self) -> int:
        return int(self.counts["lin"].shape[0])

    @property
    def on_probability(self) -> np.ndarray:
        """P(x in the linear region); for Relu this is the EGP ON probability."""
        return self.counts["lin"] / max(self.total, 1)

    def channel_states(self) -> np.ndarray:
        """Per channel: the region every sample hit ("lin", "off", "sat", "neg") or "mixed"."""
        states = np.full(self.channels, "mixed", dtype=object)
        for region, c in self.counts.items():
            states[c == self.total] = region
        return states

    def region_table(self) -> np.ndarray:
        """(C, R) counts per channel and region, R = the regions of this activation."""
        return np.stack([np.asarray(c) for c in self.counts.values()], axis=1)

    def channel_entropy(self) -> np.ndarray:
        """Entropy (bits) of each channel's region distribution (egp_deploy.numeric, as egp-prune
        computes it): ON vs not-ON for two-region activations, off/linear/saturated for ReLU6/Clip."""
        return region_entropy_bits(self.region_table())

    @property
    def layer_entropy(self) -> float:
        """Mean entropy of the channels that are not always in one region, 0 if none (EGP's normalisation)."""
        return layer_entropy(self.region_table())

    @property
    def zero_entropy(self) -> bool:
        return self.layer_entropy == 0.0

    def summary(self) -> dict[str, Any]:
        states = self.channel_states()
        out = {
            "node": self.node, "op": self.op, "channels": self.channels,
            "entropy": self.layer_entropy,
            "always": {r: int((states == r).sum()) for r in list(self.counts) + ["mixed"]},
        }
        if self.smooth:
            out.update(kind=self.kind, smooth=True, on_probability=float(self.on_probability.mean()),
                       proxy=ON_PROXY)
        return out


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    vals = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    vals[n.output[0]] = onnx.numpy_helper.to_array(a.t)
        elif n.op_type == "Identity" and n.input and n.input[0] in vals:  # the legacy exporter's shared weights
            vals[n.output[0]] = vals[n.input[0]]
    return vals


def _clip_bounds(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> tuple[float, float] | None:
    lo, hi = -np.inf, np.inf
    for a in node.attribute:  # opset < 11
        if a.name == "min":
            lo = a.f
        if a.name == "max":
            hi = a.f
    for i, name in ((1, "lo"), (2, "hi")):
        if len(node.input) > i and node.input[i]:
            if node.input[i] not in consts:
                return None  # data-dependent bounds: not a fixed piecewise-linear map
            v = float(np.asarray(consts[node.input[i]]).reshape(()))
            lo, hi = (v, hi) if name == "lo" else (lo, v)
    return lo, hi


def _channel_axis(node_input: str, producers: dict[str, onnx.NodeProto], rank: int,
                  consts: dict[str, np.ndarray] | None = None) -> int:
    """Axis 1, except token tensors (N, L, C) / (N, H, W, C) that come out of a MatMul (transformer
    MLPs): their neurons are the LAST axis (EGP's Swin-T code took token-grid rows instead)."""
    if rank < 3:
        return 1
    p = producers.get(node_input)
    seen = 0
    while p is not None and seen < 5:
        if p.op_type in ("MatMul", "Gemm"):
            return rank - 1
        if p.op_type not in ("Add", "Mul", "Div", "Sub", "Pow"):
            break
        p = next((producers[i] for i in p.input if i in producers and i not in (consts or {})), None)
        seen += 1
    return 1


def _scalar(name: str, consts: dict[str, np.ndarray]) -> float | None:
    v = consts.get(name)
    return float(np.asarray(v).reshape(-1)[0]) if v is not None and np.asarray(v).size == 1 else None


def _smooth_kind(node: onnx.NodeProto, consts: dict[str, np.ndarray], producers: dict[str, onnx.NodeProto],
                 consumers: dict[str, list[onnx.NodeProto]]) -> str:
    """The activation a smooth op belongs to: Gelu for the Erf and Tanh forms, SiLU for x * sigmoid(x)."""
    x = node.input[0]
    p = producers.get(x)
    if node.op_type == "Erf" and p is not None and p.op_type in ("Div", "Mul") and len(p.input) == 2:
        c = _scalar(p.input[1], consts)
        if c is not None and np.isclose(c if p.op_type == "Div" else 1.0 / c, np.sqrt(2.0), rtol=1e-3):
            return "Gelu"
    if node.op_type == "Tanh" and p is not None and p.op_type == "Mul":
        if any(np.isclose(_scalar(i, consts) or 0.0, np.sqrt(2.0 / np.pi), rtol=1e-3) for i in p.input):
            return "Gelu"
    if node.op_type == "Sigmoid":
        if any(c.op_type == "Mul" and x in c.input for c in consumers.get(node.output[0], [])):
            return "SiLU"
    if node.op_type == "Softplus":  # Mish = x * tanh(softplus(x))
        for t in consumers.get(node.output[0], []):
            if t.op_type == "Tanh" and any(c.op_type == "Mul" and x in c.input for c in consumers.get(t.output[0], [])):
                return "Mish"
    if node.op_type == "Tanh" and p is not None and p.op_type == "Softplus":
        return "inner"  # the Tanh of a Mish: its input is always > 0, the Softplus site measures Mish
    return node.op_type


def check_inputs(model: onnx.ModelProto, data: np.ndarray, what: str = "calibration data") -> np.ndarray:
    """Shape and finiteness checks with one-line errors; returns float32 data."""
    data = np.asarray(data)
    if data.dtype.kind not in "fiu":
        raise DataError(f"{what} must be numeric, got dtype {data.dtype}")
    data = data.astype(np.float32, copy=False)
    if data.shape[0] == 0:
        raise DataError(f"{what} is empty")
    if not np.isfinite(data).all():
        raise NonFiniteError(f"{what} contains NaN or Inf values")
    single_input_plan(model, data)
    return data


def measure_activation_stats(
    model: onnx.ModelProto, data: np.ndarray, batch_size: int = 32, threads: int = 0,
    progress: bool = False, only: set[str] | None = None,
) -> tuple[dict[str, ActivationStats], list[np.ndarray]]:
    """Stats of every Relu/Clip/LeakyRelu/PRelu node (keyed by node name; unnamed nodes are skipped:
    name them first; ``only``: just these nodes) and the model's own outputs on ``data`` (the
    reference for verification)."""
    data = check_inputs(model, data)
    input_name, static_batch = single_input_plan(model, data)
    probe = copy.deepcopy(model)
    graph = probe.graph
    consts = _constants(graph)
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = [o.name for o in graph.output]
    sites: list[tuple[onnx.NodeProto, str, dict[str, Any]]] = []
    exposed: list[str] = []
    for node in graph.node:
        if node.op_type not in RECTIFIERS + SMOOTH or not node.name or not node.input \
                or (only is not None and node.name not in only):
            continue
        info: dict[str, Any] = {}
        if node.op_type in SMOOTH:
            info["kind"] = _smooth_kind(node, consts, producers, consumers)
            if info["kind"] == "inner":
                continue
        elif node.op_type == "Clip":
            bounds = _clip_bounds(node, consts)
            if bounds is None:
                continue
            info["low"], info["high"] = bounds
        elif node.op_type == "LeakyRelu":
            info["slope"] = next((a.f for a in node.attribute if a.name == "alpha"), 0.01)
        elif node.op_type == "PRelu":
            if len(node.input) < 2 or node.input[1] not in consts:
                continue
            info["slope"] = consts[node.input[1]]
        x = node.input[0]
        if x in consts:
            continue
        sites.append((node, x, info))
        if x not in exposed and x not in graph_outputs:
            exposed.append(x)
    for x in exposed:
        graph.output.append(onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None))
    session = open_cpu_session(probe, threads)
    names = graph_outputs + exposed
    index = {n: i for i, n in enumerate(names)}
    acc: dict[str, dict[str, np.ndarray]] = {}
    totals: dict[str, int] = {}
    extremes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    axes: dict[str, tuple[int, int]] = {}
    reference: list[list[np.ndarray]] = [[] for _ in graph_outputs]

    def consume(outs: list[np.ndarray]) -> None:
        for i in range(len(graph_outputs)):
            reference[i].append(outs[i])
        for node, x, info in sites:
            t = outs[index[x]]
            rank = t.ndim
            axis = _channel_axis(x, producers, rank, consts) if rank >= 2 else 0
            axes[node.name] = (axis, rank)
            t = np.moveaxis(t, axis, -1).reshape(-1, t.shape[axis]) if rank >= 2 else t.reshape(-1, 1)
            if node.op_type == "Clip":
                regions = {"off": t <= info["low"], "sat": t >= info["high"]}
                regions["lin"] = ~(regions["off"] | regions["sat"])
            elif node.op_type == "Relu" or node.op_type in SMOOTH:  # smooth: ON proxy x > 0
                lin = t > 0
                regions = {"off": ~lin, "lin": lin}
            else:
                lin = t > 0
                regions = {"neg": ~lin, "lin": lin}
            counts = {r: m.sum(axis=0, dtype=np.int64) for r, m in regions.items()}
            slot = acc.setdefault(node.name, {r: np.zeros_like(c) for r, c in counts.items()})
            for r, c in counts.items():
                slot[r] += c
            totals[node.name] = totals.get(node.name, 0) + t.shape[0]
            if t.shape[0]:
                lo, hi = t.min(axis=0), t.max(axis=0)
                old = extremes.get(node.name)
                extremes[node.name] = (lo, hi) if old is None else (np.minimum(old[0], lo), np.maximum(old[1], hi))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=data.shape[0], desc="activation stats", unit="sample", leave=False)

    def consume_and_tick(outs: list[np.ndarray]) -> None:
        consume(outs)
        if bar is not None:
            bar.update(outs[0].shape[0] if outs and outs[0].ndim else 1)

    run_batched(session, input_name, data, static_batch, batch_size, names, consume_and_tick)
    if bar is not None:
        bar.close()
    stats: dict[str, ActivationStats] = {}
    for node, x, info in sites:
        if node.name not in acc:
            continue
        axis, rank = axes[node.name]
        stats[node.name] = ActivationStats(
            node=node.name, op=node.op_type, tensor=x, channel_axis=axis, rank=rank,
            total=totals[node.name], counts=acc[node.name],
            low=float(info.get("low", 0.0)), high=float(info.get("high", np.inf)),
            extra={k: info[k] for k in ("slope", "kind") if k in info},
            seen_min=extremes.get(node.name, (None, None))[0], seen_max=extremes.get(node.name, (None, None))[1],
        )
    ref = [np.concatenate(parts) if parts and parts[0].ndim else parts[0] for parts in reference]
    return stats, ref
