"""Reading an ONNX file as data: every size it declares is checked before a weight is decoded or
anything runs.

A few hundred bytes of ONNX can ask for any amount of memory: a ``ConstantOfShape``, ``Expand``,
``Tile``, ``Resize`` or ``Range`` with a huge constant size is folded by onnxruntime when the
session is created (and ``Range`` is even expanded by onnx's own shape inference with data
propagation), and a tensor can declare more elements than it holds, or point to external data
that is not there. So :func:`check_onnx_sizes`, on the model without its external data:

- every tensor the file holds (initializers, tensor attributes such as ``Constant`` values, sparse
  tensors, in subgraphs too) holds exactly the bytes its dims and type declare, and external data
  lies in a regular file beside the model, long enough: otherwise the file is malformed
  (InputFileError, exit 3, like any damaged input);
- every tensor whose size shape inference can tell fits MAX_TENSOR_BYTES, and no integer Range or
  ConstantOfShape (which the surgery's shape inference writes out value by value) is longer than
  MAX_INTEGER_SEQUENCE: otherwise the model is well formed but asks for more than this tool runs
  (UnsupportedError, exit 8, as for samples that do not fit in memory). Symbolic dims count as 1,
  the graph inputs are left to the command that feeds them, and the small integer arithmetic on
  shapes (Shape -> Gather -> Mul -> ConstantOfShape) is folded here rather than by onnx's data
  propagation, so that the check itself never expands a Range.

:func:`read_onnx` is the one reader of ONNX files for the commands and the API.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import Any, Iterator

from egp_deploy.errors import InputFileError, UnsupportedError, first_words

MAX_TENSOR_BYTES = 4 << 30  # one tensor beyond this is a crafted size, not a model this tool deploys
MAX_INTEGER_SEQUENCE = 1 << 22  # onnx's shape inference writes out each value of an integer Range it can size
_FOLDED_ELEMENTS = 64  # shape arithmetic works on vectors as long as a tensor's rank
_INTEGER_TYPES, _EXTERNAL = (6, 7), 1  # TensorProto.INT32/INT64, TensorProto.EXTERNAL: onnx loads only to read a file

# bits per element (a 4-bit type packs two elements in a byte); STRING has no fixed size
_BITS_BY_NAME = {
    "FLOAT": 32, "UINT8": 8, "INT8": 8, "UINT16": 16, "INT16": 16, "INT32": 32, "INT64": 64, "BOOL": 8,
    "FLOAT16": 16, "DOUBLE": 64, "UINT32": 32, "UINT64": 64, "COMPLEX64": 64, "COMPLEX128": 128, "BFLOAT16": 16,
    "FLOAT8E4M3FN": 8, "FLOAT8E4M3FNUZ": 8, "FLOAT8E5M2": 8, "FLOAT8E5M2FNUZ": 8, "FLOAT8E8M0": 8,
    "UINT4": 4, "INT4": 4, "FLOAT4E2M1": 4, "UINT2": 2, "INT2": 2,
}
_STRIPPED_INITIALIZER_BYTES = 1 << 16  # bigger initializers go to shape inference as dims only


def _bits(data_type: int) -> int | None:
    from onnx import TensorProto

    name = TensorProto.DataType.Name(data_type) if data_type in TensorProto.DataType.values() else ""
    return _BITS_BY_NAME.get(name)


def _type_name(data_type: int) -> str:
    from onnx import TensorProto

    return TensorProto.DataType.Name(data_type).lower() if data_type in TensorProto.DataType.values() else str(data_type)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n} bytes"


def _too_big(label: str, what: str, dims: list[int], data_type: int) -> UnsupportedError | None:
    bits = _bits(data_type) or 8
    size = math.ceil(math.prod(dims) * bits / 8)
    if size <= MAX_TENSOR_BYTES:
        return None
    return UnsupportedError(f"{label}: {what} of shape {dims} ({_type_name(data_type)}) needs {_gib(size)}, more than the "
                            f"{MAX_TENSOR_BYTES >> 30} GiB this tool allows one tensor")


def _graphs(graph: Any) -> Iterator[Any]:
    """``graph`` and every subgraph (If/Loop/Scan bodies) below it."""
    from onnx import AttributeProto

    stack = [graph]
    while stack:
        g = stack.pop()
        yield g
        for node in g.node:
            for attr in node.attribute:
                if attr.type == AttributeProto.GRAPH:
                    stack.append(attr.g)
                elif attr.type == AttributeProto.GRAPHS:
                    stack.extend(attr.graphs)


def _held_tensors(model: Any) -> Iterator[tuple[str, Any]]:
    """(description, TensorProto) of every tensor the file carries, sparse ones as (desc, SparseTensorProto)."""
    from onnx import AttributeProto

    for g in _graphs(model.graph):
        for t in g.initializer:
            yield f"initializer {t.name!r}", t
        for s in g.sparse_initializer:
            yield f"sparse initializer {s.values.name!r}", s
        for node in g.node:
            node_name = node.name or (node.output[0] if node.output else "")
            for attr in node.attribute:
                where = f"attribute {attr.name!r} of {node.op_type} node {node_name!r}"
                if attr.type == AttributeProto.TENSOR:
                    yield where, attr.t
                elif attr.type == AttributeProto.TENSORS:
                    for t in attr.tensors:
                        yield where, t
                elif attr.type == AttributeProto.SPARSE_TENSOR:
                    yield where, attr.sparse_tensor
    for function in model.functions:
        for node in function.node:
            for attr in node.attribute:
                if attr.type == AttributeProto.TENSOR:
                    yield f"attribute {attr.name!r} in function {function.name!r}", attr.t


def _declared_elements(path: str, what: str, dims: Any) -> int:
    if any(d < 0 for d in dims):
        raise InputFileError(f"{path}: {what} declares a negative dimension {list(dims)}: the file is malformed")
    return math.prod(dims)


def _check_held_tensor(path: str, what: str, t: Any, base_dir: Path | None) -> None:
    """The bytes a dense TensorProto holds (inline or external) are the bytes its dims declare."""
    from onnx import TensorProto, helper

    n = _declared_elements(path, what, t.dims)
    bits = _bits(t.data_type)
    if t.data_type == TensorProto.STRING:
        if t.raw_data or t.data_location == TensorProto.EXTERNAL or len(t.string_data) != n:
            raise InputFileError(f"{path}: {what} declares {n} strings but holds {len(t.string_data)}: "
                                 "the file is malformed")
        return
    if bits is None:
        raise InputFileError(f"{path}: {what} has an unknown element type {t.data_type}: the file is malformed")
    expected = math.ceil(n * bits / 8)
    if t.data_location == TensorProto.EXTERNAL:
        _check_external(path, what, t, expected, base_dir)
        too_big = _too_big(path, what, list(t.dims), t.data_type)  # inline data is bounded by the file itself
        if too_big:
            raise too_big
        return
    if t.raw_data:
        held, unit = len(t.raw_data), "bytes"
        wanted = expected
    else:
        field = helper.tensor_dtype_to_field(t.data_type)
        held, unit = len(getattr(t, field)), f"{field} entries"
        complex_parts = 2 if t.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128) else 1
        wanted = math.ceil(n * bits / 8) if bits < 8 else n * complex_parts
    if held != wanted:
        raise InputFileError(f"{path}: {what} declares {list(t.dims)} {_type_name(t.data_type)} ({wanted} {unit}) "
                             f"but holds {held}: the file is malformed")


def _check_external(path: str, what: str, t: Any, expected: int, base_dir: Path | None) -> None:
    from onnx.external_data_helper import ExternalDataInfo

    if base_dir is None:
        raise InputFileError(f"{what} keeps its data in an external file, which an in-memory model cannot reach: "
                             "load the model with onnx.load (external data included) first")
    try:
        info = ExternalDataInfo(t)
    except Exception as e:  # noqa: BLE001 - a malformed offset/length entry
        raise InputFileError(f"{path}: {what} has a malformed external data entry ({first_words(e, 120)})") from None
    location = str(info.location or "")
    parts = Path(location).parts
    if not location or Path(location).is_absolute() or ".." in parts or "\x00" in location:
        raise InputFileError(f"{path}: {what} keeps its data at {location!r}, not a file beside the model")
    data_file = base_dir / location
    try:
        st = data_file.stat()
    except OSError:
        raise InputFileError(f"{path}: the external data file {location!r} of {what} is missing") from None
    if not stat.S_ISREG(st.st_mode) or not data_file.resolve().is_relative_to(base_dir.resolve()):
        raise InputFileError(f"{path}: the external data of {what} is {location!r}, not a regular file beside the model")
    offset = int(info.offset or 0)
    if info.length is not None and int(info.length) != expected:
        raise InputFileError(f"{path}: {what} declares {list(t.dims)} {_type_name(t.data_type)} ({expected} bytes) "
                             f"but its external data entry says {info.length} bytes: the file is malformed")
    if offset < 0 or offset + expected > st.st_size:
        raise InputFileError(f"{path}: {what} needs {expected} bytes at offset {offset} of {location!r}, which holds "
                             f"{st.st_size}: the external data is truncated")


def _check_sparse_tensor(path: str, what: str, s: Any, base_dir: Path | None) -> None:
    n = _declared_elements(path, what, s.dims)
    too_big = _too_big(path, what, list(s.dims), s.values.data_type)
    if too_big:
        raise too_big
    _check_held_tensor(path, f"{what} values", s.values, base_dir)
    _check_held_tensor(path, f"{what} indices", s.indices, base_dir)
    nnz = math.prod(s.values.dims) if s.values.dims else 0
    index_dims = list(s.indices.dims)
    if nnz > n or (nnz and index_dims not in ([nnz], [nnz, len(s.dims)])):
        raise InputFileError(f"{path}: {what} declares {n} elements, {nnz} values and indices of shape {index_dims}: "
                             "the file is malformed")


def _shape_probe(model: Any, folded: dict[str, Any] | None = None) -> Any:
    """A light copy for shape inference: big initializers as dims only, declared value_info and
    output shapes dropped (a file could declare small shapes for huge tensors), and the nodes that
    computed ``folded`` values replaced by those values as initializers."""
    from onnx import GraphProto, ModelProto, TensorProto, numpy_helper

    folded = folded or {}
    probe = ModelProto()
    probe.ir_version = model.ir_version
    probe.opset_import.extend(model.opset_import)
    probe.functions.extend(model.functions)
    graph = GraphProto(name=model.graph.name)
    graph.node.extend(n for n in model.graph.node if not (n.output and all(o in folded for o in n.output)))
    graph.input.extend(model.graph.input)
    graph.sparse_initializer.extend(model.graph.sparse_initializer)
    for t in model.graph.initializer:
        if len(t.raw_data) > _STRIPPED_INITIALIZER_BYTES or t.data_location == TensorProto.EXTERNAL:
            graph.initializer.append(TensorProto(name=t.name, dims=t.dims, data_type=t.data_type))
        else:
            graph.initializer.append(t)
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in folded.items())
    for out in model.graph.output:
        kept = graph.output.add()
        kept.CopyFrom(out)
        if kept.type.HasField("tensor_type"):
            kept.type.tensor_type.ClearField("shape")
    probe.graph.CopyFrom(graph)
    return probe


def _inferred(probe: Any) -> dict[str, tuple[list[int], int]]:
    """name -> (dims with symbolic ones as 1, element type) of every tensor shape inference can size.

    Without onnx's data propagation: it writes out the values of any Range or integer
    ConstantOfShape it can size, so a small file could exhaust memory in the check itself."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=False, data_prop=False)
    except Exception:  # noqa: BLE001 - inference gives up on some graphs: what was declared stays checked
        return {}
    sized = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor = value.type.tensor_type
        if value.type.HasField("tensor_type") and tensor.HasField("shape"):
            sized[value.name] = ([d.dim_value if d.HasField("dim_value") else 1 for d in tensor.shape.dim],
                                 tensor.elem_type)
    return sized


