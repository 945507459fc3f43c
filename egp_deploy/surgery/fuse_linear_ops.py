"""Exact fusions of linear layers and layout ops that only lower the node count.

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
- ``simplify_layout_chains``: with static shapes, a chain of Reshape/Transpose/Squeeze/Unsqueeze/Flatten
  is a permutation of the flat elements; it is rewritten as at most Reshape -> Transpose -> Reshape
  when that takes fewer nodes (or swaps a Transpose for a free Reshape). Each candidate is checked by
  replaying it on an index array, so only exact rewrites are made.
- ``fuse_matmul_bias``: MatMul(x, W) + b with constant 2-D W and a bias along the last axis becomes one
  Gemm (named as the MatMul, so module names still resolve). For rank-2 x a Transpose on x or on W is
  absorbed as transA/transB. Gemm needs rank-2 inputs, so for token tensors (N, L, C) the fusion is
  Reshape(-1, K) -> Gemm -> Reshape and is only made where both Reshapes merge into neighbouring
  reshapes (otherwise MatMul + Add is already the smallest form). MatMul chains are left to merge_linear.

Every rewrite is exact algebra (a Gemm sums in a different order than MatMul + Add: fp32 rounding).
Each pass returns one record per rewrite and changes nothing when it has nothing to do, so the
canonicalisation loop reaches a fixed point.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from egp_deploy.surgery._graph import (
    bypass,
    const_value,
    fresh_name,
    new_const,
    only_consumer,
    producer,
    set_list,
)

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
                set_list(reader.inputs, [folded if x is out else x for x in reader.inputs])
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
            set_list(node.inputs, node.inputs[:1])
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
        set_list(node.inputs, [node.inputs[0], new_const(target, node.name + ".shape")])
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
        set_list(mm.outputs, [product])
        set_list(node.inputs, [product, new_const(target, node.name + ".shape")])
        set_list(node.outputs, [mm_out])
        records.append({"node": node.name, "matmul": mm.name})
    if records:
        graph.cleanup().toposort()
    return records


# ---------------------------------------------------------------- layout chains (static shapes)
def _layout_step_ok(node: gs.Node) -> bool:
    if node.op not in LAYOUT_OPS or not node.inputs or len(node.outputs) != 1:
        return False
    if not (_fully_static(getattr(node.inputs[0], "shape", None)) and _fully_static(node.outputs[0].shape)):
        return False
    return node.op != "Transpose" or _perm(node) is not None


def _layout_chains(graph: gs.Graph) -> list[list[gs.Node]]:
    """Maximal chains of layout ops, each link's output read only by the next link."""
    def continues(node: gs.Node) -> bool:  # node extends the chain of its producer
        p = producer(node.inputs[0])
        return p is not None and _layout_step_ok(p) and only_consumer(node.inputs[0], graph) is node

    chains = []
    for node in graph.nodes:
        if not _layout_step_ok(node) or continues(node):
            continue
        chain = [node]
        while True:
            nxt = only_consumer(chain[-1].outputs[0], graph)
            if nxt is None or not _layout_step_ok(nxt) or nxt.inputs[0] is not chain[-1].outputs[0]:
                break
            chain.append(nxt)
        chains.append(chain)
    return chains


def _replay(in_shape: list[int], steps: list[tuple[str, list[int]]]) -> np.ndarray:
    """Apply ('reshape', shape) / ('transpose', perm) steps to arange: each output element's source."""
    idx = np.arange(int(np.prod(in_shape)), dtype=np.int64).reshape(in_shape)
    for kind, arg in steps:
        idx = idx.reshape(arg) if kind == "reshape" else idx.transpose(arg)
    return idx


def _chain_steps(chain: list[gs.Node]) -> list[tuple[str, list[int]]]:
    return [("transpose", _perm(n)) if n.op == "Transpose" else ("reshape", [int(d) for d in n.outputs[0].shape])
            for n in chain]


