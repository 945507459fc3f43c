"""optimize(): measure, strip, eliminate, merge, clean up, verify; the order of the passes."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from egp_deploy.errors import InputFileError, UsageError, VerificationError
from egp_deploy.numeric import DATA_DEPENDENT_ERROR_BOUND
from egp_deploy.surgery.activation_stats import ActivationStats, check_inputs, measure_activation_stats
from egp_deploy.surgery.changes import Change, Context, name_scope
from egp_deploy.surgery.cleanup import refresh_shapes, to_model
from egp_deploy.surgery.passes import REGISTRY, check_pass_names
from egp_deploy.surgery.report import module_namer
from egp_deploy.surgery.strip_activations import strip_error, strip_plan
from egp_deploy.surgery.verify import NOISE_FACTOR, compare, fp32_noise_floor, passes, run_model
from egp_deploy.validation import validate_surgery_options

try:
    from onnx_graphsurgeon.logger import G_LOGGER

    G_LOGGER.severity = G_LOGGER.ERROR
except Exception:  # logging only
    pass


@dataclass
class SurgeryOptions:
    tolerance: float = 1e-5  # max |y'-y| / max |y| for exact rewrites (fp32)
    max_mac_growth: float = 1.0  # cost "macs": a merged segment may cost up to this x the MACs of its layers
    allow_inexact_merge: bool = False  # k x k + k x k merges (wrong at the border ring)
    inexact_tolerance: float = 5e-2  # what verification accepts once an inexact merge was made
    strip_activations: bool = True  # data-dependent: activations always linear on calibration data
    min_held_out_agreement: float = 0.99  # top-1 agreement the data-dependent strips must keep
    held_out_tolerance: float = 1e-3  # the same for non-classifier outputs (relative error)
    dead_channels: bool = True
    channel_multiple: int = 8  # narrowed channel counts stay multiples of this (1: narrow fully)
    simplify_layout_chains: bool = False  # fewer Reshape/Transpose nodes, but can defeat runtime MatMul fusion
    merge: bool = True
    batch_size: int = 32
    max_rounds: int = 8
    threads: int = 0  # onnxruntime intra-op threads (0: its default)
    progress: bool = False
    # chain merge planner (chain_merge / latency): what a merged segment is priced by
    cost: str = "macs"  # "macs" (deterministic) | "latency" (measured on latency_backend)
    latency_backend: str = "ort-cpu"  # ort-cpu | ort-cuda | ort-trt
    latency_table: str | None = None  # JSON table of timings, reused and extended (None: a per-device cache)
    latency_margin: float = 0.05  # a merge must be this much faster than the layers it replaces
    latency_threads: int = 1  # intra-op threads while timing (ort-cpu)
    latency_rounds: int = 30  # interleaved timing rounds per candidate graph
    # transformer / smooth-activation additions (issue 12)
    linearize_smooth: bool = False  # GELU/SiLU/HardSwish/Mish always ON/OFF on calibration -> x / 0 (NOT exact)
    # held-out rel. error a data-dependent strip may add, per site and for the whole result (None: no bound)
    max_data_dependent_error: float | None = DATA_DEPENDENT_ERROR_BOUND
    min_calibration_samples: int = 100  # fewer, with strips on: a warning (channels OFF by chance)
    # pass selection by registered name (surgery/passes.py; egp_deploy.surgery.pass_names())
    skip: list[str] = field(default_factory=list)  # passes not to run
    only: list[str] | None = None  # run just these passes (None: all)


@dataclass
class SurgeryResult:
    model: onnx.ModelProto
    report: dict[str, Any]
    stats: dict[str, ActivationStats] = field(default_factory=dict)


def _metrics(model: onnx.ModelProto) -> dict[str, Any]:
    try:
        from egp_deploy.onnx_metrics import graph_metrics
    except ImportError:  # the metrics module ships separately; keep the report usable without it
        layers = sum(n.op_type in ("Conv", "Gemm", "MatMul") for n in model.graph.node)
        return {"nodes": len(model.graph.node), "conv_gemm_layers": layers, "file_size_bytes": model.ByteSize()}
    return graph_metrics(model)


def _input_metrics(model: onnx.ModelProto, named: onnx.ModelProto) -> dict[str, Any]:
    """The input graph's metrics. MACs its shapes leave unknown (the legacy exporter's run-time shape
    arithmetic hides channel and spatial sizes) come from a copy with that arithmetic folded: the same
    layers, so the same MACs, now with static shapes (never a symbolic dim counted as 1)."""
    before = _metrics(model)
    if before.get("macs_unknown_nodes"):
        from egp_deploy.surgery.canonicalize import fold_constants

        try:
            graph = gs.import_onnx(onnx.shape_inference.infer_shapes(named, data_prop=True))
        except Exception:
            return before
        fold_constants(graph)  # Shape ops of static dims fold only with shapes inferred
        folded = _metrics(to_model(graph, named, check=False))
        if folded.get("conv_gemm_layers") == before.get("conv_gemm_layers") \
                and len(folded["macs_unknown_nodes"]) < len(before["macs_unknown_nodes"]):
            before.update({k: folded[k] for k in ("macs_dense", "macs_nonzero", "macs_unknown_nodes")},
                          macs_shapes="static after folding the graph's shape arithmetic")
    return before


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose nodes all have unique names (activation stats are keyed by node name)."""
    named = copy.deepcopy(model)
    seen: set[str] = set()
    for i, node in enumerate(named.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)
    return named


