"""Surgery figures on the shipped EGP references and the zoo models the surgery tests use: conv/gemm
layers, nodes, MACs (dense, nonzero) before -> after, verification rel. errors and a hash of the
written bytes. Run it on two commits and compare the JSON to show that a refactoring changed nothing.

    .venv/bin/python tools/surgery_figures.py out.json      # about 1.5 min on 2 cores

The model builders are the surgery tests' own (tests/test_surgery_helpers.py, test_surgery_models.py).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from egp_deploy.archs import create_model  # noqa: E402
from egp_deploy.checkpoint import load_checkpoint  # noqa: E402
from egp_deploy.data import calibration_batch, load_data  # noqa: E402
from egp_deploy.surgery import SurgeryOptions, optimize  # noqa: E402
from test_surgery_helpers import export_module, randomize_bn  # noqa: E402
from test_surgery_models import pruned_resnet18  # noqa: E402


def row(name: str, model, cal: np.ndarray, held: np.ndarray | None) -> dict:
    res = optimize(model, cal, held, SurgeryOptions())
    r, v = res.report, res.report["verification"]
    return {"model": name, "layers": (r["before"]["conv_gemm_layers"], r["after"]["conv_gemm_layers"]),
            "nodes": (r["before"]["nodes"], r["after"]["nodes"]),
            "macs": (r["before"]["macs_dense"], r["after"]["macs_dense"],
                     r["before"]["macs_nonzero"], r["after"]["macs_nonzero"]),
            "cal_rel": v["calibration"]["rel_error"],
            "held_rel": None if v["held_out"] is None else v["held_out"]["rel_error"],
            "summary": r["summary"], "sha": hashlib.sha256(res.model.SerializeToString()).hexdigest()[:12]}


def main(path: str) -> None:
    out = []
    bundle = load_data("digits")
    cal, held = calibration_batch(bundle, 270, "val").numpy(), calibration_batch(bundle, 270, "test").numpy()
    for f in ("resnet18_digits_egp.pt", "resnet18_w32_digits_egp.pt"):
        m = load_checkpoint(ROOT / "models" / f).build_model().eval()
        out.append(row(f, export_module(m, (1,) + cal.shape[1:]), cal, held))
    out.append(row("resnet18 stand-in", export_module(pruned_resnet18(), (1,) + cal.shape[1:]), cal, held))
    x = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    torch.manual_seed(0)
    m = randomize_bn(create_model("mobilenet_v2", width_mult=0.25, num_classes=10), 0).eval()
    out.append(row("mobilenet_v2 w0.25", export_module(m, (1, 3, 32, 32)), x, None))
    torch.manual_seed(0)
    m = randomize_bn(create_model("resnet50", width=4, stem="cifar", num_classes=10), 0).eval()
    out.append(row("resnet50 w4", export_module(m, (1, 3, 32, 32)), x, None))
    torch.manual_seed(0)
    m = create_model("swin_t", width=16, depths=(2, 2), heads=(2, 4), window_size=4).eval()
    with torch.no_grad():
        m.features[1][0].mlp[0].weight.zero_()
        m.features[3][1].mlp[0].weight.zero_()
    out.append(row("swin_t w16 2 MLPs collapsed", export_module(m, (1, 3, 32, 32)), x[:8], None))
    torch.manual_seed(0)
    m = create_model("vit_tiny", width=16, layers=2, heads=2).eval()
    with torch.no_grad():
        m.encoder.layers.encoder_layer_1.mlp[0].weight.zero_()
    out.append(row("vit_tiny w16 1 MLP collapsed", export_module(m, (1, 3, 32, 32)), x[:8], None))
    Path(path).write_text(json.dumps(out, indent=1, default=str))
    for o in out:
        print(o["model"], o["layers"], o["nodes"], o["macs"], f'{o["cal_rel"]:.3g}', o["held_rel"], o["sha"])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "surgery_figures.json")
