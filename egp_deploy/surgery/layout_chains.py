"""Layout chains: with static shapes, a chain of Reshape/Transpose/Squeeze/Unsqueeze/Flatten is a
permutation of the flat elements; it is rewritten as at most Reshape -> Transpose -> Reshape when
that takes fewer nodes (or swaps a Transpose for a free Reshape). Each candidate is checked by
replaying it on an index array, so only exact rewrites are made (opt-in: see fuse_linear_ops).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from egp_deploy.surgery._graph import fresh_name, new_const, only_consumer, producer
from egp_deploy.surgery.layout_ops import LAYOUT_OPS, MAX_INDEX_ELEMENTS, _clear, _fully_static, _perm


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
                reader.inputs = [x if t is y else t for t in reader.inputs]
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