def _rewrite(named: onnx.ModelProto, stats: dict[str, ActivationStats] | None, options: SurgeryOptions,
             module_of, cost_model=None, inexact_allowed: frozenset | None = None
             ) -> tuple[onnx.ModelProto, dict[str, list], dict[str, float]]:
    """The registered passes (surgery/passes.py) in order: the prologue once, the rounds until no
    pass changes anything (at most ``max_rounds``), the epilogue once when one of its own passes
    applies. Shapes are re-inferred before a pass that needs them, only if the graph changed since."""
    try:
        inferred = onnx.shape_inference.infer_shapes(named, data_prop=True)
    except Exception:
        inferred = named
    ctx = Context(options=options, stats=stats, module_of=module_of, cost_model=cost_model,
                  sections={k: [] for k in REPORT_SECTIONS}, inexact_allowed=inexact_allowed)
    state = {"graph": gs.import_onnx(inferred), "stale": False}
    times: dict[str, float] = {}

    def run_stage(stage: str) -> bool:
        ctx.stage = stage
        changed = False
        for p in REGISTRY.values():
            if stage not in p.stages or not ctx.selected(p.name) or not p.enabled(ctx):
                continue
            t = time.perf_counter()
            if p.needs_shapes and state["stale"]:
                state["graph"] = refresh_shapes(state["graph"], named)
                state["stale"] = False
            done = p.run(state["graph"], ctx)
            times[p.name] = times.get(p.name, 0.0) + time.perf_counter() - t
            if done:
                state["stale"] = True
            changed |= _record(ctx.sections, done)
        return changed

    with name_scope():
        run_stage("prologue")
        for _ in range(options.max_rounds):
            if not run_stage("round"):
                break
        if any(p.stages == ("epilogue",) and ctx.selected(p.name) and p.enabled(ctx) for p in REGISTRY.values()):
            run_stage("epilogue")
        out = to_model(state["graph"], named, check=True)
    changes = {k: v for k, v in ctx.sections.items() if v or k in REPORT_SECTIONS}
    changes["merge_candidates"] = ctx.merge_candidates
    return out, changes, times


# The report's ``changes`` sections that are always present (others appear when a pass made one).
REPORT_SECTIONS = ("canonicalized", "stripped", "constant_layers", "dead_channels", "dead_taps", "merged",
                   "mlp_units")


def _record(sections: dict[str, list], done: list[Change]) -> bool:
    """File a pass's changes in their report sections; True when one counts as a change (a change
    with nothing to report, such as constant folding, does not keep the rounds going)."""
    changed = False
    for section in {c.section for c in done if c.replaces}:  # the pass's records replace the section
        sections[section] = []
    for c in done:
        if c.section is None:
            continue
        sections.setdefault(c.section, [])
        if c.record is not None:
            sections[c.section].append(c.record)
            changed = True
    return changed


