"""Exact canonicalisation: constant folding, BatchNormalization and per-channel affine ops folded into
the preceding Conv/Gemm, Identity/Dropout removal, neutral elementwise ops (x+0, x-0, x*1, x/1),
then the layout/linear fusions of fuse_linear_ops (Transpose/Reshape chains, MatMul + bias -> Gemm)."""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from egp_deploy.surgery._graph import (
    bypass, channel_vector, const_value, constant_operand, conv_weights, gemm_weights, new_const, only_consumer,
    producer, set_conv_weights, set_gemm_weights, static_shape,
)
from egp_deploy.surgery.constant_offsets import merge_constant_adds, push_constant_adds, split_relu_offsets
from egp_deploy.surgery.fuse_linear_ops import fuse_linear_ops

logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)


def fold_constants(graph: gs.Graph) -> None:
    """graphsurgeon's folding (runs onnxruntime on the constant subgraphs); never fatal."""
    from egp_deploy.errors import BackendUnavailableError
    from egp_deploy.runners.ort import import_onnxruntime

    try:  # its sessions log through onnxruntime's default logger: quieted there, like ours
        import_onnxruntime()
    except BackendUnavailableError:  # folding then simply does less
        pass
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            graph.fold_constants(error_ok=True)
        except Exception:  # folding is an optimisation: an op ORT cannot evaluate just stays
            pass
    graph.cleanup()


def _noop_pad_or_slice(node: gs.Node) -> bool:
    """A Pad by zeros everywhere, or a Slice with unit steps that keeps the whole (static) shape: the
    window attention of Swin writes both when the map is already a multiple of the window."""
    if node.op not in ("Pad", "Slice") or len(node.outputs) != 1 or not node.inputs:
        return False
    xs, ys = static_shape(node.inputs[0]), static_shape(node.outputs[0])
    if xs is None or ys is None or list(xs) != list(ys) or not all(isinstance(d, (int, np.integer)) for d in xs):
        return False
    if node.op == "Pad":
        pads = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        return pads is not None and not np.any(pads)
    if len(node.inputs) < 3 or any(const_value(t) is None for t in node.inputs[1:] if t.name):
        return False
    steps = const_value(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4].name else None
    return steps is None or bool(np.all(steps == 1))


def _slice_params(node: gs.Node) -> tuple[list[np.ndarray], gs.Tensor] | None:
    """(starts, ends, axes >= 0, steps) of a Slice whose parameters are constants (rank known)."""
    if node.op != "Slice" or len(node.inputs) < 3 or len(node.outputs) != 1:
        return None
    rank = len(static_shape(node.inputs[0]) or []) or None
    vals = [const_value(node.inputs[i]) if len(node.inputs) > i and node.inputs[i].name else None for i in range(1, 5)]
    starts, ends, axes, steps = vals
    if starts is None or ends is None or rank is None or (len(node.inputs) > 3 and node.inputs[3].name and axes is None) \
            or (len(node.inputs) > 4 and node.inputs[4].name and steps is None):
        return None
    axes = np.arange(len(starts)) if axes is None else np.where(axes < 0, axes + rank, axes)
    steps = np.ones(len(starts), np.int64) if steps is None else steps
    return [starts.astype(np.int64), ends.astype(np.int64), axes.astype(np.int64), steps.astype(np.int64)], node.inputs[0]


def merge_slices(graph: gs.Graph) -> list[dict[str, Any]]:
    """Slice(Slice(x)) on disjoint axes -> one Slice over both sets of axes (PatchMerging's x[..., 0::2, 1::2, :])."""
    done = []
    for outer in list(graph.nodes):
        p_out = _slice_params(outer)
        if p_out is None or not isinstance(outer.inputs[0], gs.Variable):
            continue
        inner = producer(outer.inputs[0])
        if inner is None or only_consumer(outer.inputs[0], graph) is not outer:
            continue
        p_in = _slice_params(inner)
        if p_in is None or set(p_in[0][2].tolist()) & set(p_out[0][2].tolist()):
            continue
        merged = [np.concatenate([a, b]) for a, b in zip(p_in[0], p_out[0])]
        names = ("starts", "ends", "axes", "steps")
        outer.inputs = [p_in[1]] + [gs.Constant(f"{outer.name}.{n}__merged", v) for n, v in zip(names, merged)]
        inner.outputs.clear()
        done.append({"node": outer.name, "absorbed": inner.name})
    if done:
        graph.cleanup()
    return done


def remove_identities(graph: gs.Graph) -> list[str]:
    removed = []
    for node in list(graph.nodes):
        noop = _noop_pad_or_slice(node)
        if noop:
            node.inputs = node.inputs[:1]
        if node.op == "Identity" or noop or (node.op == "Dropout" and _dropout_is_identity(graph, node)):
            name = node.name
            if node.op == "Dropout":
                node.outputs = node.outputs[:1]
                node.inputs = node.inputs[:1]
            if bypass(graph, node):
                removed.append(name)
    graph.cleanup()
    return removed


