"""Depth and cost figures of an ONNX graph (MEASURE.md: what every before/after report carries).

``graph_metrics(model)`` works on any ONNX model, not only ours: it needs no runtime, only
``onnx.shape_inference`` for the MAC counts. Conventions:

- nodes: nodes of the main graph (subgraphs of If/Loop are not descended into).
- conv/gemm layers: Conv, ConvTranspose, Gemm, and MatMul with a constant operand (a weight),
  plus their quantized forms; a MatMul of two activations (attention) is compute, not a layer.
- activations: element-wise non-linearities; a GELU exported as its Erf formula counts once (Erf).
- longest path: the largest number of conv/gemm layers on any input->output path of the DAG.
- parameters: elements of float initializers and float Constant nodes (all, and nonzero).
- MACs: Conv/ConvTranspose/Gemm/MatMul, dense and scaled by the weight's nonzero fraction (exact
  for unstructured sparsity: every weight is used the same number of times). A symbolic leading
  (batch) dim counts as 1, so dynamic-batch graphs report per-sample MACs. Any other symbolic dim is
  taken from the weights (a conv's or gemm's channels) or from the input and the conv geometry
  (spatial sizes); where neither says, the node's MACs are unknown (``macs_unknown_nodes``), never
  counted with that dim as 1 (the legacy exporter writes symbolic channel and spatial dims).
- file size: serialized bytes of the ModelProto.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

LAYER_OPS = {"Conv", "ConvTranspose", "Gemm", "QLinearConv", "ConvInteger"}
MATMUL_OPS = {"MatMul", "MatMulInteger", "QLinearMatMul"}
ACTIVATION_OPS = {
    "Relu", "Clip", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Gelu", "Erf",
    "Elu", "Selu", "Celu", "Tanh", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Swish",
}
FLOAT_TYPES = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16,
}
# Ops through which a constant keeps its zero pattern (the weight's density is inherited).
_ZERO_PRESERVING = {"Identity", "Cast", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
                    "DequantizeLinear", "CastLike"}
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                     "Bernoulli"}


def _tensor_stats(t: onnx.TensorProto) -> tuple[int, int]:
    """(elements, nonzero elements) of a tensor; external data that was not loaded counts as dense."""
    size = int(np.prod(t.dims)) if len(t.dims) else 1
    try:
        arr = numpy_helper.to_array(t)
    except Exception:  # external data not loaded, exotic dtypes: shape is still known
        return size, size
    return size, int(np.count_nonzero(arr))


def _constant_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant-node values by tensor name (sparse initializers densified)."""
    consts: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
    for sp in graph.sparse_initializer:
        try:
            dense = numpy_helper.to_array(sp.values)
            full = np.zeros(tuple(sp.dims), dtype=dense.dtype)
            idx = numpy_helper.to_array(sp.indices)
            if idx.ndim == 1:
                full.reshape(-1)[idx] = dense
            else:
                full[tuple(idx.T)] = dense
            consts[sp.values.name] = numpy_helper.from_array(full, sp.values.name)
        except Exception:
            continue
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    consts[node.output[0]] = attr.t
    return consts


