#!/usr/bin/env python
"""Nodes and conv/gemm layers after our surgery vs onnxsim and onnxslim, on the same exported graphs.

Models: the zoo at narrow width with random weights (dense: the surgery should only canonicalise),
and EGP-pruned ResNet-18s: models/resnet18_digits_egp.pt when it exists, plus a synthetic one
(random weights, BN statistics from digits, whole layers / channels / 90 % of a layer zeroed) so
the script runs anywhere. Calibration: digits val split, held-out: digits test split.

Claims checked per row: ours has no more nodes and conv layers than either simplifier; on pruned
models strictly fewer conv layers (fewer dense MACs where the collapse is dead channels). Prints a
table, writes JSON (default docs/results/).

Rows ``mobilenet_v2-linear`` / ``resnet50-linear``: the zoo model with its stride-1 inverted residuals /
bottlenecks made linear on the data (BN output ~3, the ReLU/ReLU6 never clips): the chain merge
planner's case (MobileNetV2 blocks become one conv each; ResNet-50 merges would grow MACs).

    python tools/compare_simplifiers.py [--models resnet18,mobilenet_v2,vgg16_bn,vit_tiny,egp,
                                         mobilenet_v2-linear,resnet50,resnet50-linear] [--out DIR]
    python tools/compare_simplifiers.py --models swin_t,swin_egp --samples 64 --latency 10

Rows ``dense``, ``inception``, ``fire``, ``convnext``, ``mixer``, ``shuffle``, ``grouped`` (and ``-collapsed``):
the small blocks of tests/surgery_blocks.py (a DenseNet block, an Inception block, two fire modules, three
ConvNeXt blocks, two MLP-Mixer blocks, a ShuffleNetV2 unit, a ResNeXt grouped bottleneck; random weights),
unpruned and with the collapse the tests plant (constant branches into Concats, collapsed MLPs behind
permutes/transposes, dead channels through split/concat/shuffle, dead groups of a grouped conv):
``--models blocks`` is all fourteen.

``swin_egp``: Swin-T whose MLP fc1 is all zero in 4 of its 12 blocks and half of the hidden units of two
more are dead (what EGP's layer collapse leaves in an MLP). ``--latency S`` also times exported,
onnxslim and ours interleaved for S seconds (onnxruntime CPU, batch 1, 1 thread) and checks that ours
is no slower than onnxslim (3 % noise margin).
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

from bench_chain_merge import plant_linear  # noqa: E402  (tools/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test blocks: one definition of each block and its collapse
from surgery_blocks import BLOCK_NAMES, NARROWING_BLOCKS, collapsed, unpruned  # noqa: E402
from egp_deploy.archs import create_model  # noqa: E402
from egp_deploy.data import calibration_batch, load_data  # noqa: E402
from egp_deploy.export import SourceModel, export_model, load_source  # noqa: E402
from egp_deploy.io_utils import write_json_atomic  # noqa: E402
from egp_deploy.onnx_metrics import graph_metrics  # noqa: E402

ZOO = {
    "resnet18": {"width": 16},
    "mobilenet_v2": {"width": 0.25},
    "vgg16_bn": {"width": 8},
    "vit_tiny": {"width": 32, "layers": 4},
    "resnet50": {"width": 8, "stem": "cifar"},
    "swin_t": {"window_size": 4},  # full Swin-T widths/depths; 32x32 inputs give 8x8 tokens, 2x2 windows
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


def synthetic_egp_swin() -> nn.Module:
    """Swin-T with collapsed MLPs: fc1 all zero in 4 blocks, half the hidden units dead in 2 more."""
    torch.manual_seed(0)
    model = create_model("swin_t", num_classes=10, in_channels=1, **ZOO["swin_t"])
    with torch.no_grad():
        for stage, block in ((1, 0), (3, 1), (5, 1), (5, 4)):
            model.features[stage][block].mlp[0].weight.zero_()
        for stage, block in ((5, 2), (7, 0)):
            model.features[stage][block].mlp[0].weight[::2] = 0.0
    return model.eval()


def _latency(graphs: dict[str, onnx.ModelProto], seconds: float) -> dict[str, dict]:
    """Batch-1 onnxruntime CPU latency of each graph, interleaved, as ratios to the first (exported)."""
    import tempfile

    from egp_deploy.bench import BenchSettings, benchmark_models

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, model in graphs.items():
            paths.append(Path(tmp) / f"{name}.onnx")
            onnx.save(model, paths[-1])
        settings = BenchSettings(warmup_ms=300, min_iterations=50, min_duration_s=seconds, batch=1, threads=1)
        report = benchmark_models(paths, "ort-cpu", settings, keep_samples=False)
    return {name: {"median_ms": m["latency_ms"]["median"], "cv": m["cv"], "ratio_to_exported": m["ratio_to_first"]}
            for name, m in zip(graphs, report["models"])}


def _module_source(name: str, model: nn.Module, kwargs: dict) -> SourceModel:
    return SourceModel("checkpoint", Path(f"{name}.pt"), "", model.eval(), input_shape=(1, 32, 32), arch=name,
                       arch_kwargs=kwargs, num_classes=10, metadata={"data": "digits"})


def _row(metrics: dict) -> dict:
    return {k: metrics[k] for k in KEYS}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2,vgg16_bn,vit_tiny,egp,mobilenet_v2-linear,resnet50,"
                                        "resnet50-linear",
                    help="comma list of zoo names and 'egp' (pruned ResNet-18s)")
    ap.add_argument("--samples", type=int, default=256, help="calibration and held-out samples")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latency", type=float, default=0.0, metavar="S",
                    help="also time exported/onnxslim/ours interleaved for S seconds per model (0: off)")
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
    narrowing: set[str] = set()  # pruned rows whose claim is fewer dense MACs, not fewer layers
    wanted = requested = [m.strip() for m in args.models.split(",") if m.strip()]
    if "blocks" in wanted:
        wanted = list(wanted)
        i = wanted.index("blocks")
        wanted[i:i + 1] = [f"{b}{s}" for b in BLOCK_NAMES for s in ("", "-collapsed")]
    for name in wanted:
        block = name.removesuffix("-collapsed")
        if block in BLOCK_NAMES:
            pruned = name != block
            model = collapsed(block, in_channels=1) if pruned else unpruned(block, in_channels=1)
            sources.append((f"{block} block ({'collapsed' if pruned else 'dense'})", pruned,
                            _module_source(block, model, {})))
            if pruned and block in NARROWING_BLOCKS:
                narrowing.add(sources[-1][0])
            continue
        if name == "egp":
            ref = ROOT / "models" / "resnet18_digits_egp.pt"
            if ref.is_file():
                sources.append(("resnet18_digits_egp (models/)", True, load_source(ref)))
            sources.append(("resnet18 synthetic EGP-pruned", True,
                            _module_source("resnet18", synthetic_egp_resnet(train_x), {"width": 16})))
            continue
        if name == "swin_egp":
            sources.append(("swin_t synthetic EGP-collapsed MLPs", True,
                            _module_source("swin_t", synthetic_egp_swin(), ZOO["swin_t"])))
            continue
        arch, linear = name.removesuffix("-linear"), name.endswith("-linear")
        kw = dict(ZOO[arch], num_classes=10, in_channels=1)
        torch.manual_seed(0)
        model = _calibrate_bn(create_model(arch, **kw), train_x)
        if linear:
            plant_linear(model, arch)  # the benchmark's planting: one definition
        # strictly fewer conv layers is claimed where whole blocks merge (MobileNetV2), not for ResNet-50
        sources.append((f"{name} ({'linear blocks' if linear else 'dense'})", linear and arch == "mobilenet_v2",
                        _module_source(arch, model, kw)))

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
        # the dead-channel blocks plant fewer dead channels than the default alignment (8) would drop:
        # they run unaligned, which is what they measure (the row records it)
        options = {"channel_multiple": 1} if label in narrowing else {}
        result = optimize(exported, calib, held, threads=args.threads, **options)
        ours = graph_metrics(result.model)
        entry["ours"] = _row(ours) | {"seconds": time.perf_counter() - t0, "options": options}
        ver = result.report.get("verification", {})
        entry["ours_verification"] = ver
        best_nodes = min(entry["onnxsim"]["nodes"], entry["onnxslim"]["nodes"])
        best_layers = min(entry["onnxsim"]["conv_gemm_layers"], entry["onnxslim"]["conv_gemm_layers"])
        entry["claims"] = {
            "nodes_never_more": ours["nodes"] <= best_nodes,
            "conv_layers_never_more": ours["conv_gemm_layers"] <= best_layers,
        }
        if label in narrowing:
            best_macs = min(entry["onnxsim"]["macs_dense"], entry["onnxslim"]["macs_dense"])
            entry["claims"]["strictly_fewer_macs_when_pruned"] = ours["macs_dense"] < best_macs
        else:
            entry["claims"]["strictly_fewer_conv_layers_when_pruned"] = \
                (ours["conv_gemm_layers"] < best_layers) if pruned else None
        if args.latency > 0:
            entry["latency"] = _latency({"exported": exported, "onnxslim": slim, "ours": result.model}, args.latency)
            ours_r, slim_r = (entry["latency"][k]["ratio_to_exported"]["median"] for k in ("ours", "onnxslim"))
            entry["claims"]["latency_no_worse_than_onnxslim"] = ours_r <= slim_r * 1.03
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
        lat = r.get("latency")
        slim_l, ours_l = ("" if not lat else f" ({lat[k]['ratio_to_exported']['median']:.3f}x)" for k in ("onnxslim", "ours"))
        table.add_row(r["model"], fmt(r["exported"]), fmt(r["onnxsim"]), fmt(r["onnxslim"]) + slim_l, fmt(r["ours"]) + ours_l,
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
        "latency": None if args.latency <= 0 else
        f"onnxruntime CPU, batch 1, 1 intra-op thread, interleaved, >= {args.latency:g} s per model; ratios to exported",
        "date": time.strftime("%Y-%m-%d"),
    }
    stem = "compare_simplifiers" if set(wanted) <= {"resnet18", "mobilenet_v2", "vgg16_bn", "vit_tiny", "egp"} \
        else "compare_simplifiers_" + "_".join(requested)  # do not overwrite the default table with a subset
    path = write_json_atomic(args.out / f"{stem}.json", result)
    print(f"wrote {path}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