def _dropout_is_identity(graph: gs.Graph, node: gs.Node) -> bool:
    """Inference-mode Dropout whose mask output nobody reads."""
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
        mode = const_value(node.inputs[2])
        if mode is None or bool(np.asarray(mode).reshape(-1)[0]):
            return False
    return all(not o.outputs and o not in graph.outputs for o in node.outputs[1:])


def _affine_target(graph: gs.Graph, x: gs.Tensor):
    """The Conv/Gemm producing ``x`` and read only by one node, with its (W, b, kind)."""
    p = producer(x)
    if p is None or only_consumer(x, graph) is None:
        return None
    if p.op == "Conv":
        wb = conv_weights(p)
        return (p, wb, "conv") if wb else None
    if p.op == "Gemm":
        wb = gemm_weights(p)
        return (p, wb, "gemm") if wb else None
    return None


def _scale_token_linear(graph: gs.Graph, x: gs.Tensor, c: np.ndarray, op: str) -> str | None:
    """``x = MatMul(h, W) [+ b]`` (constant 2-D W, b along the last axis, each read once) times or
    divided by a last-axis constant ``c``: scale W's columns and b instead; the MatMul's name, or None."""
    p = producer(x)
    if p is None or only_consumer(x, graph) is None:
        return None
    add = None
    if p.op == "Add":
        found = constant_operand(p)
        if found is None or not isinstance(found[0], gs.Variable) or only_consumer(found[0], graph) is not p:
            return None
        add, (y, b, bi) = p, found
        p = producer(y)
    if p is None or p.op != "MatMul" or len(p.inputs) != 2 or not isinstance(p.inputs[0], gs.Variable):
        return None
    w = const_value(p.inputs[1])
    if w is None or w.ndim != 2 or w.dtype != np.float32:
        return None
    m = w.shape[1]

    def last_axis(v: np.ndarray) -> np.ndarray | None:  # a (M,) vector, or None
        if v.dtype != np.float32 or v.ndim > len(static_shape(x) or []) or any(d != 1 for d in v.shape[:-1]) \
                or v.size not in (1, m):
            return None
        return np.broadcast_to(v.reshape(-1), (m,)).astype(np.float64)

    g = last_axis(c)
    if g is None or (op == "Div" and np.any(g == 0)):
        return None
    g = 1.0 / g if op == "Div" else g
    if add is not None:
        bias = last_axis(b)
        if bias is None:
            return None
        add.inputs[bi] = new_const((bias * g).astype(np.float32), add.name + ".bias")
    p.inputs[1] = new_const((w.astype(np.float64) * g[None, :]).astype(np.float32), p.name + ".weight")
    return p.name


def _apply_affine(p: gs.Node, wb, kind: str, scale: np.ndarray, shift: np.ndarray) -> None:
    w, b = wb
    cout = w.shape[0] if kind == "conv" else w.shape[1]
    b = np.zeros((cout,), np.float32) if b is None else b
    if kind == "conv":
        w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
        set_conv_weights(p, w, b * scale + shift)
    else:
        set_gemm_weights(p, w * scale[None, :], b * scale + shift)


def fold_affine(graph: gs.Graph) -> list[dict[str, Any]]:
    """BatchNormalization, and Mul/Add/Sub/Div by per-channel constants, into the preceding Conv/Gemm;
    a Mul/Div by a last-axis constant into a token linear layer (MatMul with constant weights, + bias)."""
    folded = []
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if not node.outputs or not node.inputs:
                continue
            if node.op == "BatchNormalization":
                if len(node.outputs) > 1 and any(o.outputs for o in node.outputs[1:]):
                    continue
                if node.attrs.get("training_mode", 0):
                    continue
                params = [const_value(t) for t in node.inputs[1:5]]
                if any(v is None for v in params):
                    continue
                target = _affine_target(graph, node.inputs[0])
                if target is None:
                    continue
                g, beta, mean, var = (v.astype(np.float64) for v in params)
                scale = g / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
                shift = beta - mean * scale
                x_var = node.inputs[0]
            elif (found := constant_operand(node, ("Mul", "Add", "Sub", "Div"))) is not None:
                x_var, c, ci = found
                if node.op in ("Sub", "Div") and ci == 0:
                    continue
                target = _affine_target(graph, x_var)
                out_shape = static_shape(node.outputs[0])
                xs = static_shape(x_var)
                if xs is None or out_shape is None or len(out_shape) != len(xs):
                    continue
                if target is None:
                    if node.op in ("Mul", "Div") and (into := _scale_token_linear(graph, x_var, c, node.op)):
                        name = node.name  # a layer scale (ConvNeXt, CaiT) after a token linear layer
                        node.inputs = [x_var]
                        if bypass(graph, node):
                            folded.append({"node": name, "op": node.op, "into": into})
                            changed = True
                    continue
                p, wb, kind = target
                cout = wb[0].shape[0] if kind == "conv" else wb[0].shape[1]
                vec = channel_vector(c, len(xs), cout)
                if vec is None:
                    continue
                vec = vec.astype(np.float64)
                if node.op == "Mul":
                    scale, shift = vec, np.zeros_like(vec)
                elif node.op == "Div":
                    if np.any(vec == 0):
                        continue
                    scale, shift = 1.0 / vec, np.zeros_like(vec)
                elif node.op == "Add":
                    scale, shift = np.ones_like(vec), vec
                else:
                    scale, shift = np.ones_like(vec), -vec
            else:
                continue
            p, wb, kind = target
            _apply_affine(p, wb, kind, scale.astype(np.float32), shift.astype(np.float32))
            name = node.name
            node.inputs = [x_var]
            node.outputs = node.outputs[:1]
            if bypass(graph, node):
                folded.append({"node": name, "op": node.op, "into": p.name})
                changed = True
    graph.cleanup()
    return folded