def _coarse_axes(source: np.ndarray) -> list[tuple[int, int]] | None:
    """The fewest (size, input stride) axes, innermost output axis first, such that the flat output reads
    input element sum(digit_i * stride_i); None when the permutation is not a transpose of any reshape."""
    flat = source.reshape(-1)
    n = flat.size
    if flat[0] != 0:
        return None
    axes, block = [], 1
    while block < n:
        stride = int(flat[block])
        size = 1
        while size * block < n and flat[size * block] == size * stride:
            size += 1
        while size > 1 and (n // block) % size:  # the axis must tile what is left
            size -= 1
        if size < 2:
            return None
        axes.append((size, stride))
        block *= size
    return axes


def _split_axes(axes: list[tuple[int, int]], cuts: set[int], by_input: bool) -> list[tuple[int, int]]:
    """Refine axes (innermost output axis first) at flat-index boundaries ``cuts`` of the input side
    (stride space) or of the output side (block space)."""
    out, block = [], 1
    for size, stride in axes:
        base = stride if by_input else block
        parts = []  # inner part first
        inner = 1
        for cut in sorted(cuts):
            if base * inner < cut < base * size and cut % (base * inner) == 0:
                f = cut // (base * inner)
                if (size // inner) % f == 0 and f > 1:
                    parts.append((f, stride * inner))
                    inner *= f
        if size // inner > 1:
            parts.append((size // inner, stride * inner))
        out.extend(parts)
        block *= size
    return out


def _suffix_products(shape: list[int]) -> set[int]:
    return {int(np.prod(shape[i:])) for i in range(len(shape) + 1)}


def _nonunit(shape: list[int]) -> list[int]:
    return [int(d) for d in shape if d != 1]


def _plan(in_shape: list[int], out_shape: list[int], axes: list[tuple[int, int]]) -> list[tuple[str, list[int]]]:
    """Reshape? -> Transpose? -> Reshape? for the permutation given by ``axes`` (no size-1 axes)."""
    by_stride = sorted(range(len(axes)), key=lambda i: -axes[i][1])  # input order, outermost first
    out_order = list(range(len(axes)))[::-1]  # output order, outermost first
    in_sizes = [axes[i][0] for i in by_stride]
    steps: list[tuple[str, list[int]]] = []
    if _nonunit(in_shape) == in_sizes:  # transpose the input as it is: its unit dims ride along
        t_shape = list(in_shape)
        dim_of = {}
        k = 0
        for d, size in enumerate(t_shape):
            if size != 1:
                dim_of[by_stride[k]] = d
                k += 1
    else:  # reshape first, with out_shape's unit dims appended so that the transpose can land on it
        t_shape = in_sizes + [1] * (len(out_shape) - len(_nonunit(out_shape)))
        steps.append(("reshape", t_shape))
        dim_of = {a: d for d, a in enumerate(by_stride)}
    units = [d for d, size in enumerate(t_shape) if size == 1]
    moved = [dim_of[a] for a in out_order]
    if len(t_shape) == len(out_shape) and _nonunit(out_shape) == [axes[a][0] for a in out_order]:
        perm, it_moved, it_units = [], iter(moved), iter(units)  # land exactly on out_shape
        for size in out_shape:
            perm.append(next(it_units) if size == 1 else next(it_moved))
    else:
        perm = moved + units
    if perm != list(range(len(perm))):
        steps.append(("transpose", perm))
    current = [t_shape[p] for p in perm]
    if current != list(out_shape):
        steps.append(("reshape", list(out_shape)))
    return steps


def _cost(steps) -> tuple[int, int]:
    return len(steps), sum(kind == "transpose" for kind, _ in steps)


def _best_plan(in_shape: list[int], out_shape: list[int], source: np.ndarray) -> list[tuple[str, list[int]]] | None:
    if np.array_equal(source.reshape(-1), np.arange(source.size)):
        return [] if list(in_shape) == list(out_shape) else [("reshape", list(out_shape))]
    coarse = _coarse_axes(source)
    if coarse is None:
        return None
    in_cuts, out_cuts = _suffix_products(in_shape), _suffix_products(out_shape)
    candidates = [coarse, _split_axes(coarse, in_cuts, True), _split_axes(coarse, out_cuts, False),
                  _split_axes(_split_axes(coarse, in_cuts, True), out_cuts, False)]
    best = None
    for axes in candidates:
        steps = _plan(in_shape, out_shape, axes)
        if best is not None and _cost(steps) >= _cost(best):
            continue
        if np.array_equal(_replay(in_shape, steps), source):  # exact, or not used
            best = steps
    return best


def _take_name(unused: list[tuple[str, str]], op: str, base: str) -> str:
    """The name of a replaced node, one of the same kind (reshape-like counts as Reshape) first."""
    for same_kind in (True, False):
        for i, (name, old_op) in enumerate(unused):
            if not same_kind or (old_op == "Transpose") == (op == "Transpose"):
                del unused[i]
                return name
    return fresh_name(f"{base}/egp_{op.lower()}")


def simplify_layout_chains(graph: gs.Graph) -> list[dict[str, Any]]:
    """Rewrite each static-shape chain of layout ops as its cheapest exact Reshape/Transpose form."""
    records = []
    for chain in _layout_chains(graph):
        x, y = chain[0].inputs[0], chain[-1].outputs[0]
        in_shape, out_shape = [int(d) for d in x.shape], [int(d) for d in y.shape]
        if int(np.prod(in_shape)) > MAX_INDEX_ELEMENTS:
            continue
        steps = _chain_steps(chain)
        source = _replay(in_shape, steps)
        if list(source.shape) != out_shape:  # stale shape information: leave it alone
            continue
        best = _best_plan(in_shape, out_shape, source)
        if best is None:
            continue
        if not best and y in graph.outputs:
            best = [("reshape", out_shape)]  # the output name must stay produced by a node
        if _cost(best) >= _cost(steps):
            continue
        names, before = [n.name for n in chain], [n.op for n in chain]
        _clear(*chain)
        if not best:
            for reader in list(y.outputs):
                set_list(reader.inputs, [x if t is y else t for t in reader.inputs])
        unused = list(zip(names, before))
        current = x
        for i, (kind, arg) in enumerate(best):
            op = "Reshape" if kind == "reshape" else "Transpose"
            name = _take_name(unused, op, names[0])
            shape = arg if kind == "reshape" else [int(current.shape[p]) for p in arg]
            out = y if i == len(best) - 1 else gs.Variable(fresh_name(name + "_out"), dtype=x.dtype, shape=shape)
            if kind == "reshape":
                node = gs.Node(op, name=name, inputs=[current, new_const(np.array(arg, np.int64), name + ".shape")],
                               outputs=[out])
            else:
                node = gs.Node(op, name=name, attrs={"perm": list(arg)}, inputs=[current], outputs=[out])
            graph.nodes.append(node)
            current = out
        records.append({"nodes": names, "before": before, "after": [k for k, _ in best]})
    graph.cleanup().toposort()
    return records


# ---------------------------------------------------------------- MatMul + bias -> Gemm
def _bias_vector(add: gs.Node, mm_out: gs.Tensor, m: int, out_rank: int | None) -> np.ndarray | None:
    """The constant operand of Add(mm_out, b) as (M,) when it broadcasts along the last axis only."""
    if add.op != "Add" or len(add.inputs) != 2 or sum(t is mm_out for t in add.inputs) != 1:
        return None
    b = const_value(add.inputs[1] if add.inputs[0] is mm_out else add.inputs[0])
    if b is None or not _is_floating(b) or out_rank is None or b.ndim > out_rank:
        return None
    if b.size == 1:
        return np.full((m,), b.reshape(()), dtype=b.dtype)
    if b.shape[-1] != m or any(d != 1 for d in b.shape[:-1]):
        return None
    return b.reshape(m)


def _weight_operand(node: gs.Node) -> tuple[gs.Tensor, np.ndarray, bool, gs.Node | None] | None:
    """(constant, value as (K, M), transB, absorbed Transpose) for MatMul's right operand."""
    b = node.inputs[1]
    w = const_value(b)
    if w is not None:
        return (b, w, False, None) if w.ndim == 2 and _is_floating(w) else None
    t = producer(b)
    if t is not None and t.op == "Transpose" and len(b.outputs) == 1:
        c = const_value(t.inputs[0])
        if c is not None and c.ndim == 2 and _is_floating(c) and _perm(t) == [1, 0]:
            return t.inputs[0], c.T, True, t
    return None


def _constant_matmul(node: gs.Node | None) -> bool:
    return (node is not None and node.op == "MatMul" and len(node.inputs) == 2
            and (w := const_value(node.inputs[1])) is not None and w.ndim == 2)


def _in_matmul_chain(graph: gs.Graph, node: gs.Node, out: gs.Tensor) -> bool:
    """x @ W1 [+ b1] @ W2 is merge_linear's to merge (it only reads MatMuls): leave such chains alone."""
    p = producer(node.inputs[0])
    if p is not None and p.op == "Add" and len(p.inputs) == 2:
        live = [t for t in p.inputs if const_value(t) is None]
        p = producer(live[0]) if len(live) == 1 else None
    nxt = only_consumer(out, graph)
    return _constant_matmul(p) or (_constant_matmul(nxt) and nxt.inputs[0] is out)


def fuse_matmul_bias(graph: gs.Graph) -> list[dict[str, Any]]:
    """MatMul(x, W) [+ b] -> Gemm (see the module docstring); returns one record per fusion."""
    records = []
    for node in list(graph.nodes):
        if node.op != "MatMul" or len(node.inputs) != 2 or not isinstance(node.inputs[0], gs.Variable):
            continue
        if not node.outputs:  # cleared by an earlier fusion in this sweep
            continue
        weight = _weight_operand(node)
        x, mm_out = node.inputs[0], node.outputs[0]
        rank = _rank(x)
        if weight is None or rank is None or rank < 2:
            continue
        w_tensor, w, trans_b, w_transpose = weight
        k, m = w.shape
        add = only_consumer(mm_out, graph)  # None when mm_out is a graph output: it must stay
        bias = _bias_vector(add, mm_out, m, rank) if add is not None else None
        if bias is None:
            add = None
        elif bias.dtype != w.dtype:
            continue
        if _in_matmul_chain(graph, node, add.outputs[0] if add is not None else mm_out):
            continue
        if rank == 2:
            x_transpose = producer(x)
            trans_a = (x_transpose is not None and x_transpose.op == "Transpose" and _perm(x_transpose) == [1, 0]
                       and only_consumer(x, graph) is node)
            if not (add or trans_a or w_transpose):
                continue  # a lone MatMul: Gemm would not save a node
            data = x_transpose.inputs[0] if trans_a else x
            out = add.outputs[0] if add is not None else mm_out
            inputs = [data, w_tensor] + ([new_const(bias, node.name + ".bias")] if add is not None else [])
            gemm = gs.Node("Gemm", name=node.name, attrs={"alpha": 1.0, "beta": 1.0, "transA": int(trans_a),
                                                          "transB": int(trans_b)}, inputs=inputs, outputs=[out])
            absorbed = [n.name for n in (add, x_transpose if trans_a else None, w_transpose) if n is not None]
            _clear(node, add, x_transpose if trans_a else None, w_transpose)
            graph.nodes.append(gemm)
            records.append({"node": gemm.name, "absorbed": absorbed, "rank": 2})
            continue
        # Token tensors: only where Reshape(-1, K) / Reshape back merge into the reshapes around.
        before = producer(x)
        after = only_consumer(add.outputs[0], graph) if add is not None else None
        if (add is None or before is None or before.op not in RESHAPE_LIKE or only_consumer(x, graph) is not node
                or after is None or after.op != "Reshape" or after.inputs[0] is not add.outputs[0]
                or _shape_copies_input_dims(after)):
            continue
        flat = gs.Variable(fresh_name(node.name + "_2d_in"), dtype=x.dtype)
        gemm_out = gs.Variable(fresh_name(node.name + "_2d_out"), dtype=mm_out.dtype)
        to_2d = gs.Node("Reshape", name=before.name, inputs=[before.inputs[0], new_const(np.array([-1, k], np.int64),
                                                                                          before.name + ".shape")],
                        outputs=[flat])
        gemm = gs.Node("Gemm", name=node.name, attrs={"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": int(trans_b)},
                       inputs=[flat, w_tensor, new_const(bias, node.name + ".bias")], outputs=[gemm_out])
        absorbed = [n.name for n in (before, add, w_transpose) if n is not None]
        _clear(node, add, before, w_transpose)
        after.inputs[0] = gemm_out
        graph.nodes.extend([to_2d, gemm])
        records.append({"node": gemm.name, "absorbed": absorbed, "rank": rank, "reshapes_merged": [to_2d.name, after.name]})
    graph.cleanup().toposort()
    return records


def fuse_linear_ops(graph: gs.Graph, max_rounds: int = 4, layout_chains: bool = False) -> dict[str, list]:
    """All passes above until none changes anything (each rewrite enables others).

    ``layout_chains`` is opt-in: fewer nodes, but on vit_tiny the composed transposes kept
    onnxruntime from folding them into its FusedMatMul and the graph ran 1.1x SLOWER (CPU, 1 thread)."""
    passes = (
        ("reshape_targets_constant", constant_reshape_targets),
        ("constant_transposes_folded", fold_constant_transposes),
        ("transposes_composed", compose_transposes),
        ("unit_transposes_reshaped", unit_transposes_to_reshapes),
        ("layout_chains_simplified", simplify_layout_chains if layout_chains else (lambda g: [])),
        ("reshapes_sunk_through_matmuls", sink_reshapes_through_matmuls),
        ("reshapes_merged", merge_reshapes),
        ("matmul_bias_fused", fuse_matmul_bias),
    )
    done: dict[str, list] = {key: [] for key, _ in passes}
    for _ in range(max_rounds):
        changed = False
        for key, fn in passes:
            recs = fn(graph)
            done[key].extend(recs)
            changed |= bool(recs)
        if not changed:
            break
    return done
