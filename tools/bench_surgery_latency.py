#!/usr/bin/env python
"""Batch-1 onnxruntime CPU latency of the surgered graph against the exported one, interleaved.

Defaults are the two files `egp-export models/resnet18_digits_egp.pt` writes
(models/resnet18_digits_egp.onnx and models/resnet18_digits_egp.egp.onnx). Both run in ONE
process, A B A B ..., so they see the same machine state; the figure of merit is the per-round
ratio surgered / exported (median, with min and max). Issue 3's goal: median ratio <= 0.5 on the
EGP-pruned reference. Prints a table and writes JSON + PNG (default into docs/results/).

    python tools/bench_surgery_latency.py [EXPORTED.onnx SURGERED.onnx] [--threads 1] [--duration 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EXPORTED = ROOT / "models" / "resnet18_digits_egp.onnx"
DEFAULT_SURGERED = ROOT / "models" / "resnet18_digits_egp.egp.onnx"
GOAL_RATIO = 0.5


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exported", nargs="?", type=Path, default=DEFAULT_EXPORTED, help="graph as exported (reference)")
    ap.add_argument("surgered", nargs="?", type=Path, default=DEFAULT_SURGERED, help="graph after egp surgery")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1: steadier on shared machines)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of interleaved timing (default 10)")
    ap.add_argument("--iterations", type=int, default=100, help="at least this many rounds (default 100)")
    ap.add_argument("--warmup-ms", type=float, default=500.0, help="warm-up per model in ms (default 500)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results", help="folder for JSON and PNG")
    ap.add_argument("--name", default="bench_surgery_latency", help="file stem of the outputs")
    args = ap.parse_args(argv)

    import onnx

    from egp_deploy.bench import BenchSettings, benchmark_models, print_table, save_latency_plot
    from egp_deploy.io_utils import write_json_atomic
    from egp_deploy.onnx_metrics import graph_metrics

    for p in (args.exported, args.surgered):
        if not p.is_file():
            print(f"error: {p} not found; make it with `egp-export models/resnet18_digits_egp.pt` "
                  "or pass EXPORTED.onnx SURGERED.onnx", file=sys.stderr)
            return 3
    settings = BenchSettings(warmup_ms=args.warmup_ms, min_iterations=args.iterations,
                             min_duration_s=args.duration, batch=1, threads=args.threads)
    report = benchmark_models([args.exported, args.surgered], "ort-cpu", settings, progress=True)
    metrics = {}
    for role, p in (("exported", args.exported), ("surgered", args.surgered)):
        m = graph_metrics(onnx.load(str(p)))
        metrics[role] = {"path": str(p)} | {k: m[k] for k in ("nodes", "conv_gemm_layers", "activations", "longest_path_layers",
                                             "params_nonzero", "macs_dense", "macs_nonzero", "file_size_bytes")}
    ratio = report["models"][1]["ratio_to_first"]
    report["tool"] = "tools/bench_surgery_latency.py"
    report["graph_metrics"] = metrics
    report["goal"] = {"ratio_median_at_most": GOAL_RATIO, "met": bool(ratio["median"] <= GOAL_RATIO)}

    print_table(report)
    print()
    print(f"{'graph':<12}{'nodes':>8}{'conv/gemm':>11}{'acts':>7}{'depth':>7}{'MACs (nonzero)':>16}")
    for name, m in metrics.items():
        print(f"{name:<12}{m['nodes']:>8}{m['conv_gemm_layers']:>11}{m['activations']:>7}"
              f"{m['longest_path_layers']:>7}{m['macs_nonzero']:>16,}")
    print(f"\nsurgered / exported latency, batch 1, ort-cpu, {args.threads} thread(s): median {ratio['median']:.3f} "
          f"(min {ratio['min']:.3f}, max {ratio['max']:.3f}) over {ratio['pairs']} interleaved pairs; "
          f"goal <= {GOAL_RATIO}: {'met' if report['goal']['met'] else 'NOT met'}")
    args.out.mkdir(parents=True, exist_ok=True)
    png_path = save_latency_plot(report, args.out / f"{args.name}.png")
    for m in report["models"]:  # raw samples live in the plot; keep the committed JSON small
        m.pop("samples_ms", None)
    json_path = write_json_atomic(args.out / f"{args.name}.json", report)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