def _data_dependent_ok(result: dict[str, Any], options: SurgeryOptions, inexact: bool = False) -> bool:
    """Whether the held-out result keeps the strips' bounds (with inexact rewrites in it, its error is
    theirs too, held to the inexact tolerance: the strips are then bounded per site only)."""
    if not result["finite"] or result["problem"]:
        return False
    if not inexact and options.max_data_dependent_error is not None \
            and result["rel_error"] > options.max_data_dependent_error:
        return False
    if result["top1_agreement"] is not None:
        return result["top1_agreement"] >= options.min_held_out_agreement
    return result["rel_error"] <= options.held_out_tolerance


def optimize(model: onnx.ModelProto, calibration: np.ndarray, held_out: np.ndarray | None = None,
             options: SurgeryOptions | None = None) -> SurgeryResult:
    """Rewrite ``model`` into a shallower, narrower, verified equivalent.

    Raises VerificationError when the exact rewrites exceed ``options.tolerance`` on calibration or
    held-out inputs (nothing should then be written); DataError/NonFiniteError for bad inputs."""
    options = options or SurgeryOptions()
    t0 = time.perf_counter()
    validate_surgery_options(asdict(options))  # the ranges and choices the commands check, before any work
    skip, only = check_pass_names(options.skip, options.only)
    options = replace(options, skip=skip, only=only)
    if not isinstance(model, onnx.ModelProto):
        raise UsageError(f"optimize() needs an onnx.ModelProto, got {type(model).__name__}")
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise InputFileError(f"not a valid ONNX model: {str(e).strip().splitlines()[0]}") from None
    calibration = check_inputs(model, calibration, "calibration data")
    if held_out is not None:
        held_out = check_inputs(model, held_out, "held-out data")
    module_of = module_namer(model)
    named = name_nodes(model)
    timings: dict[str, Any] = {"passes_s": {}}  # passes_s: seconds per registered pass (both attempts)
    from egp_deploy.surgery.chain_merge import unique_candidates
    from egp_deploy.surgery.latency import make_cost_model

    cost_model = make_cost_model(options) if options.merge else None  # bad cost options fail here, before work

    t = time.perf_counter()
    stats, ref_cal = measure_activation_stats(named, calibration, options.batch_size, options.threads, options.progress)
    use_strips = options.strip_activations and bool(stats)
    held_stats: dict[str, ActivationStats] = {}
    ref_held = None
    strip_sites = {n for n, st in stats.items() if strip_plan(st) is not None} if use_strips else set()
    if held_out is not None and strip_sites:  # the same run also says how far each strip is off there
        held_stats, ref_held = measure_activation_stats(named, held_out, options.batch_size, options.threads,
                                                        only=strip_sites)
    elif held_out is not None:
        ref_held = run_model(named, held_out, options.batch_size, options.threads)
    timings["measure_s"] = time.perf_counter() - t
    warnings = []
    strippable = any(not s.smooth for s in stats.values()) or options.linearize_smooth
    if options.strip_activations and strippable and calibration.shape[0] < options.min_calibration_samples:
        warnings.append(f"only {calibration.shape[0]} calibration samples: the data-dependent strips may remove "
                        f"channels that were OFF by chance; use at least {options.min_calibration_samples} "
                        "(and check the held-out error below)")

    planner: dict[str, Any] = {}
    _check_table_covers_plan(cost_model, named, stats, options, module_of, use_strips, held_out is not None)

    plan: dict[str, Any] = {"reverted": None, "inexact_allowed": None}  # what the next attempt leaves out

    def attempt(**update):
        """The rewrite and its verification. ``reverted``: sites not to strip (None: no strips at all);
        ``inexact_allowed``: the inexact merges that may be made (None: any)."""
        plan.update(update)
        t1 = time.perf_counter()
        reverted = plan["reverted"]
        site_stats = None if reverted is None else {k: v for k, v in stats.items() if k not in reverted}
        out, changes, pass_times = _rewrite(named, site_stats, options, module_of, cost_model,
                                            plan["inexact_allowed"])
        for name, sec in pass_times.items():
            timings["passes_s"][name] = timings["passes_s"].get(name, 0.0) + sec
        planner["candidates"] = unique_candidates(changes.pop("merge_candidates"))
        timings["rewrite_s"] = timings.get("rewrite_s", 0.0) + time.perf_counter() - t1
        t1 = time.perf_counter()
        try:
            cal = compare(ref_cal, run_model(out, calibration, options.batch_size, options.threads))
            held = compare(ref_held, run_model(out, held_out, options.batch_size, options.threads)) \
                if held_out is not None else None
        except Exception as e:  # a pass produced a graph onnxruntime rejects: a bug, never written
            msg = str(e).strip().splitlines()
            raise VerificationError(f"the rewritten graph does not run in onnxruntime "
                                    f"({msg[0] if msg else type(e).__name__}); nothing written") from None
        timings["verify_s"] = timings.get("verify_s", 0.0) + time.perf_counter() - t1
        return out, changes, cal, held

    # Per site first: a strip whose own held-out error is above the bound is never made.
    site_errors = {n: e for n, e in ((n, strip_error(st, held_stats[n])) for n, st in stats.items()
                                     if n in held_stats) if e is not None}
    bound = options.max_data_dependent_error
    reverted = {n: f"held-out error {e['held_out_error']:.2e} > bound {bound:g}" for n, e in site_errors.items()
                if bound is not None and e["held_out_error"] > bound}
    out, changes, cal, held = attempt(reverted=set(reverted) if use_strips else None)
    note = None
    out, changes, cal, held, dropped = _drop_inexact_merges(attempt, out, changes, cal, held, options)
    # Then the whole result: where it misses the bounds on held-out data, revert the sites that are off
    # there at all (a strip exact on held-out data cannot cause it), and as a last resort every strip.
    # (linearised smooth activations are judged by the inexact tolerance instead, on both data sets)
    for last in (False, True):
        if not (changes["stripped"] and held is not None and not _data_dependent_ok(held, options, _inexact(changes))
                and passes(cal, options.tolerance if not _inexact(changes) else options.inexact_tolerance)):
            break
        stripped = [r["node"] for r in changes["stripped"]]
        off = [n for n in stripped if last or site_errors.get(n, {"held_out_error": 1.0})["held_out_error"] > 0]
        if not last and len(off) in (0, len(stripped)):
            continue  # reverting them would leave nothing or change nothing: the last resort
        why = (f"the result kept top-1 agreement {_pct(held['top1_agreement'])} / rel. error "
               f"{held['rel_error']:.2e} on held-out data, outside the bounds (agreement >= "
               f"{options.min_held_out_agreement:.2%}{'' if bound is None else f', rel. error <= {bound:g}'})")
        reverted.update({n: why for n in off})
        note = f"{len(reverted)} data-dependent strip{'s' if len(reverted) > 1 else ''} reverted: {why}"
        out, changes, cal, held = attempt(reverted=None if last else set(reverted))
    if reverted and note is None:
        note = (f"{len(reverted)} data-dependent strip{'s' if len(reverted) > 1 else ''} reverted: held-out "
                f"error at the site above the bound {bound:g} (--max-data-dependent-error)")
    if reverted:
        changes["reverted_strips"] = [
            {"node": n, "module": module_of(n), "op": stats[n].op, **site_errors.get(n, {}), "why": why}
            for n, why in reverted.items()]
    if dropped:
        changes["dropped_merges"] = dropped
        extra = (f"{len(dropped)} inexact merge{'s' if len(dropped) > 1 else ''} dropped: rel. error above the "
                 f"inexact tolerance {options.inexact_tolerance:g} (changes.dropped_merges)")
        note = extra if note is None else note + "; " + extra
    if held_out is None and _data_dependent(changes):
        note = ("no held-out data: the data-dependent strips are verified on the calibration data only; "
                "pass held-out inputs to check that they generalise")
    inexact = _inexact(changes)
    tol = requested_tol = options.inexact_tolerance if inexact else options.tolerance
    noise = None
    held_checked = held is not None and not changes["stripped"]
    if not inexact and (not passes(cal, tol) or (held_checked and not passes(held, tol))):
        # An exact rewrite cannot be held below the input graph's own fp32 round-off: measure it.
        noise = fp32_noise_floor(named, calibration, ref_cal, options.batch_size, options.threads)
        if held_checked:
            noise = max(noise, fp32_noise_floor(named, held_out, ref_held, options.batch_size, options.threads))
        if NOISE_FACTOR * noise > tol:
            extra = (f"the input graph's own fp32 round-off is {noise:.2e} (two onnxruntime evaluations of it "
                     f"with different kernels), above the tolerance {tol:g}: exact rewrites were accepted up "
                     f"to {NOISE_FACTOR:g}x that ({NOISE_FACTOR * noise:.2e})")
            note = extra if note is None else note + "; " + extra
            tol = NOISE_FACTOR * noise
    if not passes(cal, tol):
        raise VerificationError(
            f"rewritten graph differs from the input on calibration data: rel. error {cal['rel_error']:.3g} "
            f"> {tol:g}{' (' + cal['problem'] + ')' if cal['problem'] else ''}; nothing written")
    if held is not None and not changes["stripped"] and not passes(held, tol):
        raise VerificationError(
            f"rewritten graph differs from the input on held-out data: rel. error {held['rel_error']:.3g} "
            f"> {tol:g}{' (' + held['problem'] + ')' if held['problem'] else ''}; nothing written")
    verification = {
        "tolerance": tol,
        "requested_tolerance": requested_tol,
        "fp32_noise_floor": noise,
        "calibration": cal,
        "held_out": held,
        "exact_rewrites_pass": True,
        "inexact_merges": any(not m.get("exact", True) for m in changes.get("merged", [])),
        "inexact_rewrites": inexact,  # inexact merges or linearised smooth activations: inexact_tolerance
        "linearized_smooth": {"sites": len(changes.get("linearized", [])), "calibration_rel_error": cal["rel_error"],
                              "held_out_rel_error": None if held is None else held["rel_error"]}
        if changes.get("linearized") else None,
        "data_dependent": {
            "strips": len(changes["stripped"]),
            "bound": bound,
            "reverted": len(changes.get("reverted_strips", [])),
            "held_out": held if changes["stripped"] else None,
            "note": "activations found always linear on calibration data are exact there by construction; "
                    "their held-out agreement is the data-dependent figure",
        },
        "note": note,
    }
    before, after = _input_metrics(model, named), _metrics(out)
    remaining = {n.name for n in out.graph.node}
    layers_removed = [module_of(n.name) or n.name for n in named.graph.node
                      if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose") and n.name not in remaining]
    # rectifiers removed by exact algebra (relu(relu(x) + c)), named like the data-dependent strips
    relus_split = [module_of(r["node"]) or r["node"] for r in changes["canonicalized"]
                   if r.get("pass") == "relu_offsets_split"]
    if cost_model is not None:
        planner.update(cost_model.describe(), table_written=bool(getattr(cost_model, "save", lambda: False)()))
        warnings.extend(getattr(cost_model, "warnings", []))  # an unwritable latency cache: never a lost result
        if "measure_s" in planner:
            timings["latency_measure_s"] = planner["measure_s"]
    timings["total_s"] = time.perf_counter() - t0
    report = {
        "before": before,
        "after": after,
        "summary": {
            "activations_stripped": len(changes["stripped"]),
            "activations_removed_exact": len(relus_split),
            "zero_entropy_activations": sum(s.zero_entropy for s in stats.values()),
            "activations_measured": len(stats),
            "constant_layers_folded": len(changes["constant_layers"]),
            "channels_removed": sum(r["channels_before"] - r["channels_after"] for r in changes["dead_channels"]),
            "mlp_units_removed": sum(r["units_before"] - r["units_after"] for r in changes["mlp_units"]),
            "kernels_cropped": len(changes["dead_taps"]),
            "merges": len(changes["merged"]),
            "smooth_activations_measured": sum(s.smooth for s in stats.values()),
            "smooth_linearized": len(changes.get("linearized", [])),
            # held-out rel. error of the result vs the input graph when data-dependent rewrites were made
            # (the exact rewrites add at most their round-off, <= tolerance)
            "data_dependent_held_out_error": held["rel_error"] if held is not None and _data_dependent(changes)
            else None,
            "max_data_dependent_error": options.max_data_dependent_error,
            "strips_reverted": len(changes.get("reverted_strips", [])),
            "layers_removed": len(layers_removed),
        },
        "layers_removed": layers_removed,
        "activations_removed_exact": relus_split,
        "passes": [k for k, v in changes.items() if v],
        "changes": changes,
        "activations": [dict(s.summary(), module=module_of(s.node)) for s in stats.values()],
        "verification": verification,
        "options": asdict(options),
        "samples": {"calibration": int(calibration.shape[0]),
                    "held_out": None if held_out is None else int(held_out.shape[0])},
        "timing_s": timings,
        "merge_planner": planner,
        "warnings": warnings,
    }
    return SurgeryResult(model=out, report=report, stats=stats)


def _check_table_covers_plan(cost_model, named, stats, options, module_of, use_strips: bool,
                             revertible: bool) -> None:
    """A foreign latency table (measured on another device) must hold every timing the merge plan
    needs, and what it lacks cannot be measured here: plan dry (both rewrites verification may ask
    for: with the data-dependent strips and, when held-out data can revert them, without) and refuse
    before the surgery, not halfway through it."""
    if not getattr(getattr(cost_model, "table", None), "foreign", False):
        return
    with cost_model.planning() as lacking:
        for use_stats in {use_strips, False} if revertible else {use_strips}:
            _rewrite(named, stats if use_stats else None, options, module_of, cost_model)
    if lacking:
        raise cost_model.lacks_timings(len(lacking))


def _drop_inexact_merges(attempt, out, changes, cal, held, options: SurgeryOptions):
    """With inexact merges in a result above the inexact tolerance: measure each alone (the only
    inexact merge allowed), redo the rewrite without those above the tolerance, and without any if
    that still misses. Returns the attempt's (out, changes, cal, held) and a record per dropped merge."""
    tol = options.inexact_tolerance

    def within(c, h):
        return passes(c, tol) and (h is None or passes(h, tol))

    inexact = [m for m in changes.get("merged", []) if not m.get("exact", True) and "nodes" in m]
    if not inexact or within(cal, held):
        return out, changes, cal, held, []
    dropped = []
    for m in inexact:
        _, _, c, h = attempt(inexact_allowed=frozenset({tuple(m["nodes"])}))
        if not within(c, h):
            dropped.append({"modules": m["modules"], "kind": m["kind"], "nodes": m["nodes"],
                            "calibration_rel_error": c["rel_error"],
                            "held_out_rel_error": None if h is None else h["rel_error"],
                            "why": f"rel. error above the inexact tolerance {tol:g} when made alone"})
    kept = frozenset(tuple(m["nodes"]) for m in inexact) - {tuple(d["nodes"]) for d in dropped}
    out, changes, cal, held = attempt(inexact_allowed=kept)
    if not within(cal, held) and _inexact(changes):  # together still too far: exact merges only
        for m in changes.get("merged", []):
            if not m.get("exact", True):
                dropped.append({"modules": m["modules"], "kind": m["kind"], "nodes": m["nodes"],
                                "calibration_rel_error": cal["rel_error"],
                                "held_out_rel_error": None if held is None else held["rel_error"],
                                "why": f"the inexact merges together were above the tolerance {tol:g}"})
        out, changes, cal, held = attempt(inexact_allowed=frozenset())
    return out, changes, cal, held, dropped


def _inexact(changes: dict[str, list]) -> bool:
    return any(not m.get("exact", True) for m in changes.get("merged", [])) or bool(changes.get("linearized"))


def _data_dependent(changes: dict[str, list]) -> bool:
    return bool(changes.get("stripped")) or bool(changes.get("linearized"))


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2%}"
