#!/usr/bin/env python
"""The reference recipe at a wider ResNet-18 (default width 32): prune, export + surgery, latency.

models/ ships width 16 (small files, a 5-minute main job). This script asks what the same recipe
gives when the network has more room: it runs exactly the reference command with another width,

    egp-prune resnet18 --arch-kwargs width=W --dense-epochs 30 --epochs 14 --lr 0.05 \\
        --iterations 12 --tolerance 1.0 --patience 2 --seed 0 -q -o RUN
    egp-export RUN/dense.pt -o RUN/dense.onnx
    egp-export RUN/best.pt  -o RUN/egp.onnx
    egp-bench RUN/dense.exported.onnx RUN/egp.exported.onnx RUN/egp.onnx --threads 1 --duration D

and writes docs/results/wide_reference_wW.json and .md (accuracy, zero-entropy count, what the
surgery removed, and the latency ratios the issues set goals for).

    python tools/wide_reference.py                 # width 32: ~30 min on 2 CPU cores
    python tools/wide_reference.py --reuse         # keep RUN/ if its log.json is complete
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from egp_deploy.io_utils import write_bytes_atomic, write_json_atomic
from make_reference_models import finished, prune_args  # the reference recipe, defined once (tools/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]


class StageFailed(Exception):
    pass


def _cli(*args: str) -> None:
    """One pipeline stage through its own CLI (which prints its own one-line error on failure)."""
    print("$ egp-" + " ".join(args), flush=True)
    rc = subprocess.run([sys.executable, "-m", "egp_deploy.cli", *args]).returncode
    if rc != 0:
        raise StageFailed(f"egp-{args[0]} failed with exit code {rc}; nothing written to docs/results")


def _row(metrics: dict) -> dict:
    keys = ("nodes", "conv_gemm_layers", "activations", "longest_path_layers", "macs_dense", "params_nonzero")
    return {k: metrics[k] for k in keys}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=32, help="ResNet-18 base width (models/ ships 16)")
    ap.add_argument("--iterations", type=int, default=12, help="EGP iterations at most (the reference: 12)")
    ap.add_argument("--run-dir", type=Path, default=None, help="default runs/wide_reference_wW")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results", help="folder for the JSON and .md")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of interleaved latency timing")
    ap.add_argument("--reuse", action="store_true", help="skip pruning when RUN/ already holds a finished run")
    args = ap.parse_args()
    try:
        return _run(args)
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    run = args.run_dir or ROOT / "runs" / f"wide_reference_w{args.width}"
    t0 = time.time()

    reused = args.reuse and finished(run, args.iterations)
    if not reused:
        _cli("prune", *prune_args(args.width, args.iterations), "-o", str(run))
    _cli("export", str(run / "dense.pt"), "-o", str(run / "dense.onnx"))
    _cli("export", str(run / "best.pt"), "-o", str(run / "egp.onnx"))
    _cli("bench", str(run / "dense.exported.onnx"), str(run / "egp.exported.onnx"), str(run / "egp.onnx"),
         "--threads", "1", "--duration", str(args.duration), "--json", str(run / "bench.json"))

    log = json.loads((run / "log.json").read_text())
    dense_it, best_it = log["iterations"][0], log["iterations"][log["best_iteration"]]
    egp = json.loads((run / "egp.json").read_text())
    bench = json.loads((run / "bench.json").read_text())
    pruned_ms = bench["models"][1]["latency_ms"]["median"]
    surgered_ms = bench["models"][2]["latency_ms"]["median"]
    ver = egp["surgery"]["verification"]
    result = {
        "tool": "wide_reference",
        "command": "python tools/wide_reference.py" + (f" --width {args.width}" if args.width != 32 else ""),
        "arch": "resnet18", "arch_kwargs": log["arch_kwargs"],
        "recipe": log["config"],
        "dense_test_acc": dense_it["test_acc"],
        "kept_iteration": best_it["iteration"], "iterations_run": len(log["iterations"]) - 1,
        "stopped": log.get("stopped"),
        "egp_test_acc": best_it["test_acc"], "acc_drop_points": dense_it["test_acc"] - best_it["test_acc"],
        "sparsity_prunable": best_it["sparsity_prunable"],
        "zero_entropy_activations": len(best_it["zero_entropy_sites"]), "activation_sites": len(best_it["entropy"]),
        "zero_entropy_sites": best_it["zero_entropy_sites"], "all_zero_layers": best_it["all_zero_layers"],
        "per_iteration": [{"iteration": it["iteration"], "sparsity_prunable": it["sparsity_prunable"],
                           "test_acc": it["test_acc"], "zero_entropy": len(it["zero_entropy_sites"]),
                           "all_zero_layers": len(it["all_zero_layers"])} for it in log["iterations"]],
        "graph_exported": _row(egp["metrics_exported"]), "graph_surgered": _row(egp["metrics_surgered"]),
        "layers_removed": egp["surgery"]["layers_removed"],
        "verification": {"calibration_rel_error": ver["calibration"]["rel_error"],
                         "held_out_rel_error": ver["held_out"]["rel_error"] if ver["held_out"] else None,
                         "held_out_top1_agreement": ver["held_out"]["top1_agreement"] if ver["held_out"] else None},
        "latency": {"surgered_vs_dense": bench["models"][2]["ratio_to_first"],
                    "pruned_exported_vs_dense": bench["models"][1]["ratio_to_first"],
                    "surgered_vs_pruned_exported_medians": surgered_ms / pruned_ms,
                    "median_ms": [m["latency_ms"]["median"] for m in bench["models"]],
                    "rounds": bench["rounds"], "settings": bench["settings"]},
        "environment": bench["environment"],
        "seconds": time.time() - t0,
        "prune_reused": reused,
        "prune_iteration_seconds": sum(it.get("seconds", 0.0) for it in log["iterations"]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"wide_reference_w{args.width}"
    write_json_atomic(stem.with_suffix(".json"), result)
    write_bytes_atomic(stem.with_suffix(".md"), _markdown(result).encode())
    print(f"wrote {stem}.json, {stem}.md")
    return 0


def _duration(r: dict) -> str:
    prune = f"EGP iterations {r['prune_iteration_seconds'] / 60:.0f} min"
    if r["prune_reused"]:
        return f"pruning reused from an identical earlier run: {prune}; export, surgery and timing {r['seconds']:.0f} s"
    return f"{r['seconds'] / 60:.0f} min in all, of which {prune}"


def _markdown(r: dict) -> str:
    lat, ge, gs_ = r["latency"], r["graph_exported"], r["graph_surgered"]
    env = r["environment"]
    v = env["versions"]
    rows = "\n".join(f"| {p['iteration']} | {p['sparsity_prunable']:.5f} | {p['test_acc']:.2f} | "
                     f"{p['zero_entropy']}/{r['activation_sites']} | {p['all_zero_layers']} |" for p in r["per_iteration"])
    s = lat["surgered_vs_dense"]
    return f"""# The reference recipe at width {r['arch_kwargs'].get('width')}