def _fold_shape_arithmetic(model: Any, sized: dict[str, tuple[list[int], int]]) -> dict[str, Any]:
    """Values of the small integer computations on shapes (Shape -> Gather -> Mul -> Concat ...),
    symbolic dims taken as 1, so that shape inference can size what they feed (ConstantOfShape,
    Expand, Tile, Range, Reshape) as if they were constants."""
    import numpy as np
    from onnx import helper, numpy_helper

    initializers = {t.name for t in model.graph.initializer}
    values: dict[str, Any] = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
                              if t.data_type in _INTEGER_TYPES and len(t.dims) <= 1 and math.prod(t.dims) <= _FOLDED_ELEMENTS
                              and t.data_location != _EXTERNAL}
    binary = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        args = [values.get(name) for name in node.input]
        op, out = node.op_type, None
        try:
            if op == "Shape" and node.input[0] in sized:
                dims = sized[node.input[0]][0]
                out = np.array(dims[attrs.get("start", 0):attrs.get("end", len(dims))], np.int64)
            elif op == "Constant" and "value" in attrs:
                out = numpy_helper.to_array(attrs["value"])
            elif any(a is None for a in args) or not args:
                continue
            elif op in binary:
                out = binary[op](args[0], args[1])
            elif op == "Div":
                out = np.trunc(args[0] / args[1]).astype(np.int64)
            elif op == "Gather":
                out = np.take(args[0], args[1], axis=attrs.get("axis", 0))
            elif op == "Concat":
                out = np.concatenate([np.atleast_1d(a) for a in args], axis=attrs.get("axis", 0))
            elif op == "Unsqueeze":
                out = np.expand_dims(args[0], tuple(attrs.get("axes", args[1] if len(args) > 1 else [])))
            elif op == "Squeeze":
                out = np.squeeze(args[0])
            elif op in ("Cast", "Identity"):
                out = args[0]
            elif op == "Slice":
                starts, ends = args[1], args[2]
                axes = args[3] if len(args) > 3 else range(len(starts))
                steps = args[4] if len(args) > 4 else [1] * len(starts)
                index = [slice(None)] * args[0].ndim
                for a, b, e, st in zip(axes, starts, ends, steps):
                    index[int(a)] = slice(int(b), int(e), int(st))
                out = args[0][tuple(index)]
        except Exception:  # noqa: BLE001 - not the arithmetic of shapes: left to shape inference as it is
            continue
        if out is not None and np.asarray(out).dtype.kind in "iu" and np.size(out) <= _FOLDED_ELEMENTS \
                and np.ndim(out) <= 1 and node.output[0] not in initializers:
            values[node.output[0]] = np.asarray(out).astype(np.int64)
    return {k: v for k, v in values.items() if k not in initializers}


