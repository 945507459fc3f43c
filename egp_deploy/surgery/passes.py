"""The pass protocol: every rewrite is ``run(graph, ctx) -> list[Change]``, registered by name.

A pass says in which stage it runs (``prologue`` once before the rounds, ``round`` repeated until
no pass changes anything, ``epilogue`` once after), whether it needs fresh tensor shapes (the
pipeline re-infers them only then, and only when an earlier pass changed the graph) and when it
applies (``enabled(ctx)``: options, measured statistics). The registry order is the run order.
The pass functions themselves stay plain ``fn(graph, ...)`` functions with their own tests; the
adapters here only turn what each returns into ``Change`` records for the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import onnx_graphsurgeon as gs

from egp_deploy.errors import UsageError
from egp_deploy.surgery.canonicalize import (
    fold_affine, fold_constants, merge_slices, remove_identities, remove_neutral_elementwise,
    shrink_broadcast_constants,
)
from egp_deploy.surgery.changes import Change, Context
from egp_deploy.surgery.constant_offsets import merge_constant_adds, push_constant_adds, split_relu_offsets
from egp_deploy.surgery.dead_channels import constant_layers_to_constants, eliminate_dead_channels
from egp_deploy.surgery.dead_taps import crop_dead_taps
from egp_deploy.surgery.fuse_linear_ops import fuse_linear_ops
from egp_deploy.surgery.merge_linear import merge_linear
from egp_deploy.surgery.strip_activations import linearize_smooth, strip_activations, unpin_survivors
from egp_deploy.surgery.transformer_mlp import narrow_token_mlps

STAGES = ("prologue", "round", "epilogue")


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[gs.Graph, Context], list[Change]]
    stages: tuple[str, ...]
    needs_shapes: bool = True  # reads static tensor shapes: re-infer them first if the graph changed
    enabled: Callable[[Context], bool] = field(default=lambda ctx: True)
    doc: str = ""


REGISTRY: dict[str, Pass] = {}


def register(name: str, stages: tuple[str, ...], needs_shapes: bool = True,
             enabled: Callable[[Context], bool] = lambda ctx: True):
    """Decorator: add ``fn(graph, ctx) -> list[Change]`` to the registry under ``name``."""
    assert name not in REGISTRY and all(s in STAGES for s in stages), name

    def wrap(fn):
        REGISTRY[name] = Pass(name, fn, stages, needs_shapes, enabled, (fn.__doc__ or "").strip())
        return fn
    return wrap


def pass_names() -> list[str]:
    return list(REGISTRY)


def check_pass_names(skip, only) -> tuple[list[str], list[str] | None]:
    """``skip`` / ``only`` as lists of registered names (a string is split at commas, as
    ``--surgery-option skip=a,b`` gives it); UsageError, one line listing the valid names, otherwise."""
    lists = []
    for label, names in (("skip", skip), ("only", only)):
        if names is None:
            lists.append(None)
            continue
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        names = list(names)
        unknown = [n for n in names if n not in REGISTRY]
        if unknown:
            raise UsageError(f"unknown surgery pass{'es' if len(unknown) > 1 else ''} in {label}: "
                             f"{', '.join(map(str, unknown))} (valid: {', '.join(REGISTRY)})")
        lists.append(names)
    skip, only = lists
    if skip and only and set(skip) & set(only):
        raise UsageError(f"surgery passes both skipped and only-run: {', '.join(sorted(set(skip) & set(only)))}")
    # no pass at all would write the input unchanged as the "surgered" model
    from egp_deploy.validation import option_name

    if only is not None and not only:
        raise UsageError(f"{option_name('only', '--only')} names no surgery pass; give at least one (valid: {', '.join(REGISTRY)})")
    if all(name in (skip or ()) for name in REGISTRY):
        raise UsageError(f"{option_name('skip', '--skip')} names every surgery pass: nothing would run")
    return skip or [], only


def _canonical(key: str, items: list) -> list[Change]:
    """Records of one canonicalisation sub-pass, in the report's ``canonicalized`` list."""
    return [Change("canonicalized", {"pass": key, **(v if isinstance(v, dict) else {"node": v})}) for v in items]


# -- epilogue first: the pins go before the last canonicalisation sweep (registry order = run order)
@register("unpin_survivors", ("epilogue",), needs_shapes=False,
          enabled=lambda ctx: bool(ctx.sections.get("stripped")))
def _unpin(graph, ctx):
    """Pins whose channels survived dropped; the strip records say what was eliminated."""
    kept = unpin_survivors(graph, ctx.sections["stripped"])
    return [Change("stripped", r, replaces=True) for r in kept] or [Change("stripped", None, replaces=True)]


# -- exact canonicalisation (prologue, every round, epilogue) ------------------------------------
ALWAYS = STAGES


@register("fold_constants", ALWAYS, needs_shapes=False)
def _fold_constants(graph, ctx):
    """onnx-graphsurgeon's constant folding (nothing to report: what it folds has no name)."""
    before = len(graph.nodes)
    fold_constants(graph)
    return [Change(None)] if len(graph.nodes) != before else []


@register("remove_identities", ALWAYS)
def _remove_identities(graph, ctx):
    """Identity, inference Dropout, all-zero Pad and whole-range Slice bypassed."""
    return _canonical("identities_removed", remove_identities(graph))


