#!/usr/bin/env python
"""Do the chain merges pay? MobileNetV2 and ResNet-50 with planted linear blocks, side by side.

1. MobileNetV2 (the zoo's, width 1.0, ImageNet layout, 224x224) whose stride-1 inverted residuals
   are fully linear on the data (both ReLU6 inputs BN-shifted into (0, 6)): the exported graph, the
   surgery without merges (``merge=False``) and the surgery with chain merges (``--cost macs``),
   timed interleaved; plus each merged block against the three convs it replaced, as tiny graphs.
2. ResNet-50 (torchvision layout, 224x224) whose stride-1 bottlenecks have linear relu1/relu2:
   surgery with ``--cost macs`` and with ``--cost latency`` side by side (the latency plan must
   never be slower), and every latency decision with its measured times.
3. Surgery wall time with ``--cost macs``: ResNet-18 (goal <= 10 s) and ResNet-50 (<= 30 s).

onnxruntime CPU, batch 1, one intra-op thread, models interleaved A B C A B C ...; ratios are
per-round (median, min, max). Writes docs/results/bench_chain_merge.json.

    python tools/bench_chain_merge.py [--duration 10] [--samples 64] [--out docs/results]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def plant_linear(model: torch.nn.Module, arch: str) -> list[str]:
    """Make the chosen blocks linear on any reasonable input: BN output about 3 +- small, so the
    ReLU/ReLU6 after it never clips. Returns the blocks' names."""
    planted = []
    with torch.no_grad():
        for name, mod in model.named_modules():
            if arch == "mobilenet_v2" and getattr(mod, "use_res_connect", False):
                units = [u[1] for u in mod.conv if isinstance(u, torch.nn.Sequential)]  # conv, BN, ReLU6
            elif arch == "resnet50" and hasattr(mod, "conv3") and mod.downsample is None:
                units = [mod.bn1, mod.bn2]
            else:
                continue
            for bn in units:
                bn.weight.fill_(0.01)
                bn.bias.fill_(3.0)
            planted.append(name)
    return planted


def export(model: torch.nn.Module, size: int):
    return export_any(model, 3, size)


def export_any(model: torch.nn.Module, channels: int, size: int):
    import onnx

    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), torch.randn(1, channels, size, size), f, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return onnx.load_from_string(f.getvalue())


def surgery(model, cal, held, **options):
    from egp_deploy.surgery import SurgeryOptions, optimize

    t0 = time.perf_counter()
    res = optimize(model, cal, held, SurgeryOptions(batch_size=16, **options))
    return res, time.perf_counter() - t0


def bench(models: dict, tmp: Path, duration: float) -> dict:
    import onnx

    from egp_deploy.bench import BenchSettings, benchmark_models

    paths = []
    for name, m in models.items():
        paths.append(tmp / f"{name}.onnx")
        onnx.save(m, paths[-1])
    rep = benchmark_models(paths, "ort-cpu", BenchSettings(warmup_ms=300, min_iterations=50,
                                                           min_duration_s=duration, batch=1, threads=1))
    out = {}
    for name, m in zip(models, rep["models"]):
        out[name] = {"median_ms": m["latency_ms"]["median"], "ratio_to_first": m["ratio_to_first"], "cv": m["cv"]}
    return {"models": out, "rounds": rep["rounds"], "environment": rep["environment"]}


def layers(model) -> int:
    return sum(n.op_type in ("Conv", "Gemm", "MatMul") for n in model.graph.node)