def _bound_inferred_sizes(label: str, model: Any) -> None:
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    sized = _inferred(_shape_probe(model))
    folded = _fold_shape_arithmetic(model, sized)
    if folded:
        sized = {**sized, **_inferred(_shape_probe(model, folded))}
    fed = {i.name for i in model.graph.input}  # each command bounds the inputs it feeds (with its own option's name)
    for name, (dims, elem_type) in sized.items():
        if name in fed:
            continue
        op = producers.get(name)
        too_big = _too_big(label, f"tensor {name!r}" + (f" ({op} output)" if op else ""), dims, elem_type)
        if too_big:
            raise too_big
        if op in ("Range", "ConstantOfShape") and elem_type in _INTEGER_TYPES and math.prod(dims) > MAX_INTEGER_SEQUENCE:
            # onnx's shape inference with data propagation (run by the surgery) writes these out value by value
            raise UnsupportedError(f"{label}: {op} {name!r} makes {math.prod(dims)} integers, more than the "
                                   f"{MAX_INTEGER_SEQUENCE} this tool sizes")


def check_onnx_sizes(model: Any, path: str | os.PathLike | None = None) -> None:
    """Refuse a model whose tensors do not hold what they declare (InputFileError) or whose
    tensors, held or computed, exceed MAX_TENSOR_BYTES (UnsupportedError). ``model`` is read
    without its external data; ``path`` is where the file lies (None for an in-memory model)."""
    label = str(path) if path is not None else "the model"
    base_dir = Path(path).parent if path is not None else None
    for what, t in _held_tensors(model):
        if t.DESCRIPTOR.name == "SparseTensorProto":
            _check_sparse_tensor(label, what, t, base_dir)
        else:
            _check_held_tensor(label, what, t, base_dir)
    _bound_inferred_sizes(label, model)


def read_onnx(path: str | os.PathLike, load_external_data: bool = True) -> Any:
    """Parse an ONNX file, check its sizes (:func:`check_onnx_sizes`), then load its external
    data; every failure a file can cause is one InputFileError or UnsupportedError line."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's parsers raise their own types
        reason = first_words(e) if str(e).strip() else "truncated or not protobuf"
        raise InputFileError(f"{path} is not a readable ONNX model ({type(e).__name__}: {reason})") from None
    check_onnx_sizes(model, path)
    if load_external_data:
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(model, str(path.parent))
        except Exception as e:  # noqa: BLE001 - onnx's own bounds and path checks
            raise InputFileError(f"{path}: its external data cannot be read ({first_words(e, 160)})") from None
    return model
