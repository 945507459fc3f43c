"""--allow-inexact-merge: a merge above the inexact tolerance is dropped (the others kept, the report
says which and by how much), the surgery goes on and exits 0."""

from __future__ import annotations

import json

import numpy as np
import onnx
import torch
import torch.nn as nn

from egp_deploy.surgery import SurgeryOptions, optimize
from test_surgery_cli import run_cli
from test_surgery_helpers import export_module, ops, randn


def _two_inexact_chains() -> onnx.ModelProto:
    """conv3x3 -> conv3x3 -> ReLU -> conv3x3 -> conv3x3, all padded: two inexact merges. The first
    conv's large bias meets the zero padding (a merge far off at the border ring); the third conv is
    nearly 1x1 (off-centre taps 1e-3) with no bias, so its merge is off by ~1e-3 only."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1))
    with torch.no_grad():
        m[0].bias.fill_(2.0)
        centre = torch.zeros_like(m[3].weight)
        centre[:, :, 1, 1] = 1.0
        m[3].weight.mul_(centre + (1 - centre) * 1e-3)
        m[3].bias.zero_()
    return export_module(m.eval(), (1, 3, 8, 8), dynamic=True)


OPTS = dict(allow_inexact_merge=True, max_mac_growth=2.0, strip_activations=False)


def test_the_merge_above_the_tolerance_is_dropped_and_the_other_kept():
    model = _two_inexact_chains()
    x, held = randn(16, 3, 8, 8), randn(16, 3, 8, 8, seed=2)
    both = optimize(model, x, held, SurgeryOptions(inexact_tolerance=1.0, **OPTS))
    assert ops(both.model).count("Conv") == 2 and not both.report["changes"].get("dropped_merges")
    res = optimize(model, x, held, SurgeryOptions(inexact_tolerance=1e-2, **OPTS))
    (dropped,) = res.report["changes"]["dropped_merges"]
    assert dropped["modules"] == ["0", "1"] and dropped["calibration_rel_error"] > 1e-2
    assert dropped["held_out_rel_error"] > 1e-2 and "inexact tolerance 0.01" in dropped["why"]
    (kept,) = res.report["changes"]["merged"]
    assert kept["modules"] == ["3", "4"] and not kept["exact"]
    assert ops(res.model).count("Conv") == 3
    v = res.report["verification"]
    assert 0 < v["calibration"]["rel_error"] <= 1e-2 and v["held_out"]["rel_error"] <= 1e-2
    assert "1 inexact merge dropped" in v["note"]
    # below both errors: both dropped, and the result is exact
    exact = optimize(model, x, held, SurgeryOptions(inexact_tolerance=1e-6, **OPTS))
    assert len(exact.report["changes"]["dropped_merges"]) == 2 and ops(exact.model).count("Conv") == 4
    assert exact.report["verification"]["calibration"]["rel_error"] <= 1e-5


def test_cli_exits_0_with_a_dropped_merge(tmp_path, monkeypatch, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(_two_inexact_chains(), path)
    np.save(tmp_path / "x.npy", randn(32, 3, 8, 8))
    code, text = run_cli(monkeypatch, capsys, path, tmp_path / "o.onnx", "-c", tmp_path / "x.npy", "--no-strip",
                         "--allow-inexact-merge", "--max-mac-growth", 2, "--report", tmp_path / "r.json")
    assert code == 0, text
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["options"]["inexact_tolerance"] == 5e-2  # the default: the first merge is above it
    assert [d["modules"] for d in report["changes"]["dropped_merges"]] == [["0", "1"]]
    assert "inexact merge dropped" in " ".join(text.split())
    assert ops(onnx.load(tmp_path / "o.onnx")).count("Conv") == 3
