"""Provenance of a surgered graph: its ``metadata_props`` record the surgery and nothing stale.

The surgery copies the exported graph's metadata onto its result. :func:`record_surgery` then
makes it true of the surgered graph: the producer is egp-deploy, the sparsity and weight counts
are recounted on the graph's own weights, node -> module entries of removed nodes are dropped
(new nodes inherit the module of the node they are named after), and ``egp.surgery`` records
the version, options, what was removed and the verification figures.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from egp_deploy import __version__

PREFIX = "egp."
WEIGHT_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}  # op -> index of its weight input
PRODUCER = "egp-deploy"


def read_props(model: onnx.ModelProto) -> dict[str, Any]:
    """The ``egp.*`` metadata_props, JSON-decoded where they are JSON, prefix stripped."""
    out: dict[str, Any] = {}
    for p in model.metadata_props:
        if p.key.startswith(PREFIX):
            try:
                out[p.key[len(PREFIX):]] = json.loads(p.value)
            except ValueError:
                out[p.key[len(PREFIX):]] = p.value
    return out


def set_prop(model: onnx.ModelProto, key: str, value: Any) -> None:
    full = PREFIX + key
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=_jsonable)
    for p in model.metadata_props:
        if p.key == full:
            p.value = text
            return
    model.metadata_props.add(key=full, value=text)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def weight_counts(model: onnx.ModelProto) -> dict[str, Any]:
    """Weights and exact zeros over the constant weight operands of Conv/Gemm/MatMul nodes."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:  # Constant nodes feeding a layer count too
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            inits.setdefault(node.output[0], node.attribute[0].t)
    seen: set[str] = set()
    total = zeros = 0
    for node in model.graph.node:
        idx = WEIGHT_OPS.get(node.op_type)
        if idx is None or len(node.input) <= idx:
            continue
        name = node.input[idx]
        if name in seen or name not in inits:
            continue
        seen.add(name)
        w = numpy_helper.to_array(inits[name])
        if w.ndim < 2:
            continue
        total += int(w.size)
        zeros += int(np.count_nonzero(w == 0))
    return {"weights": total, "zero_weights": zeros, "sparsity": zeros / total if total else 0.0}


def refresh_node_modules(before: Mapping[str, str], model: onnx.ModelProto) -> dict[str, str]:
    """node -> module for the nodes that exist in ``model``: kept entries, plus new nodes whose name
    extends a known node's name (``conv1_merged`` -> the module of ``conv1``)."""
    known = sorted(before, key=len, reverse=True)
    out: dict[str, str] = {}
    for node in model.graph.node:
        if not node.name:
            continue
        if node.name in before:
            out[node.name] = before[node.name]
            continue
        parent = next((k for k in known if node.name.startswith(k) and len(node.name) > len(k)
                       and not node.name[len(k)].isalnum()), None)
        if parent is not None:
            out[node.name] = before[parent]
    return out


def _removed(report: Mapping[str, Any]) -> dict[str, Any]:
    changes = report.get("changes", {}) or {}
    stripped = [s.get("module") or s.get("node") for s in changes.get("stripped", []) if isinstance(s, dict)]
    folded = [c.get("module") or c.get("producer") or c.get("node") for c in changes.get("constant_layers", [])
              if isinstance(c, dict)]
    return {
        "layers_removed": list(report.get("layers_removed", [])),
        "activations_stripped": stripped,
        "activations_removed_exact": list(report.get("activations_removed_exact", [])),
        "constant_layers_folded": folded,
        "summary": dict(report.get("summary", {})),
    }


def _figures(part: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not part:
        return None
    return {k: part.get(k) for k in ("rel_error", "top1_agreement", "samples") if k in part}


def record_surgery(model: onnx.ModelProto, report: Mapping[str, Any], input_model: onnx.ModelProto | None = None) -> None:
    """Make ``model``'s metadata describe the surgered graph (in place); see the module docstring."""
    props = read_props(model)
    verification = report.get("verification", {}) or {}
    before = report.get("before", {}) or {}
    after = report.get("after", {}) or {}
    record: dict[str, Any] = {
        "version": __version__,
        "input_producer": f"{model.producer_name} {model.producer_version}".strip(),
        "options": dict(report.get("options", {})),
        "removed": _removed(report),
        "verification": {
            "tolerance": verification.get("tolerance"),
            "calibration": _figures(verification.get("calibration")),
            "held_out": _figures(verification.get("held_out")),
            "inexact_merges": verification.get("inexact_merges"),
            "note": verification.get("note"),
        },
        "samples": report.get("samples"),
        "metrics": {k: [before.get(k), after.get(k)] for k in
                    ("nodes", "conv_gemm_layers", "activations", "longest_path_layers", "macs_dense") if k in before},
    }
    if input_model is not None:
        record["input_sha256"] = hashlib.sha256(input_model.SerializeToString()).hexdigest()
    options = record["options"]
    options.pop("progress", None)  # how the run was displayed is not provenance
    counts = weight_counts(model)
    if "sparsity" in props:
        set_prop(model, "source_sparsity", props["sparsity"])
    if "weight_counts" in props:
        set_prop(model, "source_weight_counts", props["weight_counts"])
    set_prop(model, "sparsity", counts["sparsity"])
    set_prop(model, "weight_counts", {"weights": counts["weights"], "zero_weights": counts["zero_weights"]})
    if isinstance(props.get("node_modules"), dict):
        set_prop(model, "node_modules", refresh_node_modules(props["node_modules"], model))
    set_prop(model, "version", __version__)
    set_prop(model, "surgery", record)
    model.producer_name = PRODUCER
    model.producer_version = __version__
