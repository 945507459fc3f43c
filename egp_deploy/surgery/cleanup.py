"""Back to a clean ModelProto: dead nodes dropped, toposorted, shapes re-inferred, full checker."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from egp_deploy.errors import VerificationError


def refresh_shapes(graph: gs.Graph, template: onnx.ModelProto) -> gs.Graph:
    """Re-run ONNX shape inference (passes change channel counts) and re-import."""
    model = to_model(graph, template, check=False)
    return gs.import_onnx(model)


def to_model(graph: gs.Graph, template: onnx.ModelProto, check: bool = True) -> onnx.ModelProto:
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    for t in graph.tensors().values():  # stale intermediate shapes would fail strict inference
        if isinstance(t, gs.Variable) and t not in graph.inputs and t not in graph.outputs:
            t.shape = None
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = template.ir_version
    del model.opset_import[:]
    model.opset_import.extend(template.opset_import)
    model.producer_name = template.producer_name or "egp-deploy"
    model.producer_version = template.producer_version
    model.doc_string = template.doc_string
    model.graph.name = template.graph.name
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    del model.graph.value_info[:]
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=check, data_prop=True)
    except Exception as e:
        if check:
            raise VerificationError(f"surgery produced a graph that fails shape inference: {_first_line(e)}") from None
    if check:
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as e:
            raise VerificationError(f"surgery produced an invalid graph: {_first_line(e)}") from None
    return model


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
