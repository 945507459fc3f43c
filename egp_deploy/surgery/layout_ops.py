"""Exact layout rewrites that only lower the node count (transposes and reshapes).

- ``constant_reshape_targets``: a Reshape target computed at run time (Shape -> Gather -> Concat, the
  exporter's dynamic-batch form) becomes a constant with -1 where inference leaves one dim unknown.
- ``fold_constant_transposes``: Transpose of a constant becomes the transposed constant (a shared
  constant is left alone unless every reader is a Gemm that can take it through ``transB``).
- ``compose_transposes``: Transpose(Transpose(x, p1), p2) = Transpose(x, p1[p2]); identity perms go.
- ``unit_transposes_to_reshapes``: a Transpose that only moves size-1 axes (static shape; e.g. the
  (1, L, C) -> (L, 1, C) of attention at batch 1) moves no data: it becomes a Reshape, which then merges.
- ``merge_reshapes``: Reshape(reshape-like(x), s) = Reshape(x, s) when ``s`` does not copy input dims.
- ``sink_reshapes_through_matmuls``: Reshape(x) @ W = Reshape(x @ W) when the Reshape keeps the last
  (contracted) axis; done only where the moved Reshape then merges with the one after the MatMul.

Each pass returns one record per rewrite and changes nothing when it has nothing to do.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from egp_deploy.surgery._graph import bypass, const_value, fresh_name, new_const, only_consumer, producer

RESHAPE_LIKE = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
LAYOUT_OPS = RESHAPE_LIKE + ("Transpose",)
MAX_INDEX_ELEMENTS = 1 << 22  # layout chains are checked on an index array; larger tensors are skipped


def _clear(*nodes: gs.Node | None) -> None:
    for n in nodes:
        if n is not None:
            n.inputs.clear()
            n.outputs.clear()


def _fully_static(shape: list[Any] | None) -> bool:
    return shape is not None and all(isinstance(d, (int, np.integer)) and d > 0 for d in shape)


def _rank(t: gs.Tensor) -> int | None:
    shape = getattr(t, "shape", None)
    return None if shape is None else len(shape)


def _perm(node: gs.Node) -> list[int] | None:
    """A Transpose's perm (the default reverses the axes, which needs the rank)."""
    perm = node.attrs.get("perm")
    if perm is not None:
        return [int(p) for p in perm]
    rank = _rank(node.inputs[0])
    return None if rank is None else list(range(rank))[::-1]


def _is_floating(values: np.ndarray) -> bool:
    return values.dtype in (np.float16, np.float32, np.float64)


# ---------------------------------------------------------------- transposes
def fold_constant_transposes(graph: gs.Graph) -> list[dict[str, Any]]:
    """Transpose(constant) -> constant. A constant that other nodes also read is only rewired when every
    reader of the Transpose is a Gemm that takes it as B (flip transB): no weight is ever duplicated."""
    records = []
    for node in list(graph.nodes):
        if node.op != "Transpose" or not node.inputs or not node.outputs:
            continue
        c = node.inputs[0]
        values = const_value(c)
        perm = node.attrs.get("perm")
        if values is None or node.outputs[0] in graph.outputs:
            continue
        perm = list(range(values.ndim))[::-1] if perm is None else [int(p) for p in perm]
        out = node.outputs[0]
        if len(c.outputs) == 1:
            folded = new_const(np.ascontiguousarray(values.transpose(perm)), c.name + ".T")
            for reader in list(out.outputs):
                reader.inputs = [folded if x is out else x for x in reader.inputs]
            records.append({"node": node.name, "constant": c.name, "how": "folded"})
            _clear(node)
            continue
        readers = list(out.outputs)
        if values.ndim == 2 and readers and all(
                r.op == "Gemm" and len(r.inputs) > 1 and r.inputs[1] is out and r.inputs[0] is not out
                and not any(x is out for x in r.inputs[2:]) for r in readers):
            for r in readers:
                r.inputs[1] = c
                r.attrs["transB"] = 1 - int(r.attrs.get("transB", 0))
            how = "transB of " + ", ".join(r.name for r in readers)
            records.append({"node": node.name, "constant": c.name, "how": how})
            _clear(node)
    graph.cleanup()
    return records


def compose_transposes(graph: gs.Graph) -> list[dict[str, Any]]:
    """Two consecutive Transposes (the first read by nobody else) become one; identity perms are removed."""
    records = []
    for node in list(graph.nodes):
        if node.op != "Transpose" or not node.inputs or not node.outputs:
            continue
        perm = _perm(node)
        if perm is None:
            continue
        first = producer(node.inputs[0])
        absorbed = None
        if first is not None and first.op == "Transpose" and only_consumer(node.inputs[0], graph) is node:
            inner = _perm(first)
            if inner is not None and len(inner) == len(perm):
                perm = [inner[p] for p in perm]  # output axis i reads input axis inner[perm[i]]
                node.inputs[0] = first.inputs[0]
                node.attrs["perm"] = perm
                absorbed = first.name
                _clear(first)
        if perm == list(range(len(perm))):
            name = node.name
            node.inputs = node.inputs[:1]
            if bypass(graph, node):
                records.append({"node": name, "absorbed": absorbed, "result": "identity removed"})
                continue
        if absorbed is not None:
            records.append({"node": node.name, "absorbed": absorbed, "perm": perm})
    graph.cleanup()
    return records


