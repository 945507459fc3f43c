#!/usr/bin/env python
"""Reproduce EGP's research claim on digits: EGP vs IMP, per iteration, down to deployed latency.

For each architecture (narrow versions of resnet18, mobilenet_v2, vgg16_bn, vit_tiny; digits
1x32x32), one dense model is trained and shared; EGP and IMP then prune it with the same schedule
(rate, iterations, fine-tuning). For EVERY iteration of both methods it records

    sparsity, test accuracy, zero-entropy activation layers (measured in PyTorch on the val split),
    then exports that iteration's checkpoint to ONNX, runs the graph surgery (verified on
    calibration + held-out digits) and records conv/gemm layers and activations before -> after,
    the layers physically removed, the longest path, dense MACs, and the onnxruntime CPU batch-1
    latency of the surgered graph relative to the DENSE exported graph (interleaved A B A B ...,
    1 intra-op thread; the unsurgered pruned graph is timed in the same rounds as a control).

Outputs (--out, default docs/results/; --quick defaults to runs/reproduce-quick/):
    reproduce.json   settings, environment, every per-iteration record, the per-architecture verdict
    reproduce.png    zero-entropy layers vs sparsity, EGP vs IMP, one panel per architecture
    reproduce.md     environment, the exact command, the tables, the conclusion
Intermediate checkpoints and ONNX graphs go to --work (default runs/reproduce/).

    python tools/reproduce.py                      # the full default run (~15 min on 2 shared cores)
    python tools/reproduce.py --quick              # smoke run, ~1 min
    python tools/reproduce.py --archs vgg16_bn --iterations 4 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egp_deploy.errors import UnsupportedError

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "egp-deploy-reproduce/1"
ARCHS = ("resnet18", "mobilenet_v2", "vgg16_bn", "vit_tiny")
METHODS = ("egp", "imp")
DISCUSSION_HEADING = "## Discussion (hand-written)"


@dataclass(frozen=True)
class ArchPreset:
    kwargs: dict[str, Any]
    lr: float  # dense training learning rate (SGD momentum 0.9, cosine)
    finetune_lr: float  # after each prune: lower than dense because only a few epochs follow
    note: str = ""


# Narrow models so that the whole study fits ~15 CPU minutes; why each knob is what it is, in `note`.
PRESETS: dict[str, ArchPreset] = {
    "resnet18": ArchPreset({"width": 8}, 0.05, 0.02, "CIFAR stem, width 8 (17 ReLUs)"),
    "mobilenet_v2": ArchPreset({"width_mult": 0.25, "cifar": False}, 0.05, 0.02,
                               "width x0.25, ImageNet strides (the CIFAR strides cost 3x the CPU time); 35 ReLU6"),
    "vgg16_bn": ArchPreset({"width": 16}, 0.05, 0.02,
                           "width 16 (15 ReLUs); at width 8 the 64-wide dropout head did not train in 15 epochs"),
    "vit_tiny": ArchPreset({"width": 32, "layers": 4, "heads": 4}, 0.02, 0.01,
                           "dim 32, 4 encoder layers, 4 heads (4 GELU sites); dense lr 0.05 gave 83 % instead of 89 %"),
}
# --quick: narrower still, so one iteration of all four runs in well under a minute (accuracy is meaningless)
QUICK_PRESETS: dict[str, ArchPreset] = {
    "resnet18": ArchPreset({"width": 4}, 0.05, 0.02, "width 4"),
    "mobilenet_v2": ArchPreset({"width_mult": 0.25, "cifar": False}, 0.05, 0.02, "width x0.25, ImageNet strides"),
    "vgg16_bn": ArchPreset({"width": 4}, 0.05, 0.02, "width 4"),
    "vit_tiny": ArchPreset({"width": 16, "layers": 2, "heads": 2}, 0.02, 0.01, "dim 16, 2 encoder layers"),
}
# "within tolerance" for the second comparison: accuracy no more than this many points below dense
ACC_TOLERANCE = 2.0


@dataclass
class Settings:
    archs: list[str]
    iterations: int = 7
    epochs: int = 3
    dense_epochs: int = 15
    rate: float = 0.5
    batch_size: int = 64
    samples: int = 256
    bench_duration: float = 1.0
    bench_warmup_ms: float = 100.0
    threads: int = 1
    seed: int = 0
    quick: bool = False
    out: Path = ROOT / "docs" / "results"
    work: Path = ROOT / "runs" / "reproduce"
    presets: dict[str, ArchPreset] = field(default_factory=dict)
    markdown: bool = True
    render_only: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "archs": self.archs, "iterations": self.iterations, "epochs": self.epochs,
            "dense_epochs": self.dense_epochs, "rate": self.rate, "batch_size": self.batch_size,
            "calibration_samples": self.samples, "held_out_samples": self.samples,
            "bench_duration_s": self.bench_duration, "bench_warmup_ms": self.bench_warmup_ms,
            "threads": self.threads, "seed": self.seed, "quick": self.quick, "out": str(self.out),
            "work": str(self.work),
            "presets": {a: {"arch_kwargs": self.presets[a].kwargs, "lr": self.presets[a].lr,
                            "finetune_lr": self.presets[a].finetune_lr, "note": self.presets[a].note}
                        for a in self.archs},
        }


# ---------------------------------------------------------------------------------------------
# The per-architecture study
# ---------------------------------------------------------------------------------------------
def train_dense(arch: str, preset: ArchPreset, bundle, st: Settings, work: Path, log) -> tuple[Path, dict]:
    """The shared dense checkpoint (egp_deploy.train_dense, the project's one recipe); reused when
    work/ARCH/dense.pt was made with the same recipe."""
    from egp_deploy.api import train_dense as dense_recipe
    from egp_deploy.checkpoint import load_checkpoint, save_checkpoint
    from egp_deploy.prune.train import TrainConfig

    kwargs = {"num_classes": bundle.num_classes, "in_channels": bundle.input_shape[0], **preset.kwargs}
    recipe = TrainConfig(epochs=st.dense_epochs, lr=preset.lr, batch_size=st.batch_size)
    key = json.dumps({"arch": arch, "kwargs": kwargs, "recipe": recipe.to_json(), "seed": st.seed}, sort_keys=True)
    path = work / "dense.pt"
    if path.is_file():
        try:
            old = load_checkpoint(path, expected_arch=arch)
            if old.metadata.get("reproduce_key") == key:
                log(f"  dense: reusing {path} (same recipe), test accuracy {old.metadata['test_acc']:.2f} %")
                return path, {**old.metadata["dense"], "reused": True}
        except Exception:  # unreadable leftovers are simply retrained
            pass
    ckpt = dense_recipe(arch, bundle, recipe, preset.kwargs, st.seed)
    meta = ckpt.metadata
    seconds = meta["train_seconds"]
    params = sum(p.numel() for p in ckpt.build_model().parameters())
    info = {"epochs": st.dense_epochs, "lr": preset.lr, "seconds": seconds,
            "seconds_per_epoch": seconds / max(st.dense_epochs, 1), "test_acc": meta["test_acc"],
            "val_acc": meta["val_acc"], "params": params, "reused": False}
    meta.update(reproduce_key=key, dense=info)
    save_checkpoint(path, ckpt)
    log(f"  dense: {st.dense_epochs} epochs in {seconds:.0f} s ({info['seconds_per_epoch']:.2f} s/epoch), "
        f"test accuracy {info['test_acc']:.2f} %")
    return path, info


def export_and_surgery(ckpt_path: Path, calib, held, st: Settings) -> dict[str, Any]:
    """egp_deploy.deploy on one checkpoint: both graphs and the report beside it; a refused export or
    surgery is a result too (recorded, the study goes on)."""
    from egp_deploy.api import deploy
    from egp_deploy.calibration import CalibrationSet
    from egp_deploy.errors import EgpError

    exported_path = ckpt_path.with_suffix(".onnx")
    surgered_path = ckpt_path.with_suffix(".egp.onnx")
    for stale in (exported_path, surgered_path):  # what exists afterwards tells which stage refused
        stale.unlink(missing_ok=True)
    out: dict[str, Any] = {"exported_path": None, "surgered_path": None, "before": None, "after": None,
                           "export_error": None, "surgery_error": None, "seconds_surgery": 0.0}
    data = CalibrationSet(calib, held, f"{len(calib)} val + {len(held)} test samples")
    t0 = time.perf_counter()
    try:
        job = deploy(ckpt_path, surgered_path, calibration=data, plot=False, threads=st.threads, seed=st.seed)
    except EgpError as e:  # export: e.g. a collapsed network whose near-constant output fails the check
        stage = "surgery_error" if exported_path.is_file() else "export_error"
        out[stage] = f"{type(e).__name__}: {e}"
        out["exported_path"] = str(exported_path) if exported_path.is_file() else None
        out["seconds_export" if stage == "export_error" else "seconds_surgery"] = time.perf_counter() - t0
        if stage == "surgery_error":
            import onnx

            from egp_deploy.onnx_metrics import graph_metrics

            out["before"] = graph_metrics(onnx.load(str(exported_path)))
            out["seconds_export"] = 0.0
        return out
    seconds = job.report["seconds"]
    out.update(exported_path=str(exported_path), surgered_path=str(surgered_path), before=job.metrics_exported,
               after=job.surgery.report["after"], report=job.surgery.report,
               seconds_export=sum(v for k, v in seconds.items() if k.startswith(("export.", "load"))),
               seconds_surgery=seconds.get("surgery", 0.0))
    return out


def bench_ratio(dense_onnx: Path, exported: Path, surgered: Path | None, st: Settings) -> dict[str, Any]:
    """Interleaved batch-1 ORT CPU rounds: dense exported, this iteration's exported, its surgered graph."""
    from egp_deploy.bench import BenchSettings, benchmark_models

    paths = [dense_onnx, exported] + ([surgered] if surgered else [])
    settings = BenchSettings(warmup_ms=st.bench_warmup_ms, min_iterations=10, min_duration_s=st.bench_duration,
                             batch=1, threads=st.threads, seed=st.seed)
    t0 = time.perf_counter()
    rep = benchmark_models(paths, "ort-cpu", settings, keep_samples=False)
    pick = lambda m: {k: m["ratio_to_first"][k] for k in ("median", "min", "max", "pairs")}  # noqa: E731
    return {
        "rounds": rep["rounds"],
        "dense_median_ms": rep["models"][0]["latency_ms"]["median"],
        "ratio_exported": pick(rep["models"][1]),
        "ratio_surgered": pick(rep["models"][2]) if surgered else None,
        "seconds": time.perf_counter() - t0,
    }


def iteration_record(prune_rec: dict, n_sites: int, rate: float, graph: dict, latency: dict) -> dict[str, Any]:
    """One flat row: what pruning left in PyTorch, what the surgery removed, what it gained."""
    before = graph["before"] or {}
    after = graph.get("after") or {}
    report = graph.get("report") or {}
    summary = report.get("summary", {})
    verification = report.get("verification", {})
    held = verification.get("held_out") or {}
    it = prune_rec["iteration"]
    delta = lambda k: before[k] - after[k] if before and after else None  # noqa: E731
    return {
        "iteration": it,
        "nominal_sparsity": 1.0 - (1.0 - rate) ** it,
        "sparsity": prune_rec["sparsity_prunable"],
        "sparsity_all": prune_rec["sparsity_all"],
        "test_acc": prune_rec["test_acc"],
        "val_acc": prune_rec["val_acc"],
        "activation_sites": n_sites,
        "zero_entropy_layers": len(prune_rec["zero_entropy_sites"]),
        "zero_entropy_sites": list(prune_rec["zero_entropy_sites"]),
        "all_zero_layers": len(prune_rec["all_zero_layers"]),
        "zero_output_channels": prune_rec["zero_output_channels"],
        "output_channels": prune_rec["output_channels"],
        "conv_gemm_before": before.get("conv_gemm_layers"),
        "conv_gemm_after": after.get("conv_gemm_layers"),
        "activations_before": before.get("activations"),
        "activations_after": after.get("activations"),
        "activations_removed": delta("activations"),
        "layers_removed": len(report.get("layers_removed", [])) if after else None,
        "layers_removed_names": report.get("layers_removed", []),
        "longest_path_before": before.get("longest_path_layers"),
        "longest_path_after": after.get("longest_path_layers"),
        "macs_dense_before": before.get("macs_dense"),
        "macs_dense_after": after.get("macs_dense"),
        "macs_nonzero_after": after.get("macs_nonzero"),
        "onnx_zero_entropy_activations": summary.get("zero_entropy_activations"),
        "activations_stripped": summary.get("activations_stripped"),
        "constant_layers_folded": summary.get("constant_layers_folded"),
        "channels_removed": summary.get("channels_removed"),
        "held_out_rel_error": held.get("rel_error"),
        "held_out_top1_agreement": held.get("top1_agreement"),
        "surgery_note": verification.get("note"),
        "export_error": graph.get("export_error"),
        "surgery_error": graph.get("surgery_error"),
        "latency_ratio": latency.get("ratio_surgered"),
        "latency_ratio_unsurgered": latency.get("ratio_exported"),
        "bench_rounds": latency.get("rounds"),
        "seconds": {"prune_iteration": prune_rec.get("seconds", 0.0), "export": graph["seconds_export"],
                    "surgery": graph["seconds_surgery"], "bench": latency.get("seconds", 0.0)},
    }


def run_arch(arch: str, bundle, calib, held, st: Settings, log) -> dict[str, Any]:
    from egp_deploy.checkpoint import load_checkpoint
    from egp_deploy.prune.loop import PruneConfig, run_pruning
    from egp_deploy.prune.sites import find_sites
    from egp_deploy.prune.train import TrainConfig

    t_arch = time.perf_counter()
    preset = st.presets[arch]
    work = st.work / arch
    work.mkdir(parents=True, exist_ok=True)
    dense_path, dense = train_dense(arch, preset, bundle, st, work, log)
    dense_ckpt = load_checkpoint(dense_path, expected_arch=arch)
    sites = find_sites(dense_ckpt.build_model())
    site_info = [{"name": s.name, "kind": s.kind, "feeder": s.feeder, "post_add": s.post_add, "proxy": s.proxy}
                 for s in sites]

    # iteration 0 is the dense model for both methods: export, surgery and timing once
    dense_graph = export_and_surgery(dense_path, calib, held, st)
    if dense_graph["export_error"]:
        raise RuntimeError(f"{arch}: the dense model did not export: {dense_graph['export_error']}")
    dense_onnx = Path(dense_graph["exported_path"])
    surg0 = Path(dense_graph["surgered_path"]) if dense_graph["surgered_path"] else None
    dense_latency = bench_ratio(dense_onnx, dense_onnx, surg0, st)

    methods: dict[str, list[dict]] = {}
    for method in METHODS:
        run_dir = work / method
        for stale in list(run_dir.glob("iter_*")) + [run_dir / "best.pt", run_dir / "log.json"]:
            stale.unlink(missing_ok=True)  # a fresh run, never a mix with an older one
        cfg = PruneConfig(method=method, iterations=st.iterations, rate=st.rate, tolerance=None,
                          finetune=TrainConfig(epochs=st.epochs, lr=preset.finetune_lr, batch_size=st.batch_size), seed=st.seed)
        t0 = time.perf_counter()
        result = run_pruning(dense_ckpt, bundle, cfg, run_dir, progress=False)
        log(f"  {method}: {st.iterations} iterations x {st.epochs} epochs in {time.perf_counter() - t0:.0f} s")
        rows = []
        for rec in result.log["iterations"]:
            it = rec["iteration"]
            if it == 0:
                graph, latency = dense_graph, dense_latency
            else:
                graph = export_and_surgery(run_dir / f"iter_{it:02d}.pt", calib, held, st)
                surg = Path(graph["surgered_path"]) if graph["surgered_path"] else None
                latency = bench_ratio(dense_onnx, Path(graph["exported_path"]), surg, st) \
                    if graph["exported_path"] else {}
            row = iteration_record(rec, len(sites), st.rate, graph, latency)
            rows.append(row)
            log("    " + progress_line(method, row))
        methods[method] = rows
    return {
        "arch_kwargs": dense_ckpt.arch_kwargs,
        "preset_note": preset.note,
        "lr": preset.lr,
        "finetune_lr": preset.finetune_lr,
        "dense": dense,
        "sites": site_info,
        "methods": methods,
        "seconds": time.perf_counter() - t_arch,
    }


def progress_line(method: str, r: dict) -> str:
    removed = "-" if r["layers_removed"] is None else str(r["layers_removed"])
    lat = r["latency_ratio"]["median"] if r["latency_ratio"] else float("nan")
    return (f"{method} it {r['iteration']}: sparsity {r['sparsity']:.3f} acc {r['test_acc']:.1f} "
            f"zero-H {r['zero_entropy_layers']}/{r['activation_sites']} conv/gemm {r['conv_gemm_before']}->"
            f"{r['conv_gemm_after']} removed {removed} latency x{lat:.2f}"
            + (f" EXPORT FAILED: {r['export_error']}" if r["export_error"] else "")
            + (f" SURGERY FAILED: {r['surgery_error']}" if r["surgery_error"] else ""))


# ---------------------------------------------------------------------------------------------
# Comparison and verdict
# ---------------------------------------------------------------------------------------------
def compare_methods(methods: dict[str, list[dict]]) -> dict[str, Any]:
    """EGP vs IMP at matched iterations (the same nominal sparsity), iterations 1..N: the project's one
    verdict (egp_deploy.prune.verdict: summed over the iterations where both stay within ACC_TOLERANCE
    points of dense, EGP has more zero-entropy layers), plus this study's extra figures."""
    from egp_deploy.prune.verdict import compare_methods as verdict

    egp = {r["iteration"]: r for r in methods.get("egp", [])}
    imp = {r["iteration"]: r for r in methods.get("imp", [])}
    out = verdict(methods.get("egp", []), methods.get("imp", []), ACC_TOLERANCE, key="zero_entropy_layers")
    its = out["iterations"]
    out["egp_more"] = bool(out["holds"])
    out["at_accuracy"].update(tolerance_points=ACC_TOLERANCE, egp_more=out["egp_more"])
    out["layers_removed_diff"] = [(egp[i]["layers_removed"] or 0) - (imp[i]["layers_removed"] or 0) for i in its]
    out["max_sparsity_gap"] = max((abs(egp[i]["sparsity"] - imp[i]["sparsity"]) for i in its), default=None)
    if its:
        last = its[-1]
        out["last"] = {m: {k: rows[last][k] for k in ("sparsity", "test_acc", "zero_entropy_layers", "layers_removed",
                                                       "activations_removed", "longest_path_after", "latency_ratio")}
                       for m, rows in (("egp", egp), ("imp", imp))}
    out["within_tolerance"] = {m: best_within(methods.get(m, []), ACC_TOLERANCE) for m in METHODS}
    return out


def best_within(rows: list[dict], tolerance: float) -> dict[str, Any] | None:
    """The most pruned iteration whose test accuracy is within ``tolerance`` points of dense."""
    if not rows:
        return None
    dense_acc = rows[0]["test_acc"]
    ok = [r for r in rows if dense_acc - r["test_acc"] <= tolerance + 1e-9]
    best = max(ok, key=lambda r: (r["sparsity"], r["test_acc"]))
    return {k: best[k] for k in ("iteration", "sparsity", "test_acc", "zero_entropy_layers", "layers_removed",
                                 "activations_removed", "longest_path_before", "longest_path_after", "latency_ratio")}


def explain(arch: str, res: dict[str, Any]) -> list[str]:
    """Facts from the data that bear on the verdict (proxy activations, post-add sites, collapse)."""
    notes = []
    sites = res["sites"]
    proxy = [s for s in sites if s["proxy"]]
    post_add = [s for s in sites if s["post_add"]]
    if proxy:
        notes.append(f"{len(proxy)} of {len(sites)} activation sites are {', '.join(sorted({s['kind'] for s in proxy}))} "
                     "(zero entropy there is the x > 0 proxy; the surgery never strips them, so they cannot "
                     "remove a layer, only an all-zero feeding layer can be folded)")
    if post_add:
        notes.append(f"{len(post_add)} of {len(sites)} sites follow a residual add: the shortcut keeps their input "
                     "varying even when the branch is all-zero, so they rarely reach zero entropy")
    no_feeder = [s for s in sites if s["feeder"] is None]
    if no_feeder:
        notes.append(f"{len(no_feeder)} sites have no prunable feeder (EGP cannot steer budget to them)")
    for m in METHODS:
        rows = res["methods"].get(m, [])
        if not rows:
            continue
        last = rows[-1]
        dense_acc = rows[0]["test_acc"]
        if dense_acc - last["test_acc"] > 10:
            notes.append(f"{m.upper()} lost {dense_acc - last['test_acc']:.1f} accuracy points by iteration "
                         f"{last['iteration']}: part of its zero entropy is a collapsing network, not free depth")
        failed = [r["iteration"] for r in rows if r["surgery_error"]]
        if failed:
            notes.append(f"{m.upper()}: the surgery's verification refused iterations {failed} "
                         f"({rows[failed[0]]['surgery_error']})")
        failed = [r["iteration"] for r in rows if r["export_error"]]
        if failed:
            notes.append(f"{m.upper()}: the export check refused iterations {failed} "
                         f"({rows[failed[0]]['export_error']})")
        zero = sorted({s for r in rows for s in r["zero_entropy_sites"]})
        if zero:
            notes.append(f"{m.upper()} zero-entropy sites over the run: {', '.join(zero)}")
    gap = res["comparison"].get("max_sparsity_gap")
    if gap is not None and gap > 0.01:
        notes.append(f"matched iterations differ by up to {100 * gap:.1f} points of prunable-layer sparsity "
                     "(IMP prunes all conv/linear weights globally, EGP only the prunable layers, and EGP "
                     "freezes zero-entropy layers)")
    return notes


# ---------------------------------------------------------------------------------------------
# Presentation: terminal tables, markdown, PNG
# ---------------------------------------------------------------------------------------------
TABLE_COLUMNS = ("method", "iter", "sparsity", "test acc", "zero-H acts", "conv/gemm", "acts removed",
                 "layers removed", "longest path", "MACs dense", "latency ratio")


def table_rows(res: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for method in METHODS:
        for r in res["methods"].get(method, []):
            if r["iteration"] == 0 and method != METHODS[0]:
                continue  # the dense row is shared
            name = "dense" if r["iteration"] == 0 else method.upper()
            if r["export_error"]:
                graph = ("export failed", "-", "-", "-", "-", "-")
            elif r["surgery_error"]:
                graph = (f"{r['conv_gemm_before']} -> surgery refused", "-", "-", f"{r['longest_path_before']}", "-", "-")
            else:
                lat = r["latency_ratio"]
                graph = (
                    f"{r['conv_gemm_before']} -> {r['conv_gemm_after']}",
                    f"{r['activations_removed']}/{r['activations_before']}",
                    str(r["layers_removed"]),
                    f"{r['longest_path_before']} -> {r['longest_path_after']}",
                    f"{r['macs_dense_after'] / 1e6:.2f}M ({r['macs_dense_after'] / r['macs_dense_before']:.2f}x)",
                    f"{lat['median']:.2f} ({lat['min']:.2f}-{lat['max']:.2f})" if lat else "-",
                )
            rows.append((name, str(r["iteration"]), f"{r['sparsity']:.4f}", f"{r['test_acc']:.2f}",
                         f"{r['zero_entropy_layers']}/{r['activation_sites']}", *graph))
    return rows


def print_tables(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    if not console.is_terminal:  # logs and pipes: do not squeeze the columns into 80 characters
        console = Console(highlight=False, width=170)
    for arch, res in results["archs"].items():
        table = Table(title=f"{arch} {res['arch_kwargs']} on digits: dense {res['dense']['test_acc']:.2f} %",
                      title_justify="left")
        for col in TABLE_COLUMNS:
            table.add_column(col, justify="left" if col == "method" else "right")
        for row in table_rows(res):
            table.add_row(*row)
        console.print(table)
        c = res["comparison"]
        console.print(f"  EGP - IMP zero-H layers per iteration: {c['zero_entropy_diff']}; {c['text']}")
    v = results["verdict"]
    console.print(f"[bold]claim[/]: EGP leaves more zero-entropy layers than IMP on {v['egp_more']}/{v['archs']} "
                  f"architectures ({', '.join(v['egp_more_archs']) or 'none'}) -> {'HOLDS' if v['holds'] else 'NOT MET'} "
                  f"(needs {v['needed']}; {v['criterion']}); over all iterations, ignoring accuracy: "
                  f"{v['all_iterations']['egp_more']}/{v['archs']} ({', '.join(v['all_iterations']['egp_more_archs']) or 'none'})")


def _s(value: Any) -> str:
    return "-" if value is None else str(value)


def headline_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for arch, res in results["archs"].items():
        c = res["comparison"]
        if "last" not in c:
            continue
        e, i = c["last"]["egp"], c["last"]["imp"]
        lat = lambda r: f"{r['latency_ratio']['median']:.2f}" if r["latency_ratio"] else "-"  # noqa: E731
        rows.append((
            arch, f"{res['dense']['test_acc']:.1f}", f"{e['sparsity']:.3f} / {i['sparsity']:.3f}",
            f"{e['test_acc']:.1f} / {i['test_acc']:.1f}",
            f"{e['zero_entropy_layers']} / {i['zero_entropy_layers']} (of {len(res['sites'])})",
            f"{_s(e['layers_removed'])} / {_s(i['layers_removed'])}",
            f"{_s(e['longest_path_after'])} / {_s(i['longest_path_after'])}",
            f"{lat(e)} / {lat(i)}", f"{c['wins']}-{c['ties']}-{c['losses']}",
            "yes" if c["egp_more"] else "no",
        ))
    return rows


HEADLINE_COLUMNS = ("arch", "dense acc", "sparsity EGP / IMP", "test acc EGP / IMP", "zero-H acts EGP / IMP",
                    "layers removed EGP / IMP", "longest path EGP / IMP", "latency ratio EGP / IMP",
                    "EGP W-T-L (zero-H, per iter)", "EGP more zero-H")


TOLERANCE_COLUMNS = ("arch", "method", "iter", "sparsity", "test acc", "zero-H acts", "layers removed",
                     "acts removed", "longest path", "latency ratio")


def tolerance_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for arch, res in results["archs"].items():
        for m in METHODS:
            b = res["comparison"]["within_tolerance"].get(m)
            if not b:
                continue
            lat = b["latency_ratio"]
            rows.append((arch, m.upper(), str(b["iteration"]), f"{b['sparsity']:.3f}", f"{b['test_acc']:.2f}",
                         f"{b['zero_entropy_layers']}/{len(res['sites'])}", _s(b["layers_removed"]),
                         _s(b["activations_removed"]), f"{_s(b['longest_path_before'])} -> {_s(b['longest_path_after'])}",
                         f"{lat['median']:.2f}" if lat else "-"))
    return rows


def md_table(columns, rows) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_markdown(results: dict[str, Any], path: Path) -> None:
    from egp_deploy.io_utils import write_bytes_atomic

    env = results["environment"]
    st = results["settings"]
    v = results["verdict"]
    versions = env.get("versions", {})
    lines = [
        "# Reproduction: EGP vs IMP on digits, down to the deployed graph",
        "",
        "Generated by `tools/reproduce.py` (tables, verdict and notes are written from `reproduce.json`; "
        f"the section `{DISCUSSION_HEADING[3:]}` is kept across reruns).",
        "",
        "## Command",
        "",
        "```",
        results["command"],
        "```",
        "",
        f"Total wall time {results['seconds_total'] / 60:.1f} min.",
        "",
        "## Environment",
        "",
        f"- date (UTC): {env.get('date_utc')}",
        f"- CPU: {env.get('cpu_model')}, {env.get('cpu_usable')} usable cores (shared with other work; "
        f"load average at start {results['load_average_start']}, at end {results['load_average_end']})",
        f"- threads: torch {st['threads']} (training, fine-tuning), onnxruntime intra-op {st['threads']} (surgery and latency)",
        f"- python {versions.get('python')}, torch {versions.get('torch')}, onnx {versions.get('onnx')}, "
        f"onnxruntime {versions.get('onnxruntime')}, numpy {versions.get('numpy')}, egp-deploy {versions.get('egp-deploy')}",
        f"- platform: {env.get('platform')}",
        "",
        "## Protocol",
        "",
        "- Data: digits (scikit-learn, 1797 real images upscaled to 1x32x32; train/val/test 1257/270/270). "
        "Entropy is measured on the val split; test accuracy on the test split.",
        f"- Dense: {st['dense_epochs']} epochs, SGD momentum 0.9, wd 1e-4, cosine LR, batch {st['batch_size']}; one "
        "checkpoint per architecture, shared by both methods.",
        f"- Pruning: {st['iterations']} iterations at rate {st['rate']} (nominal sparsity 1 - {1 - st['rate']}^i), "
        f"{st['epochs']} fine-tuning epochs after each prune (cosine from the fine-tuning LR below), same LR and seed "
        "for both methods. "
        "EGP: entropy-guided budget over the prunable layers (EGP.md); IMP: global L1 over all conv/linear weights.",
        "- Every iteration's checkpoint is exported (legacy exporter, opset 17, batch 1) and surgered "
        f"(egp_deploy.surgery, default options; {st['calibration_samples']} val images calibrate, "
        f"{st['held_out_samples']} test images are held out).",
        f"- Latency: onnxruntime CPU, batch 1, {st['threads']} intra-op thread, random normal input; dense exported graph, "
        f"this iteration's exported graph and its surgered graph interleaved for {st['bench_duration_s']} s "
        f"(after {st['bench_warmup_ms']:.0f} ms warm-up each); ratio = per-round surgered / dense, median (min-max).",
        "- sparsity = zero fraction of the prunable layers' weights (for IMP too); zero-H acts = activation sites "
        "whose layer entropy is 0 in PyTorch; layers removed = conv/gemm nodes of the exported graph that the "
        "surgery eliminated; acts removed = activations before - after.",
        "",
        "Architectures:",
        "",
    ]
    for arch, res in results["archs"].items():
        d = res["dense"]
        lines.append(f"- {arch} {json.dumps(res['arch_kwargs'])}: {res['preset_note']}; lr {res['lr']} dense / {res['finetune_lr']} fine-tuning; "
                     f"{d['params']:,} parameters; dense test accuracy {d['test_acc']:.2f} % "
                     f"({d['seconds_per_epoch']:.2f} s/epoch{', reused' if d.get('reused') else ''}).")
    lines += [
        "",
        "## Headline (last iteration, equal nominal sparsity)",
        "",
        md_table(HEADLINE_COLUMNS, headline_rows(results)),
        "",
        "W-T-L: iterations where EGP left more / as many / fewer zero-entropy activation layers than IMP.",
        "",
        f"At the most pruned iteration whose test accuracy is within {ACC_TOLERANCE:g} points of dense (each method "
        "on its own; what a user would deploy):",
        "",
        md_table(TOLERANCE_COLUMNS, tolerance_rows(results)),
        "",
        f"**Claim** (EGP leaves more zero-entropy layers than IMP at equal sparsity on at least {v['needed']} of "
        f"{v['archs']} architectures; criterion: {v['criterion']}; zero entropy in a collapsed network is not "
        f"deployable depth): **{'holds' if v['holds'] else 'not met'}** - EGP more on {v['egp_more']}/{v['archs']} "
        f"({', '.join(v['egp_more_archs']) or 'none'}).",
        "",
        f"Over all iterations, ignoring accuracy (sum of zero-H(EGP) - zero-H(IMP) > 0): EGP more on "
        f"{v['all_iterations']['egp_more']}/{v['archs']} ({', '.join(v['all_iterations']['egp_more_archs']) or 'none'}).",
        "",
        "![zero-entropy layers vs sparsity](reproduce.png)",
        "",
        "## Per architecture, per iteration",
        "",
    ]
    for arch, res in results["archs"].items():
        c = res["comparison"]
        lines += [f"### {arch}", "", md_table(TABLE_COLUMNS, table_rows(res)), "",
                  f"zero-H EGP - IMP per iteration: {c['zero_entropy_diff']}; layers removed EGP - IMP: "
                  f"{c['layers_removed_diff']}. Verdict: {c['text']}.", ""]
        notes = res.get("notes", [])
        if notes:
            lines += ["Notes from the data:", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Limitations", "",
              "- Narrow models, digits and few fine-tuning epochs (a CPU budget of ~15 minutes); these are not the "
              "paper's CIFAR-10 / 160-epoch numbers, and accuracy at high sparsity is lower than a full schedule gives.",
              "- 270 test images: one image is 0.37 accuracy points.",
              "- Latency ratios come from a 2-core machine shared with other work, 1 s per iteration; "
              "compare ratios, not absolute times.",
              ""]
    old = path.read_text() if path.is_file() else ""
    if DISCUSSION_HEADING in old:
        lines += [old[old.index(DISCUSSION_HEADING):].rstrip(), ""]
    write_bytes_atomic(path, "\n".join(lines).encode())


def save_plot(results: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures stay untouched

    from egp_deploy.io_utils import atomic_path

    archs = list(results["archs"])
    fig = Figure(figsize=(3.8 * len(archs), 6.2))
    axes = fig.subplots(2, len(archs), squeeze=False, sharex=False)
    style = {"egp": dict(color="tab:green", marker="o"), "imp": dict(color="tab:gray", marker="s")}

    def halvings(s: float) -> float:  # -log2(1 - s): iteration-like spacing, readable at 99 % sparsity
        return -math.log2(max(1.0 - s, 1e-6))

    for col, arch in enumerate(archs):
        res = results["archs"][arch]
        top, bottom = axes[0][col], axes[1][col]
        for m in METHODS:
            rows = res["methods"].get(m, [])
            xs = [halvings(r["sparsity"]) for r in rows]
            top.plot(xs, [r["zero_entropy_layers"] for r in rows], label=f"{m.upper()} zero-entropy acts", **style[m])
            top.plot(xs, [r["layers_removed"] if r["layers_removed"] is not None else float("nan") for r in rows],
                     linestyle="--", alpha=0.7, label=f"{m.upper()} layers removed", color=style[m]["color"],
                     marker=style[m]["marker"], markerfacecolor="none")
            bottom.plot(xs, [r["test_acc"] for r in rows], label=f"{m.upper()} test acc", **style[m])
        top.set_title(f"{arch} ({len(res['sites'])} activation sites)", fontsize=10)
        top.set_ylabel("count")
        bottom.set_ylabel("test accuracy (%)")
        for ax in (top, bottom):
            top_x = max((halvings(r["sparsity"]) for m in METHODS for r in res["methods"].get(m, [])), default=1.0)
            ticks = list(range(0, math.ceil(top_x - 1e-9) + 1))  # the nominal sparsities 0, 50, 75, 87.5 ... %
            ax.set_xticks(ticks, [f"{100 * (1 - 2.0 ** -t):.{0 if t < 2 else 1 if t < 4 else 2}f}" for t in ticks],
                          fontsize=7, rotation=45)
            ax.grid(alpha=0.3)
        bottom.set_xlabel("sparsity of prunable layers (%)")
        top.yaxis.get_major_locator().set_params(integer=True)
    axes[0][0].legend(fontsize=7, loc="upper left")
    axes[1][0].legend(fontsize=7, loc="lower left")
    fig.suptitle("EGP vs IMP on digits: zero-entropy activation layers and layers removed by the surgery", fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> Settings:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated subset of {', '.join(ARCHS)} (default: all)")
    ap.add_argument("--iterations", type=int, default=None, help="pruning iterations per method (default 7; --quick 1)")
    ap.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs after each prune (default 3; --quick 1)")
    ap.add_argument("--dense-epochs", type=int, default=None, help="epochs of the shared dense model (default 15; --quick 2)")
    ap.add_argument("--rate", type=float, default=0.5, help="fraction of remaining weights pruned per iteration (default 0.5)")
    ap.add_argument("--samples", type=int, default=None, help="calibration and held-out images for the surgery (default 256; --quick 64)")
    ap.add_argument("--bench-duration", type=float, default=None, help="seconds of interleaved latency timing per iteration (default 1; --quick 0.2)")
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="folder for reproduce.json/.png/.md (default docs/results; --quick runs/reproduce-quick)")
    ap.add_argument("--work", type=Path, default=None, help="folder for checkpoints and ONNX graphs (default runs/reproduce[-quick]/work)")
    ap.add_argument("--quick", action="store_true", help="smoke run: narrower models, 1 iteration, 1 epoch, ~1 minute for all four")
    ap.add_argument("--no-markdown", action="store_true", help="skip reproduce.md")
    ap.add_argument("--render-only", action="store_true",
                    help="recompute comparisons, verdict, tables, PNG and markdown from OUT/reproduce.json (no training)")
    a = ap.parse_args(argv)
    archs = [x.strip() for x in a.archs.split(",") if x.strip()]
    if not archs:
        ap.error(f"--archs: none given; choose from {', '.join(ARCHS)}")
    bad = [x for x in archs if x not in ARCHS]
    if bad:  # one line and exit 8, as an unknown architecture anywhere in egp-deploy
        print(f"error: --archs: unknown architecture {', '.join(map(repr, bad))}; choose from {', '.join(ARCHS)}",
              file=sys.stderr)
        sys.exit(UnsupportedError.exit_code)
    pick = lambda given, full, quick: given if given is not None else (quick if a.quick else full)  # noqa: E731
    st = Settings(
        archs=archs, iterations=pick(a.iterations, 7, 1), epochs=pick(a.epochs, 3, 1),
        dense_epochs=pick(a.dense_epochs, 15, 2), rate=a.rate, samples=pick(a.samples, 256, 64),
        bench_duration=pick(a.bench_duration, 1.0, 0.2), bench_warmup_ms=50.0 if a.quick else 100.0,
        threads=a.threads, seed=a.seed, quick=a.quick,
        out=a.out or (ROOT / "runs" / "reproduce-quick" if a.quick else ROOT / "docs" / "results"),
        presets=QUICK_PRESETS if a.quick else PRESETS,
    )
    st.work = a.work or (st.out / "work" if a.quick else ROOT / "runs" / "reproduce")
    if st.iterations < 1 or st.epochs < 0 or st.dense_epochs < 1 or st.samples < 2 or st.threads < 1:
        ap.error("--iterations and --dense-epochs must be >= 1, --epochs >= 0, --samples >= 2, --threads >= 1")
    if not 0.0 < st.rate < 1.0:
        ap.error("--rate must be in (0, 1)")
    st.markdown = not a.no_markdown
    st.render_only = a.render_only
    return st


def summarize(results: dict[str, Any], archs: list[str]) -> None:
    """Comparison, notes and verdict: pure functions of the per-iteration records."""
    for arch in archs:
        res = results["archs"][arch]
        res["comparison"] = compare_methods(res["methods"])
        res["notes"] = explain(arch, res)
    more = [a for a in archs if results["archs"][a]["comparison"]["egp_more"]]
    more_all = [a for a in archs if results["archs"][a]["comparison"]["egp_more_all_iterations"]]
    needed = min(3, len(archs))
    criterion = next(iter(results["archs"].values()))["comparison"]["criterion"] if archs else ""
    results["verdict"] = {"archs": len(archs), "egp_more": len(more), "egp_more_archs": more,
                          "needed": needed, "holds": len(more) >= needed,
                          "all_iterations": {"egp_more": len(more_all), "egp_more_archs": more_all},
                          "criterion": criterion}


def write_outputs(results: dict[str, Any], st: Settings) -> None:
    from egp_deploy.io_utils import write_json_atomic

    json_path, png_path, md_path = st.out / "reproduce.json", st.out / "reproduce.png", st.out / "reproduce.md"
    write_json_atomic(json_path, results)
    save_plot(results, png_path)
    if st.markdown:
        write_markdown(results, md_path)
    print_tables(results)
    print(f"total {results['seconds_total'] / 60:.1f} min")
    print(f"wrote {json_path}\nwrote {png_path}" + (f"\nwrote {md_path}" if st.markdown else ""))


def main(argv: list[str] | None = None) -> int:
    st = parse_args(argv)
    if st.render_only:
        path = st.out / "reproduce.json"
        if not path.is_file():
            print(f"error: {path} not found: run without --render-only first", file=sys.stderr)
            return 3
        results = json.loads(path.read_text())
        if results.get("schema") != SCHEMA:
            print(f"error: {path} is not a {SCHEMA} file", file=sys.stderr)
            return 3
        results["rendered_by"] = "python tools/reproduce.py --render-only" + (f" --out {st.out}" if argv else "")
        summarize(results, list(results["archs"]))
        write_outputs(results, st)
        return 0
    import torch

    from egp_deploy.bench import collect_environment
    from egp_deploy.calibration import load_calibration
    from egp_deploy.data import load_data

    torch.set_num_threads(st.threads)
    # the prune loop redraws its entropy heat map every iteration; at 2 rows matplotlib warns about margins
    warnings.filterwarnings("ignore", message="Tight layout not applied")
    t_all = time.perf_counter()
    load_start = os.getloadavg()
    shown_argv = sys.argv[1:] if argv is None else argv
    command = "python tools/reproduce.py" + ("".join(" " + shlex.quote(x) for x in shown_argv))

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_all:6.0f} s] {msg}", flush=True)

    bundle = load_data("digits")
    data = load_calibration("digits", bundle.input_shape, st.samples)  # the one policy: val calibrates, test is held out
    calib, held = data.calibration, data.held_out
    st.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"schema": SCHEMA, "tool": "tools/reproduce.py", "command": command,
                               "settings": st.to_json(), "archs": {}}
    for arch in st.archs:
        log(f"{arch} {st.presets[arch].kwargs}")
        results["archs"][arch] = run_arch(arch, bundle, calib, held, st, log)
        log(f"{arch} done in {results['archs'][arch]['seconds']:.0f} s")
    summarize(results, st.archs)
    results["environment"] = collect_environment()
    results["environment"]["torch_threads"] = torch.get_num_threads()
    results["load_average_start"] = [round(x, 2) for x in load_start]
    results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results["seconds_total"] = time.perf_counter() - t_all
    write_outputs(results, st)
    return 0


if __name__ == "__main__":
    sys.exit(main())
