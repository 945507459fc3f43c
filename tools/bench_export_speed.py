#!/usr/bin/env python
"""Speed of the tool itself: load + export + verify + surgery (+ its verification) of a full-width ResNet-18.

ResNet-18, CIFAR stem, width 64, 1000 classes: 11.69 M parameters, input 1x3x32x32 (--size 224 for
1x3x224x224). Two variants: dense (random weights, BN statistics from random inputs) and
EGP-like pruned (two all-zero convs, dead channels, 90 % unstructured sparsity in two layers), so
the surgery has real rewrites to make. Calibration and held-out inputs: random normal.
Goal (issue 3): <= 10 s on 2 cores. Python start-up and imports are excluded and reported apart.

    python tools/bench_export_speed.py [--size 32] [--samples 128] [--repeats 1] [--threads 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

T_START = time.perf_counter()
os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime  # noqa: E402
import torch  # noqa: E402

from egp_deploy.archs import create_model  # noqa: E402
from egp_deploy.bench import cpu_model  # noqa: E402
from egp_deploy.checkpoint import checkpoint_from_model, save_checkpoint  # noqa: E402
from egp_deploy.export import export_model, load_source  # noqa: E402
from egp_deploy.io_utils import write_bytes_atomic, write_json_atomic  # noqa: E402
from egp_deploy.onnx_metrics import graph_metrics  # noqa: E402
from egp_deploy.api import optimize  # noqa: E402  (the surgery plus its provenance metadata, as egp-export runs it)

IMPORT_SECONDS = time.perf_counter() - T_START
ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 10.0


def make_model(pruned: bool, size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=1000, in_channels=3, width=64,
                         stem="cifar" if size <= 64 else "imagenet")
    model.train()
    with torch.no_grad():  # realistic BN statistics so ReLUs are neither all on nor all off
        for _ in range(2):
            model(torch.randn(16, 3, size, size))
    model.eval()
    if pruned:
        with torch.no_grad():
            model.layer3[1].conv2.weight.zero_()
            model.layer4[0].conv1.weight.zero_()
            model.layer1[0].conv1.weight[:32] = 0.0
            for conv in (model.layer2[0].conv1, model.layer4[1].conv1):
                w = conv.weight
                w[w.abs() < w.abs().flatten().kthvalue(int(0.9 * w.numel())).values] = 0.0
    return model


def run_once(ckpt: Path, out_dir: Path, samples: int, threads: int, size: int) -> dict:
    stages: dict[str, float] = {}
    t = time.perf_counter()
    source = load_source(ckpt)
    stages["load checkpoint"] = time.perf_counter() - t
    res = export_model(source)
    stages["torch reference forward"] = res.seconds["torch_forward"]
    stages["onnx export (legacy)"] = res.seconds["export"]
    stages["export verification (ort)"] = res.seconds["verify"]
    t = time.perf_counter()
    before = graph_metrics(res.model)
    stages["graph metrics"] = time.perf_counter() - t
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((samples, 3, size, size)).astype(np.float32)
    held = rng.standard_normal((samples, 3, size, size)).astype(np.float32)
    t = time.perf_counter()
    result = optimize(res.model, calib, held, threads=threads)
    stages["surgery + verification"] = time.perf_counter() - t
    t = time.perf_counter()
    write_bytes_atomic(out_dir / "exported.onnx", res.model.SerializeToString())
    write_bytes_atomic(out_dir / "surgered.onnx", result.model.SerializeToString())
    stages["write both files"] = time.perf_counter() - t
    after = graph_metrics(result.model)
    return {
        "stages": stages,
        "total": sum(stages.values()),
        "surgery_breakdown": result.report.get("timing_s"),
        "params": before["params"],
        "before": {k: before[k] for k in ("conv_gemm_layers", "longest_path_layers", "macs_dense")},
        "after": {k: after[k] for k in ("conv_gemm_layers", "longest_path_layers", "macs_dense")},
        "verification": result.report.get("verification"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=32, help="input height = width (32: CIFAR stem, 224: ImageNet stem)")
    ap.add_argument("--samples", type=int, default=128, help="calibration and held-out samples each")
    ap.add_argument("--repeats", type=int, default=1, help="runs per variant; the median total is reported")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from rich.console import Console
    from rich.table import Table

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for variant in ("dense", "pruned"):
            ckpt = tmp / f"{variant}.pt"
            model = make_model(variant == "pruned", args.size)
            save_checkpoint(ckpt, checkpoint_from_model(model, "resnet18", {
                "num_classes": 1000, "in_channels": 3, "width": 64,
                "stem": "cifar" if args.size <= 64 else "imagenet"}, (3, args.size, args.size), 1000))
            runs = [run_once(ckpt, tmp, args.samples, args.threads, args.size) for _ in range(args.repeats)]
            runs.sort(key=lambda r: r["total"])
            median = runs[len(runs) // 2]
            results[variant] = {"median_run": median, "totals": [r["total"] for r in runs]}

    console = Console(width=120)
    table = Table(title=f"export + surgery + verification, ResNet-18 ({results['dense']['median_run']['params'] / 1e6:.2f} M params), "
                        f"1x3x{args.size}x{args.size}, {args.threads} threads, {args.samples}+{args.samples} samples")
    table.add_column("stage")
    for v in results:
        table.add_column(f"{v} [s]", justify="right")
    stages = list(results["dense"]["median_run"]["stages"])
    for s in stages:
        table.add_row(s, *(f"{results[v]['median_run']['stages'][s]:.2f}" for v in results))
    table.add_row("total", *(f"{results[v]['median_run']['total']:.2f}" for v in results), style="bold")
    console.print(table)
    for v in results:
        r = results[v]["median_run"]
        console.print(f"{v}: conv/gemm layers {r['before']['conv_gemm_layers']} -> {r['after']['conv_gemm_layers']}, "
                      f"longest path {r['before']['longest_path_layers']} -> {r['after']['longest_path_layers']}; "
                      f"surgery breakdown: {r['surgery_breakdown']}")
    console.print(f"(imports before timing: {IMPORT_SECONDS:.1f} s, not counted)")
    worst = max(results[v]["median_run"]["total"] for v in results)
    verdict = "PASS" if worst <= GOAL_S else "OVER"
    console.print(f"goal <= {GOAL_S:.0f} s: {verdict} (slowest variant {worst:.2f} s)")

    out = {
        "tool": "bench_export_speed", "goal_s": GOAL_S, "verdict": verdict, "results": results,
        "input_shape": [1, 3, args.size, args.size], "samples": args.samples, "repeats": args.repeats,
        "import_seconds": IMPORT_SECONDS,
        "environment": {
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": args.threads,
            "python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    path = write_json_atomic(args.out / f"bench_export_speed_{args.size}.json", out)
    console.print(f"wrote {path}")
    return 0



if __name__ == "__main__":
    sys.exit(main())