@register("merge_slices", ALWAYS)
def _merge_slices(graph, ctx):
    """Slice(Slice(x)) on disjoint axes -> one Slice."""
    return _canonical("slices_merged", merge_slices(graph))


@register("merge_constant_adds", ALWAYS)
def _merge_constant_adds(graph, ctx):
    """(x + a) + b -> x + (a + b)."""
    return _canonical("constant_adds_merged", merge_constant_adds(graph))


@register("split_relu_offsets", ALWAYS, enabled=lambda ctx: ctx.relu_offsets)
def _split_relu_offsets(graph, ctx):
    """relu(relu(x) + c) rewritten exactly (not while measured statistics are still to be applied)."""
    return _canonical("relu_offsets_split", split_relu_offsets(graph))


@register("fold_affine", ALWAYS)
def _fold_affine(graph, ctx):
    """BatchNormalization and per-channel Mul/Add/Sub/Div into the preceding Conv/Gemm (a layer scale into a MatMul)."""
    return _canonical("affine_folded", fold_affine(graph))


@register("remove_neutral_elementwise", ALWAYS)
def _remove_neutral(graph, ctx):
    """x+0, x-0, x*1, x/1 bypassed."""
    return _canonical("neutral_removed", remove_neutral_elementwise(graph))


@register("shrink_broadcast_constants", ALWAYS)
def _shrink(graph, ctx):
    """Constant operands uniform along an axis keep size 1 there."""
    return _canonical("constants_shrunk", shrink_broadcast_constants(graph))


@register("push_constant_adds", ALWAYS)
def _push_constant_adds(graph, ctx):
    """Per-channel constant Adds moved through pooling/Flatten into the next layer's bias."""
    return _canonical("constant_adds_pushed", push_constant_adds(graph))


@register("fuse_linear_ops", ALWAYS)
def _fuse_linear_ops(graph, ctx):
    """Transpose/Reshape chains and MatMul + bias -> Gemm (a per-channel op after a new Gemm folds)."""
    done = fuse_linear_ops(graph, layout_chains=ctx.options.simplify_layout_chains)
    changes = [c for key, recs in done.items() for c in _canonical(key, recs)]
    if done.get("matmul_bias_fused") and ctx.selected("fold_affine"):
        changes.extend(_canonical("affine_folded", fold_affine(graph)))
    return changes


# -- data-dependent strips (prologue, with statistics) -------------------------------------------
@register("strip_activations", ("prologue",), enabled=lambda ctx: bool(ctx.stats))
def _strip(graph, ctx):
    """Activations always linear on the calibration data: removed, replaced or pinned."""
    return [Change("stripped", r) for r in strip_activations(graph, ctx.stats, ctx.module_of)]


@register("linearize_smooth", ("prologue",), enabled=lambda ctx: bool(ctx.stats) and ctx.options.linearize_smooth)
def _linearize(graph, ctx):
    """Opt-in, inexact: GELU-like activations always ON/OFF -> x / 0."""
    return [Change("linearized", r) for r in linearize_smooth(graph, ctx.stats, ctx.module_of)]


# -- structural eliminations (every round) --------------------------------------------------------
def _dead_channels_on(ctx) -> bool:
    return ctx.options.dead_channels


@register("constant_layers", ("round",), enabled=_dead_channels_on)
def _constant_layers(graph, ctx):
    """Tensors constant in every channel replaced by a constant, then folded forward (through layout ops and Concats)."""
    folded = constant_layers_to_constants(graph, ctx.module_of)
    if folded:
        fold_constants(graph)
    return [Change("constant_layers", r) for r in folded]


@register("dead_channels", ("round",), enabled=_dead_channels_on)
def _dead_channels(graph, ctx):
    """Constant or unused channels removed from producers and readers."""
    return [Change("dead_channels", r)
            for r in eliminate_dead_channels(graph, ctx.module_of, ctx.options.channel_multiple)]


@register("narrow_token_mlps", ("round",), needs_shapes=False, enabled=_dead_channels_on)
def _narrow_mlps(graph, ctx):
    """Transformer MLP hidden units (last axis) that are constant or unused removed."""
    return [Change("mlp_units", r) for r in narrow_token_mlps(graph, ctx.module_of, ctx.options.channel_multiple)]


@register("crop_dead_taps", ("round",), enabled=_dead_channels_on)
def _crop_taps(graph, ctx):
    """Kernel border rows/columns that are zero in every filter cropped."""
    return [Change("dead_taps", r) for r in crop_dead_taps(graph, ctx.module_of)]


@register("merge_linear", ("round",), enabled=lambda ctx: ctx.options.merge)
def _merge(graph, ctx):
    """Conv/Gemm chains merged as the planner decides; MatMul pairs merged."""
    records = merge_linear(graph, ctx.options.max_mac_growth, ctx.options.allow_inexact_merge, ctx.module_of,
                           ctx.cost_model, ctx.merge_candidates, ctx.inexact_allowed)
    return [Change("merged", r) for r in records]


def registry_table() -> list[dict[str, Any]]:
    """Name, stages, needs_shapes and summary of every registered pass (for docs and --help)."""
    return [{"name": p.name, "stages": list(p.stages), "needs_shapes": p.needs_shapes,
             "doc": p.doc.splitlines()[0] if p.doc else ""} for p in REGISTRY.values()]
