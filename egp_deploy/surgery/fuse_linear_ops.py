"""Exact fusions of linear layers and layout ops that only lower the node count, run to a fixed point:
the layout rewrites of layout_ops, the opt-in chain rewrite of layout_chains, and MatMul + bias ->
Gemm of matmul_gemm (each rewrite can enable others)."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from egp_deploy.surgery.layout_chains import simplify_layout_chains
from egp_deploy.surgery.layout_ops import (
    compose_transposes, constant_reshape_targets, fold_constant_transposes, merge_reshapes,
    sink_reshapes_through_matmuls, unit_transposes_to_reshapes,
)
from egp_deploy.surgery.matmul_gemm import fuse_matmul_bias

__all__ = ["compose_transposes", "constant_reshape_targets", "fold_constant_transposes", "fuse_linear_ops",
           "fuse_matmul_bias", "merge_reshapes", "simplify_layout_chains", "sink_reshapes_through_matmuls",
           "unit_transposes_to_reshapes"]


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
