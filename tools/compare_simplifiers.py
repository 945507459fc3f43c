#!/usr/bin/env python
"""Nodes and conv/gemm layers after our surgery vs onnxsim and onnxslim, on the same exported graphs.

Models: the zoo at narrow width with random weights (dense: the surgery should only canonicalise),
and EGP-pruned ResNet-18s: models/resnet18_digits_egp.pt when it exists, plus a synthetic one
(random weights, BN statistics from digits, whole layers / channels / 90 % of a layer zeroed) so
the script runs anywhere. Calibration: digits val split, held-out: digits test split.

Claims checked per row: ours has no more nodes and conv layers than either simplifier; on pruned
models strictly fewer conv layers. Prints a table, writes JSON (default docs/results/).

    python tools/compare_simplifiers.py [--models resnet18,mobilenet_v2,vgg16_bn,vit_tiny,egp] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import onnx  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from egp_deploy.archs import create_model  # noqa: E402
from egp_deploy.data import calibration_batch, load_data  # noqa: E402
from egp_deploy.export import SourceModel, export_model, load_source  # noqa: E402
from egp_deploy.io_utils import write_json_atomic  # noqa: E402
from egp_deploy.onnx_metrics import graph_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ZOO = {
    "resnet18": {"width": 16},
    "mobilenet_v2": {"width": 0.25},
    "vgg16_bn": {"width": 8},
    "vit_tiny": {"width": 32, "layers": 4},
}
KEYS = ("nodes", "conv_gemm_layers", "activations", "longest_path_layers", "macs_dense", "params")


def _calibrate_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Running BN statistics from real inputs (no training): activations then have realistic signs."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            for i in range(0, len(x), 128):
                model(x[i:i + 128])
    return model.eval()


def synthetic_egp_resnet(train_x: torch.Tensor) -> nn.Module:
    """ResNet-18 (width 16) pruned the way EGP leaves it: all-zero layers, dead channels, 90 % sparse layers."""
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, in_channels=1, width=16)
    _calibrate_bn(model, train_x)
    with torch.no_grad():
        model.layer3[1].conv2.weight.zero_()
        model.layer4[0].conv1.weight.zero_()
        model.layer2[1].conv1.weight[::2] = 0.0
        model.layer1[0].conv1.weight[:8] = 0.0
        for conv in (model.layer2[0].conv1, model.layer4[1].conv1):
            w = conv.weight
            w[w.abs() < w.abs().flatten().quantile(0.9)] = 0.0
    return model.eval()


def _module_source(name: str, model: nn.Module, kwargs: dict) -> SourceModel:
    return SourceModel("checkpoint", Path(f"{name}.pt"), "", model.eval(), input_shape=(1, 32, 32), arch=name,
                       arch_kwargs=kwargs, num_classes=10, metadata={"data": "digits"})


def _row(metrics: dict) -> dict:
    return {k: metrics[k] for k in KEYS}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2,vgg16_bn,vit_tiny,egp",
                    help="comma list of zoo names and 'egp' (pruned ResNet-18s)")
    ap.add_argument("--samples", type=int, default=256, help="calibration and held-out samples")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results", help="folder for the JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    import onnxsim
    import onnxslim
    from rich.console import Console
    from rich.table import Table

    from egp_deploy.api import optimize
    from egp_deploy.calibration import load_calibration

    bundle = load_data("digits")
    data = load_calibration("digits", bundle.input_shape, args.samples)  # val calibrates, test is held out
    calib, held = data.calibration, data.held_out
    train_x = calibration_batch(bundle, 1024, "train")

    sources: list[tuple[str, bool, SourceModel]] = []
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in wanted:
        if name == "egp":
            ref = ROOT / "models" / "resnet18_digits_egp.pt"
            if ref.is_file():
                sources.append(("resnet18_digits_egp (models/)", True, load_source(ref)))
            sources.append(("resnet18 synthetic EGP-pruned", True,
                            _module_source("resnet18", synthetic_egp_resnet(train_x), {"width": 16})))
            continue
        kw = dict(ZOO[name], num_classes=10, in_channels=1)
        torch.manual_seed(0)
        model = _calibrate_bn(create_model(name, **kw), train_x)
        sources.append((f"{name} (dense)", False, _module_source(name, model, kw)))

    rows = []
    for label, pruned, source in sources:
        exported = export_model(source).model
        entry = {"model": label, "pruned": pruned, "exported": _row(graph_metrics(exported))}
        t0 = time.perf_counter()
        sim, ok = onnxsim.simplify(exported)
        entry["onnxsim"] = _row(graph_metrics(sim)) | {"seconds": time.perf_counter() - t0, "check_ok": bool(ok)}
        t0 = time.perf_counter()
        slim = onnxslim.slim(exported)
        entry["onnxslim"] = _row(graph_metrics(slim)) | {"seconds": time.perf_counter() - t0}
        t0 = time.perf_counter()
        result = optimize(exported, calib, held, threads=args.threads)
        ours = graph_metrics(result.model)
        entry["ours"] = _row(ours) | {"seconds": time.perf_counter() - t0}
        ver = result.report.get("verification", {})
        entry["ours_verification"] = ver
        best_nodes = min(entry["onnxsim"]["nodes"], entry["onnxslim"]["nodes"])
        best_layers = min(entry["onnxsim"]["conv_gemm_layers"], entry["onnxslim"]["conv_gemm_layers"])
        entry["claims"] = {
            "nodes_never_more": ours["nodes"] <= best_nodes,
            "conv_layers_never_more": ours["conv_gemm_layers"] <= best_layers,
            "strictly_fewer_conv_layers_when_pruned": (ours["conv_gemm_layers"] < best_layers) if pruned else None,
        }
        rows.append(entry)
        print(f"done: {label}", file=sys.stderr)

    table = Table(title="nodes / conv-gemm layers / longest path after each tool")
    for col in ("model", "exported", "onnxsim", "onnxslim", "ours (egp surgery)", "claims"):
        table.add_column(col, justify="left" if col in ("model", "claims") else "right")
    fmt = lambda m: f"{m['nodes']} / {m['conv_gemm_layers']} / {m['longest_path_layers']}"  # noqa: E731
    all_ok = True
    for r in rows:
        claims = [v for v in r["claims"].values() if v is not None]
        ok = all(claims)
        all_ok &= ok
        table.add_row(r["model"], fmt(r["exported"]), fmt(r["onnxsim"]), fmt(r["onnxslim"]), fmt(r["ours"]),
                      "PASS" if ok else "FAIL " + ",".join(k for k, v in r["claims"].items() if v is False))
    Console(width=150).print(table)

    result = {
        "tool": "compare_simplifiers", "rows": rows, "all_claims_hold": all_ok,
        "environment": {
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "threads": args.threads,
            "python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxsim": getattr(onnxsim, "__version__", "?"), "onnxslim": getattr(onnxslim, "__version__", "?"),
        },
        "inputs": "1x1x32x32 (digits), calibration = digits val, held-out = digits test",
        "date": time.strftime("%Y-%m-%d"),
    }
    path = write_json_atomic(args.out / "compare_simplifiers.json", result)
    print(f"wrote {path}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
