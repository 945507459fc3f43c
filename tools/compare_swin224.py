#!/usr/bin/env python
"""Swin-T at torchvision's size (3x224x224, window 7, 1000 classes): nodes and MatMul/Gemm layers after
onnxslim and after our surgery, dense and with fc1 all zero in 4 of the 12 blocks (issue 12's setting).

Random weights and random normal inputs (nothing downloads): only the exact rewrites are exercised,
which is what the node/layer counts measure. Legacy exporter, opset 17, static batch 1.

    python tools/compare_swin224.py [--samples 4] [--threads 2] [--out docs/results]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLLAPSED = ((1, 0), (3, 1), (5, 1), (5, 4))  # (stage, block) whose MLP fc1 is zeroed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=4, help="calibration and held-out samples each")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    import numpy as np
    import onnx
    import onnxruntime
    import onnxslim
    import torch

    from egp_deploy.archs import create_model
    from egp_deploy.io_utils import write_json_atomic
    from egp_deploy.surgery import SurgeryOptions, optimize

    def counts(m: onnx.ModelProto) -> dict:
        return {"nodes": len(m.graph.node), "matmul_gemm": sum(n.op_type in ("MatMul", "Gemm") for n in m.graph.node)}

    x = np.random.default_rng(0).standard_normal((2 * args.samples, 3, 224, 224)).astype(np.float32)
    rows = []
    for label, blocks in (("dense", ()), ("fc1 zero in 4 blocks", COLLAPSED)):
        torch.manual_seed(0)
        net = create_model("swin_t", num_classes=1000).eval()
        with torch.no_grad():
            for stage, block in blocks:
                net.features[stage][block].mlp[0].weight.zero_()
        buf = io.BytesIO()
        torch.onnx.export(net, torch.randn(1, 3, 224, 224), buf, dynamo=False, opset_version=17)
        exported = onnx.load_from_string(buf.getvalue())
        t0 = time.perf_counter()
        slim = onnxslim.slim(exported)
        slim_s = time.perf_counter() - t0
        res = optimize(exported, x[:args.samples], x[args.samples:],
                       SurgeryOptions(threads=args.threads, batch_size=args.samples))
        v = res.report["verification"]
        rows.append({"model": label, "exported": counts(exported), "onnxslim": counts(slim) | {"seconds": slim_s},
                     "ours": counts(res.model) | {"seconds": res.report["timing_s"]["total_s"]},
                     "rel_error": {"calibration": v["calibration"]["rel_error"], "held_out": v["held_out"]["rel_error"]}})
        r = rows[-1]
        print(f"{label:<22} exported {r['exported']['nodes']:>5} / {r['exported']['matmul_gemm']:>3}   onnxslim "
              f"{r['onnxslim']['nodes']:>4} / {r['onnxslim']['matmul_gemm']:>3}   ours {r['ours']['nodes']:>4} / "
              f"{r['ours']['matmul_gemm']:>3}   (nodes / MatMul+Gemm; rel. error {v['calibration']['rel_error']:.1e})")
    result = {"tool": "tools/compare_swin224.py", "rows": rows, "date": time.strftime("%Y-%m-%d"),
              "environment": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                              "onnxslim": getattr(onnxslim, "__version__", "?"), "threads": args.threads},
              "inputs": f"random normal 3x224x224, {args.samples} calibration + {args.samples} held-out"}
    path = write_json_atomic(args.out / "compare_swin224.json", result)
    print(f"wrote {path}")
    return 0 if all(r["ours"]["nodes"] <= r["onnxslim"]["nodes"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