Generated by `{r['command']}` ({_duration(r)}). {env['cpu_model']}, {env['cpu_usable']} cores,
onnxruntime {v['onnxruntime']} CPU with 1 intra-op thread, batch 1, fp32; torch {v['torch']}; {env['date_utc']}.

ResNet-18 (CIFAR stem, width {r['arch_kwargs'].get('width')}, 1 input channel, 10 classes), digits, EGP with the reference recipe (rate 0.5, 14
fine-tuning epochs, tolerance 1 point, at most {r['recipe']['iterations']} iterations). Dense test accuracy
{r['dense_test_acc']:.2f} %; kept iteration {r['kept_iteration']} of {r['iterations_run']} run
({'stopped: ' + r['stopped'] if r['stopped'] else 'every iteration stayed within the tolerance'}).

| | dense | EGP (kept) |
|---|---|---|
| test accuracy | {r['dense_test_acc']:.2f} % | {r['egp_test_acc']:.2f} % ({-r['acc_drop_points']:+.2f}) |
| sparsity of the prunable layers | 0 | {r['sparsity_prunable']:.5f} |
| zero-entropy activations | 0/{r['activation_sites']} | {r['zero_entropy_activations']}/{r['activation_sites']} |
| nodes / conv-gemm layers / activations / longest path | {ge['nodes']} / {ge['conv_gemm_layers']} / {ge['activations']} / {ge['longest_path_layers']} | {gs_['nodes']} / {gs_['conv_gemm_layers']} / {gs_['activations']} / {gs_['longest_path_layers']} (after surgery) |
| MACs, dense execution | {ge['macs_dense'] / 1e6:.1f} M | {gs_['macs_dense'] / 1e6:.1f} M (x{gs_['macs_dense'] / ge['macs_dense']:.3f}) |
| surgery verification (held-out digits) | - | rel. error {r['verification']['held_out_rel_error']:.1e}, top-1 agreement {r['verification']['held_out_top1_agreement']:.0%} |
| latency vs dense, median over {lat['rounds']} interleaved rounds | 1.000 | {s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f}) |
| latency vs the exported pruned graph (ratio of medians) | - | {lat['surgered_vs_pruned_exported_medians']:.3f} |

Layers removed by the surgery: {', '.join(r['layers_removed'])}.
Zero-entropy sites: {', '.join(r['zero_entropy_sites'])}.

| iteration | sparsity (prunable) | test acc | zero-H acts | all-zero layers |
|---|---|---|---|---|
{rows}
"""


if __name__ == "__main__":
    sys.exit(main())
