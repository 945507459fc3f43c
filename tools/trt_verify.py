#!/usr/bin/env python
"""For a machine WITH TensorRT and an NVIDIA GPU (desktop GPU or Jetson): build, compare, bench,
check in one go, for one or more ONNX models (e.g. exported vs surgered):

  1. egp-build each ONNX into an engine (+ sidecar + layer list), timing cache shared;
  2. compare each engine against onnxruntime CPU on the same random inputs (per-precision tolerance);
  3. time the engines interleaved (CUDA events, CUDA graphs), ratio of each to the first;
  4. gate the first engine against --budget-ms at --percentile (exit 1 when over).

    python tools/trt_verify.py models/resnet18_digits_egp.onnx models/resnet18_digits_egp.egp.onnx \
        --precision fp32 --budget-ms 2 --out docs/results/trt_verify.json

Exit: 0 all good, 1 over budget, 7 an engine disagrees with onnxruntime, 5 no TensorRT/GPU,
other egp-deploy exit codes for bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx", nargs="+", type=Path, help="ONNX models; the first is the reference of the ratios")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    ap.add_argument("--shapes", default=None, help="profile NAME:MIN/OPT/MAX (see egp-build); the bench uses OPT")
    ap.add_argument("--batch", type=int, default=None, help="batch for the bench/compare (default: profile OPT or 1)")
    ap.add_argument("--workspace", type=int, default=1024, help="builder workspace MiB")
    ap.add_argument("--timing-cache", type=Path, default=None, help="timing cache file (default: beside the first ONNX)")
    ap.add_argument("--tolerance", type=float, default=None, help="relative tolerance (default: per precision)")
    ap.add_argument("--budget-ms", type=float, default=None, help="latency budget for the first engine")
    ap.add_argument("--percentile", type=float, default=99.0)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--include-copies", action="store_true")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON summary (default docs/results/trt_verify.json; a failed run writes only where --out says)")
    args = ap.parse_args(argv)

    from egp_deploy.bench import BenchSettings, benchmark_models, percentile, print_table
    from egp_deploy.build import build_engine
    from egp_deploy.compare import compare_models
    from egp_deploy.errors import EgpError
    from egp_deploy.io_utils import write_json_atomic
    from egp_deploy.runners import parse_shapes

    summary: dict = {"tool": "tools/trt_verify.py", "models": []}
    try:
        shapes = parse_shapes(args.shapes)
        cache = args.timing_cache or args.onnx[0].with_name("trt_timing.cache")
        engines = []
        for onnx_path in args.onnx:
            built = build_engine(onnx_path, onnx_path.with_suffix(f".{args.precision}.engine"), precision=args.precision,
                                 workspace_mib=args.workspace, shapes=shapes, timing_cache=cache)
            cmp = compare_models(built.engine_path, onnx_path, backend="trt", precision=args.precision,
                                 tolerance=args.tolerance, batch=args.batch, shapes=shapes)
            print(f"{built.engine_path.name}: {len(built.layers)} engine layers; vs onnxruntime CPU: {cmp.message}")
            summary["models"].append({"onnx": str(onnx_path), "engine": str(built.engine_path),
                                      "engine_layers": len(built.layers), "sidecar": built.sidecar,
                                      "comparison": cmp.to_json()})
            engines.append(built.engine_path)
        settings = BenchSettings(min_duration_s=args.duration, batch=args.batch, shapes=shapes,
                                 include_copies=args.include_copies)
        report = benchmark_models(engines, "trt", settings, progress=True)
        print_table(report)
        summary["bench"] = report
        code = 0 if all(m["comparison"]["passed"] for m in summary["models"]) else 7
        if args.budget_ms is not None:
            measured = percentile(sorted(report["models"][0]["samples_ms"]), args.percentile)
            within = measured <= args.budget_ms
            summary["check"] = {"budget_ms": args.budget_ms, "percentile": args.percentile,
                                "measured_ms": measured, "within_budget": within}
            print(f"{'PASS' if within else 'FAIL'}: p{args.percentile:g} {measured:.4f} ms "
                  f"{'<=' if within else '>'} budget {args.budget_ms:g} ms ({engines[0].name})")
            if not within and code == 0:
                code = 1
    except EgpError as e:
        print(f"error: {e}", file=sys.stderr)
        summary["error"] = str(e)
        if args.out:
            write_json_atomic(args.out, summary)
        return e.exit_code
    out = write_json_atomic(args.out or ROOT / "docs" / "results" / "trt_verify.json", summary)
    print(f"wrote {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