def summary(res, seconds: float) -> dict:
    r = res.report
    return {"conv_gemm_layers": r["after"]["conv_gemm_layers"], "macs": r["after"]["macs_dense"],
            "merges": r["summary"]["merges"], "rel_error_held_out": (r["verification"]["held_out"] or {}).get("rel_error"),
            "surgery_s": round(seconds, 2), "latency_measure_s": r["timing_s"].get("latency_measure_s")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of interleaved timing per comparison")
    ap.add_argument("--samples", type=int, default=64, help="calibration samples (held-out: half)")
    ap.add_argument("--size", type=int, default=224, help="input resolution")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument("--skip-surgery-time", action="store_true", help="skip part 3")
    args = ap.parse_args(argv)

    from egp_deploy.archs import create_model
    from egp_deploy.io_utils import write_json_atomic

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cal = rng.standard_normal((args.samples, 3, args.size, args.size)).astype(np.float32)
    held = rng.standard_normal((max(2, args.samples // 2), 3, args.size, args.size)).astype(np.float32)
    result: dict = {"tool": "tools/bench_chain_merge.py", "settings": vars(args) | {"out": str(args.out)}}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        table = tmp / "latency_table.json"

        # ---- 1. MobileNetV2
        mnv2 = create_model("mobilenet_v2", width_mult=1.0, cifar=False, num_classes=1000)
        blocks = plant_linear(mnv2, "mobilenet_v2")
        exported = export(mnv2, args.size)
        plain, t_plain = surgery(exported, cal, held, merge=False)
        merged, t_merged = surgery(exported, cal, held)
        timed, t_timed = surgery(exported, cal, held, cost="latency", latency_table=str(table), latency_rounds=100)
        print(f"MobileNetV2: {len(blocks)} linear blocks; conv/gemm layers exported {layers(exported)}, "
              f"no merges {layers(plain.model)}, chain merges {layers(merged.model)}; surgery {t_merged:.1f} s")
        # the surgery without merges first: every ratio is to it (the chain merges must pay)
        side = bench({"surgery_no_merges": plain.model, "surgery_chain_merges": merged.model, "exported": exported},
                     tmp, args.duration)
        per_block = {tuple(c["layers"]): c for c in timed.report["merge_planner"]["candidates"] if "ms_merged" in c}
        blocks_timed = []
        for rec in merged.report["changes"]["merged"]:
            c = per_block.get(tuple(rec["modules"]))
            if c is not None:
                blocks_timed.append({"layers": rec["modules"], "kind": rec["kind"], "macs_span": rec["macs_before"],
                                     "macs_merged": rec["macs_after"], "ms_merged": c["ms_merged"], "ms_span": c["ms_span"],
                                     "ratio": c["ms_merged"] / c["ms_span"] if c["ms_span"] else None})
        result["mobilenet_v2"] = {
            "linear_blocks": blocks, "layers_exported": layers(exported),
            "no_merges": summary(plain, t_plain), "chain_merges": summary(merged, t_merged),
            "latency_cost": summary(timed, t_timed), "macs_exported": merged.report["before"]["macs_dense"],
            "latency": side, "merged_blocks": blocks_timed}
        for name, m in side["models"].items():
            r = m["ratio_to_first"]
            print(f"  {name:<22} {m['median_ms']:8.3f} ms  x{r['median']:.3f} (min {r['min']:.3f}, max {r['max']:.3f})")
        for b in blocks_timed:
            print(f"  {b['layers'][0]} .. {b['layers'][-1]} ({b['kind']}): merged {b['ms_merged']:.4f} ms vs "
                  f"{len(b['layers'])} convs {b['ms_span']:.4f} ms (x{b['ratio']:.2f})")

        # ---- 2. ResNet-50: --cost macs against --cost latency
        r50 = create_model("resnet50", num_classes=1000)
        planted = plant_linear(r50, "resnet50")
        exported = export(r50, args.size)
        n = max(8, args.samples // 2)
        by_macs, t_macs = surgery(exported, cal[:n], held[:n // 2])
        by_lat, t_lat = surgery(exported, cal[:n], held[:n // 2], cost="latency", latency_table=str(table))
        side = bench({"cost_macs": by_macs.model, "cost_latency": by_lat.model, "exported": exported}, tmp, args.duration)
        decisions = [c for c in by_lat.report["merge_planner"]["candidates"] if "ms_merged" in c]
        r_lat, r_mac = side["models"]["cost_latency"]["median_ms"], side["models"]["cost_macs"]["median_ms"]
        result["resnet50"] = {"linear_blocks": planted, "layers_exported": layers(exported),
                              "cost_macs": summary(by_macs, t_macs), "cost_latency": summary(by_lat, t_lat),
                              "latency": side, "latency_decisions": decisions,
                              "latency_over_macs": r_lat / r_mac, "never_slower_within_2pct": r_lat <= 1.02 * r_mac}
        print(f"ResNet-50: {len(planted)} linear bottlenecks; layers exported {layers(exported)}, macs plan "
              f"{layers(by_macs.model)} ({t_macs:.1f} s), latency plan {layers(by_lat.model)} ({t_lat:.1f} s, "
              f"{by_lat.report['timing_s'].get('latency_measure_s', 0):.1f} s measuring)")
        for name, m in side["models"].items():
            r = m["ratio_to_first"]
            print(f"  {name:<22} {m['median_ms']:8.3f} ms  x{r['median']:.3f} (min {r['min']:.3f}, max {r['max']:.3f})")
        taken = [d for d in decisions if d["decision"] == "merged"]
        print(f"  latency decisions: {len(decisions)} candidates, {len(taken)} merged")
        for d in decisions[:12]:
            print(f"    {' + '.join(d['layers'])}: {d['ms_merged']:.4f} vs {d['ms_span']:.4f} ms -> {d['decision']}")

        # ---- 3. surgery time, --cost macs
        times = {"resnet50_224": {"total_s": round(t_macs, 2), "samples": [n, n // 2],
                                  **{k: round(v, 2) for k, v in by_macs.report["timing_s"].items()}}}
        if not args.skip_surgery_time:
            # ResNet-18 width 64 as docs/surgery.md times it (1x32x32 digits-sized, CIFAR stem), and at 224
            for label, kw, size, chans in (("resnet18_32", {"stem": "cifar", "in_channels": 1}, 32, 1),
                                           ("resnet18_224", {"stem": "imagenet"}, args.size, 3)):
                x = rng.standard_normal((args.samples + args.samples // 2, chans, size, size)).astype(np.float32)
                m18 = export_any(create_model("resnet18", num_classes=10, **kw), chans, size)
                res18, t18 = surgery(m18, x[:args.samples], x[args.samples:])
                times[label] = {"total_s": round(t18, 2), "samples": [args.samples, args.samples // 2],
                                **{k: round(v, 2) for k, v in res18.report["timing_s"].items()}}
        result["surgery_time_s"] = times | {"goals": {"resnet18": 10.0, "resnet50": 30.0}}
        for label, t in times.items():
            print(f"surgery time --cost macs, {label} ({t['samples'][0]} + {t['samples'][1]} samples): "
                  f"{t['total_s']:.1f} s (measure {t.get('measure_s', 0):.1f}, rewrite {t.get('rewrite_s', 0):.1f}, "
                  f"verify {t.get('verify_s', 0):.1f})")
    args.out.mkdir(parents=True, exist_ok=True)
    path = write_json_atomic(args.out / "bench_chain_merge.json", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