def unit_transposes_to_reshapes(graph: gs.Graph) -> list[dict[str, Any]]:
    """Transpose -> Reshape when the non-unit axes keep their order (the flat element order is unchanged)."""
    records = []
    for node in list(graph.nodes):
        if node.op != "Transpose" or not node.inputs or not node.outputs:
            continue
        shape = getattr(node.inputs[0], "shape", None)
        perm = _perm(node)
        if not _fully_static(shape) or perm is None or len(perm) != len(shape):
            continue
        moved = [p for p in perm if shape[p] != 1]
        if moved != sorted(moved) or perm == list(range(len(perm))):
            continue  # a real permutation (or an identity, compose_transposes' job)
        target = np.array([int(shape[p]) for p in perm], np.int64)
        node.op = "Reshape"
        node.attrs = {}
        node.inputs = [node.inputs[0], new_const(target, node.name + ".shape")]
        records.append({"node": node.name, "perm": perm, "shape": [int(d) for d in shape]})
    return records


# ---------------------------------------------------------------- reshapes
def _shape_copies_input_dims(node: gs.Node) -> bool:
    """A Reshape whose target has a 0 entry copies that dim from its input (unless allowzero)."""
    target = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if target is None:
        return True
    return bool(np.any(target == 0)) and not node.attrs.get("allowzero", 0)


def constant_reshape_targets(graph: gs.Graph) -> list[dict[str, Any]]:
    """A Reshape whose target is computed at run time (Shape -> Gather -> Concat, as exporters write for a
    dynamic batch) but whose output shape is known up to one dim gets a constant target with -1 there;
    the shape arithmetic then goes dead."""
    records = []
    for node in list(graph.nodes):
        if node.op != "Reshape" or len(node.inputs) < 2 or not node.outputs or const_value(node.inputs[1]) is not None:
            continue
        shape = node.outputs[0].shape
        if shape is None or not shape:
            continue
        unknown = [d for d in shape if not isinstance(d, (int, np.integer))]
        known = [int(d) for d in shape if isinstance(d, (int, np.integer))]
        if len(unknown) > 1 or any(d <= 0 for d in known):  # -1 stands for one dim; 0 would be ambiguous
            continue
        target = np.array([d if isinstance(d, (int, np.integer)) else -1 for d in shape], np.int64)
        node.inputs[1] = new_const(target, node.name + ".shape")
        records.append({"node": node.name, "shape": [int(d) for d in target]})
    graph.cleanup()
    return records


def merge_reshapes(graph: gs.Graph) -> list[dict[str, Any]]:
    """Reshape(R(x), s) = Reshape(x, s) for any reshape-like R (element order is never changed), when
    ``s`` is a constant that does not refer to its input's dims; works with dynamic batch (-1 stays)."""
    records = []
    for node in list(graph.nodes):
        if node.op != "Reshape" or len(node.inputs) < 2 or not node.outputs or _shape_copies_input_dims(node):
            continue
        first = producer(node.inputs[0])
        if first is None or first.op not in RESHAPE_LIKE or only_consumer(node.inputs[0], graph) is not node:
            continue
        node.inputs[0] = first.inputs[0]
        records.append({"node": node.name, "absorbed": first.name})
        _clear(first)
    graph.cleanup()
    return records


def sink_reshapes_through_matmuls(graph: gs.Graph) -> list[dict[str, Any]]:
    """Reshape -> MatMul(const 2-D W) -> Reshape becomes MatMul -> Reshape -> Reshape (which merge): MatMul
    treats every leading axis as a batch axis, so regrouping them before or after it is the same product."""
    records = []
    for node in list(graph.nodes):
        if node.op != "Reshape" or len(node.inputs) < 2 or not node.outputs or _shape_copies_input_dims(node):
            continue
        x, mid = node.inputs[0], node.outputs[0]
        mm = only_consumer(mid, graph)
        if mm is None or mm.op != "MatMul" or len(mm.inputs) != 2 or mm.inputs[0] is not mid:
            continue
        w = const_value(mm.inputs[1])
        after = only_consumer(mm.outputs[0], graph)
        in_shape, mid_shape = getattr(x, "shape", None), mid.shape
        if (w is None or w.ndim != 2 or after is None or after.op != "Reshape" or _shape_copies_input_dims(after)
                or in_shape is None or mid_shape is None or len(in_shape) < 2 or len(mid_shape) < 2):
            continue
        k = int(w.shape[0])
        if in_shape[-1] != k or mid_shape[-1] != k:
            continue  # the Reshape mixes the contracted axis in
        target = const_value(node.inputs[1]).astype(np.int64).copy()
        target[-1] = int(w.shape[1])
        product = gs.Variable(fresh_name(mm.name + "_unshaped"), dtype=mm.outputs[0].dtype)
        mm_out = mm.outputs[0]
        mm.inputs[0] = x
        mm.outputs = [product]
        node.inputs = [product, new_const(target, node.name + ".shape")]
        node.outputs = [mm_out]
        records.append({"node": node.name, "matmul": mm.name})
    if records:
        graph.cleanup().toposort()
    return records