def remove_neutral_elementwise(graph: gs.Graph) -> list[str]:
    """x+0, 0+x, x-0, x*1, 1*x, x/1 where the constant does not change the output's shape."""
    removed = []
    for node in list(graph.nodes):
        if node.op not in ("Add", "Sub", "Mul", "Div") or len(node.inputs) != 2:
            continue
        vals = [const_value(t) for t in node.inputs]
        for ci in (0, 1):
            c = vals[ci]
            x = node.inputs[1 - ci]
            if c is None or vals[1 - ci] is not None:
                continue
            if node.op in ("Sub", "Div") and ci == 0:
                continue
            neutral = 0.0 if node.op in ("Add", "Sub") else 1.0
            if not np.all(c == neutral):
                continue
            xs, ys = static_shape(x), static_shape(node.outputs[0])
            if c.size != 1 and (xs is None or ys is None or list(xs) != list(ys)):
                continue
            if c.size == 1 and xs is not None and len(xs) < c.ndim:
                continue
            if getattr(x, "dtype", None) is not None and c.dtype != np.dtype(x.dtype):
                continue
            name = node.name
            node.inputs = [x]
            if bypass(graph, node):
                removed.append(name)
            break
    graph.cleanup()
    return removed


def shrink_broadcast_constants(graph: gs.Graph) -> list[str]:
    """A constant operand that is uniform along some axes keeps size 1 there when the other operand
    already has the output's shape: (1, C, H, W) -> (1, C, 1, 1), and the (1, H, W, C) constant of a
    folded token-MLP branch -> (1, 1, 1, C) (a folded constant branch is often just a bias)."""
    shrunk = []
    for node in graph.nodes:
        if node.op not in ("Add", "Sub", "Mul", "Div") or len(node.inputs) != 2:
            continue
        for ci in (0, 1):
            c, x = const_value(node.inputs[ci]), node.inputs[1 - ci]
            xs, ys = static_shape(x), static_shape(node.outputs[0])
            if c is None or c.ndim < 2 or xs is None or ys is None or list(xs) != list(ys) or len(xs) != c.ndim:
                continue
            small = c
            for axis in range(1, c.ndim):
                if small.shape[axis] > 1:
                    first = np.take(small, [0], axis=axis)
                    if np.all(small == first):
                        small = first
            if small.shape == c.shape:
                continue
            node.inputs[ci] = gs.Constant(node.inputs[ci].name + "__uniform", np.ascontiguousarray(small))
            shrunk.append(node.name)
    return shrunk


def canonicalize(graph: gs.Graph, layout_chains: bool = False, relu_offsets: bool = True) -> dict[str, list]:
    """All exact canonicalisations once; returns what each sub-pass did (``layout_chains``: see
    fuse_linear_ops, opt-in because it can make onnxruntime slower; ``relu_offsets=False`` while
    measured activation statistics are still to be applied: a split shifts a ReLU's input)."""
    fold_constants(graph)
    done = {
        "identities_removed": remove_identities(graph),
        "slices_merged": merge_slices(graph),
        "constant_adds_merged": merge_constant_adds(graph),
        "relu_offsets_split": split_relu_offsets(graph) if relu_offsets else [],  # before fold_affine: it leaves a foldable Add
        "affine_folded": fold_affine(graph),
        "neutral_removed": remove_neutral_elementwise(graph),
        "constants_shrunk": shrink_broadcast_constants(graph),
    }
    done["constant_adds_pushed"] = push_constant_adds(graph)
    done.update(fuse_linear_ops(graph, layout_chains=layout_chains))
    if done.get("matmul_bias_fused"):  # a per-channel Mul/Add after a new Gemm folds into it
        done["affine_folded"].extend(fold_affine(graph))
    return done