def _topological_order(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Kahn's order over tensor dependencies; tolerates graphs whose node list is not sorted."""
    producers = {out: i for i, n in enumerate(graph.node) for out in n.output if out}
    consumers: dict[int, list[int]] = defaultdict(list)
    indegree = [0] * len(graph.node)
    for i, node in enumerate(graph.node):
        deps = {producers[x] for x in node.input if x in producers and producers[x] != i}
        indegree[i] = len(deps)
        for d in deps:
            consumers[d].append(i)
    ready = deque(i for i, d in enumerate(indegree) if d == 0)
    order = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for j in consumers[i]:
            indegree[j] -= 1
            if indegree[j] == 0:
                ready.append(j)
    seen = set(order)
    order += [i for i in range(len(graph.node)) if i not in seen]  # cycles: keep them, unordered
    return [graph.node[i] for i in order]


def _shape_map(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Static shapes of every tensor shape inference can reach; symbolic dims as None."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # a graph shape inference cannot handle still gets its other metrics
        inferred = model
    g = inferred.graph
    shapes: dict[str, list[int | None]] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    for t in g.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


def _prod(dims: list[int | None], symbolic_as: int = 1) -> int:
    return int(np.prod([symbolic_as if d is None else d for d in dims])) if dims else 1


def is_layer(node: onnx.NodeProto, constant_names: set[str]) -> bool:
    """A conv/gemm layer: Conv-like or Gemm, or a MatMul with at least one constant operand."""
    if node.op_type in LAYER_OPS:
        return True
    if node.op_type in MATMUL_OPS:
        operands = [node.input[i] for i in ((0, 3) if node.op_type == "QLinearMatMul" else (0, 1))
                    if i < len(node.input)]
        return any(x in constant_names for x in operands)
    return False


def graph_metrics(model: onnx.ModelProto, per_layer: bool = False) -> dict[str, Any]:
    """Nodes, conv/gemm layers, activations, longest path, parameters, MACs and file size.

    ``per_layer=True`` adds a ``layers`` list (name, op, MACs, weight elements) in graph order.
    """
    graph = model.graph
    consts = _constant_tensors(graph)
    order = _topological_order(graph)

    # Constant propagation: outputs of deterministic nodes whose inputs are all constant; remember
    # for zero-preserving ops which stored tensor the value came from (for weight density).
    constant_names = set(consts)
    density_source: dict[str, str] = {name: name for name in consts}
    for node in order:
        ins = [x for x in node.input if x]
        if node.op_type in _NONDETERMINISTIC or node.op_type == "Constant" or not ins:
            continue
        if all(x in constant_names for x in ins):
            constant_names.update(o for o in node.output if o)
            if node.op_type in _ZERO_PRESERVING and ins[0] in density_source:
                for o in node.output:
                    density_source[o] = density_source[ins[0]]

    stats_cache: dict[str, tuple[int, int]] = {}

    def weight_stats(name: str) -> tuple[int, int] | None:
        src = density_source.get(name)
        if src is None:
            return None
        if src not in stats_cache:
            stats_cache[src] = _tensor_stats(consts[src])
        return stats_cache[src]

    # Parameters: every stored float tensor once (a weight shared by two nodes counts once).
    params = params_nonzero = 0
    for name, t in consts.items():
        if t.data_type in FLOAT_TYPES:
            total, nnz = _tensor_stats(t)
            stats_cache[name] = (total, nnz)
            params += total
            params_nonzero += nnz

    shapes = _shape_map(model)
    op_counts: dict[str, int] = defaultdict(int)
    activations_by_type: dict[str, int] = defaultdict(int)
    layers = 0
    macs_dense = macs_nonzero = 0.0
    macs_unknown: list[str] = []
    layer_rows: list[dict[str, Any]] = []
    depth: dict[str, int] = {}

    for node in order:
        op = node.op_type
        op_counts[op] += 1
        if op in ACTIVATION_OPS:
            activations_by_type[op] += 1
        layer = is_layer(node, constant_names)
        layers += layer
        d = max((depth.get(x, 0) for x in node.input if x), default=0) + int(layer)
        for o in node.output:
            if o:
                depth[o] = d

        if op in LAYER_OPS or op in MATMUL_OPS:
            dense, operands = _node_macs(node, shapes)
            if dense is None:
                macs_unknown.append(node.name or node.output[0])
                continue
            ws = next((s for s in map(weight_stats, operands) if s is not None), None)
            density = ws[1] / ws[0] if ws and ws[0] else 1.0
            macs_dense += dense
            macs_nonzero += dense * density
            if per_layer and layer:
                layer_rows.append({
                    "name": node.name, "op": op, "macs_dense": int(dense), "macs_nonzero": int(round(dense * density)),
                    "weights": ws[0] if ws else None, "weights_nonzero": ws[1] if ws else None,
                })

    outputs = [o.name for o in graph.output]
    longest = max((depth.get(o, 0) for o in outputs), default=0) if outputs else max(depth.values(), default=0)
    out: dict[str, Any] = {
        "nodes": len(graph.node),
        "conv_gemm_layers": layers,
        "activations": sum(activations_by_type.values()),
        "activations_by_type": dict(sorted(activations_by_type.items())),
        "longest_path_layers": longest,
        "params": params,
        "params_nonzero": params_nonzero,
        "macs_dense": int(round(macs_dense)),
        "macs_nonzero": int(round(macs_nonzero)),
        "macs_unknown_nodes": macs_unknown,
        "file_size_bytes": model.ByteSize(),
        "op_counts": dict(sorted(op_counts.items())),
    }
    if per_layer:
        out["layers"] = layer_rows
    return out


def _known(dims: list[int | None] | None) -> bool:
    """Every dim but the leading (batch) one is static."""
    return dims is not None and None not in dims[1:]


def _conv_spatial(x: list[int | None] | None, w: list[int], node: onnx.NodeProto) -> list[int | None]:
    """A conv's output spatial sizes from its input's and its geometry (None where the input's is symbolic)."""
    attrs = {a.name: list(a.ints) for a in node.attribute if a.ints}
    auto_pad = next((a.s.decode() for a in node.attribute if a.name == "auto_pad"), "NOTSET")
    k = attrs.get("kernel_shape", w[2:])
    n = len(k)
    strides, dil = attrs.get("strides", [1] * n), attrs.get("dilations", [1] * n)
    pads = attrs.get("pads", [0] * 2 * n)
    out: list[int | None] = []
    for i in range(n):
        size = x[2 + i] if x is not None and len(x) == 2 + n else None
        if size is None:
            out.append(None)
        elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-size // strides[i]))
        else:
            pad = 0 if auto_pad == "VALID" else pads[i] + pads[i + n]
            out.append((size + pad - dil[i] * (k[i] - 1) - 1) // strides[i] + 1)
    return out


def _node_macs(node: onnx.NodeProto, shapes: dict[str, list[int | None]]) -> tuple[float | None, list[str]]:
    """(dense MACs, operands that may hold the weight, most likely first); None when shapes are unknown.

    Symbolic dims other than the leading (batch) one are filled in from the weight's shape (channels)
    or the conv geometry (spatial sizes); one that cannot be makes the MACs unknown."""
    op = node.op_type
    get = lambda i: shapes.get(node.input[i]) if i < len(node.input) and node.input[i] else None  # noqa: E731
    out_shape = shapes.get(node.output[0]) if node.output else None
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w_idx = 3 if op == "QLinearConv" else 1
        w = get(w_idx)
        if w is None or None in w or len(w) < 3:
            return None, []
        x = get(0)
        spatial = _conv_spatial(x, w, node)
        batch = x[0] if x else None
        if out_shape is not None and len(out_shape) == len(w):
            spatial = [s if s is not None else spatial[i] for i, s in enumerate(out_shape[2:])]
            batch = out_shape[0] if out_shape[0] is not None else batch
        out_shape = [batch, w[0]] + spatial
        if not _known(out_shape):
            return None, []
        # each output element reads Cin/groups x kernel weights of its channel
        per_out = _prod(w[1:])
        return float(_prod(out_shape) * per_out), [node.input[w_idx]]
    if op == "ConvTranspose":
        x, w = get(0), get(1)
        if x is None or w is None or None in w or len(x) < 2:
            return None, []
        x = [x[0], w[0]] + list(x[2:])
        if not _known(x):
            return None, []
        # each input element is scattered through Cout/groups x kernel weights
        return float(_prod(x) * _prod(w[1:])), [node.input[1]]
    if op == "Gemm":
        a, b = get(0), get(1)
        if a is None or b is None or len(a) != 2 or len(b) != 2 or None in b:
            return None, []
        attrs = {at.name: at.i for at in node.attribute}
        k_b, n = (b[1], b[0]) if attrs.get("transB") else (b[0], b[1])
        m = a[1] if attrs.get("transA") else a[0]
        if attrs.get("transA") and m is None:
            return None, []  # the rows are the second dim there: not a batch
        return float(_prod([m]) * k_b * n), [node.input[1], node.input[0]]
    if op in MATMUL_OPS:
        ia, ib = (0, 3) if op == "QLinearMatMul" else (0, 1)
        a, b = get(ia), get(ib)
        if a is None or b is None or out_shape is None or not a:
            return None, []
        k = a[-1] if a[-1] is not None else (b[-2] if len(b) >= 2 else b[0])
        out_shape = list(out_shape)
        if out_shape and out_shape[-1] is None and len(b) >= 2:
            out_shape[-1] = b[-1]
        if k is None or not _known(out_shape):
            return None, []
        # a list of operand names (the constant one is the weight, usually B): never the bare name,
        # which the caller would iterate character by character
        return float(_prod(out_shape) * _prod([k])), [node.input[ib], node.input[ia]]
    return None, []
