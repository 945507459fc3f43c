"""Smooth activations measured with EGP's ON proxy (never stripped unless linearised on request, with
the error reported); data-dependent strips: their held-out error shown, bounded by an option, and a
warning below ~100 calibration samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from egp_deploy.surgery import SurgeryOptions, optimize
from egp_deploy.surgery.activation_stats import measure_activation_stats
from egp_deploy.surgery.pipeline import name_nodes
from test_surgery_helpers import export_module, ops, outputs, randn, rel_error
from test_surgery_transformer import TokenMLP, _export, _swin


@pytest.mark.parametrize("act,op,kind", [
    (nn.GELU(), "Erf", "Gelu"), (nn.GELU(approximate="tanh"), "Tanh", "Gelu"), (nn.SiLU(), "Sigmoid", "SiLU"),
    (nn.Hardswish(), "HardSwish", "HardSwish"), (nn.Sigmoid(), "Sigmoid", "Sigmoid"), (nn.Tanh(), "Tanh", "Tanh"),
    (nn.Mish(), "Softplus", "Mish"), (nn.Hardsigmoid(), "HardSigmoid", "HardSigmoid"),
], ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_smooth_activation_stats_use_the_on_proxy(act, op, kind):
    torch.manual_seed(0)
    net = TokenMLP(act=act).eval()
    with torch.no_grad():
        net.fc1.bias[:4] = 50.0  # units 0..3: pre-activation always > 0 (ON)
        net.fc1.bias[4:8] = -50.0  # units 4..7: always OFF
    model = name_nodes(export_module(net, (2, 5, 8)))
    x = randn(16, 5, 8)
    stats, _ = measure_activation_stats(model, x)
    (st,) = stats.values()
    assert (st.op, st.kind, st.smooth, st.channel_axis, st.channels) == (op, kind, True, 2, 32)
    with torch.no_grad():  # ON = the hooked pre-activation (fc1's output) > 0, per hidden unit
        pre = net.fc1(net.norm(torch.from_numpy(x))).reshape(-1, 32).numpy()
    np.testing.assert_array_equal(st.counts["lin"], (pre > 0).sum(axis=0))
    states = st.channel_states()
    assert list(states[:4]) == ["lin"] * 4 and list(states[4:8]) == ["off"] * 4
    assert 0 < st.layer_entropy <= 1
    # reported, never stripped by default, and the rewrite stays exact
    res = optimize(model, x, randn(8, 5, 8, seed=1), SurgeryOptions(batch_size=8))
    (site,) = res.report["activations"]
    assert site["smooth"] and site["kind"] == kind and site["entropy"] == pytest.approx(st.layer_entropy)
    assert res.report["summary"]["smooth_activations_measured"] == 1
    assert op in ops(res.model) and not res.report["changes"]["stripped"]
    assert res.report["verification"]["calibration"]["rel_error"] <= 1e-5


@pytest.mark.slow
def test_swin_gelu_neurons_are_the_last_axis_with_both_exporters():
    net = _swin()
    x = randn(4, 3, 32, 32)
    per_exporter = []
    for dynamo in (False, True):
        stats, _ = measure_activation_stats(name_nodes(_export(net, dynamo)), x)
        per_exporter.append([(s.kind, s.channel_axis, s.channels, round(s.layer_entropy, 6)) for s in stats.values()])
    assert per_exporter[0] == per_exporter[1]
    assert [c for _, _, c, _ in per_exporter[0]] == [64, 64, 128, 128]  # hidden units, not token rows
    assert all(k == "Gelu" and a == 3 for k, a, _, _ in per_exporter[0])


@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Hardswish(), nn.Mish()],
                         ids=["gelu", "gelu_tanh", "silu", "hardswish", "mish"])
def test_linearize_smooth_is_opt_in_and_reports_its_error(act):
    torch.manual_seed(0)
    net = TokenMLP(dim=8, hidden=16, act=act).eval()
    with torch.no_grad():  # every unit firmly ON or OFF: the activation is nearly x or 0 per unit
        net.fc1.weight.mul_(0.05)
        net.fc1.bias.copy_(torch.where(torch.arange(16) % 2 == 0, 2.9, -2.9))
    model = export_module(net, (2, 5, 8))
    cal, held = randn(32, 5, 8), randn(16, 5, 8, seed=1)
    exact = optimize(model, cal, held, SurgeryOptions(batch_size=8))
    assert not exact.report["changes"].get("linearized")
    res = optimize(model, cal, held, SurgeryOptions(batch_size=8, linearize_smooth=True))
    (rec,) = res.report["changes"]["linearized"]
    assert (rec["on"], rec["off"], rec["exact"]) == (8, 8, False)
    lin = res.report["verification"]["linearized_smooth"]
    err = rel_error(outputs(model, cal), outputs(res.model, cal))
    assert lin["sites"] == 1 and lin["calibration_rel_error"] == pytest.approx(err, rel=1e-3, abs=1e-9)
    assert 0 < err <= SurgeryOptions().inexact_tolerance  # never exact, but small here
    v = res.report["verification"]
    assert v["inexact_rewrites"] and not v["inexact_merges"]
    assert v["tolerance"] == SurgeryOptions().inexact_tolerance  # judged against the inexact tolerance
    assert not {"Erf", "Tanh", "Sigmoid", "HardSwish", "Softplus"} & set(ops(res.model))
    assert res.report["after"]["nodes"] <= exact.report["after"]["nodes"]


def _offset_mlp() -> torch.nn.Module:
    """Linear -> ReLU -> Linear; on the calibration data unit 0 is always OFF, on held-out it is not."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        net[0].weight[0] = 0.0
        net[0].weight[0, 0] = 1.0  # unit 0 = x0 - 0.5
        net[0].bias[0] = -0.5
        net[2].weight[:, 0] = 3.0
    return net


def _offset_data():
    cal, held = randn(128, 6), randn(64, 6, seed=1)
    cal[:, 0] = -np.abs(cal[:, 0])  # unit 0 never ON on calibration
    return cal, held


def test_data_dependent_error_is_shown_and_bounded():
    model = export_module(_offset_mlp(), (2, 6), dynamic=True)
    cal, held = _offset_data()
    opts = dict(batch_size=32, min_held_out_agreement=0.0, channel_multiple=1)
    res = optimize(model, cal, held, SurgeryOptions(max_data_dependent_error=None, **opts))  # no bound
    s = res.report["summary"]
    assert res.report["changes"]["stripped"]
    dd = s["data_dependent_held_out_error"]
    assert dd == res.report["verification"]["held_out"]["rel_error"] and dd > 1e-3
    # the bound (by default 1e-4) reverts the strip and says so; the result is then exact on held-out too
    for bounded in (optimize(model, cal, held, SurgeryOptions(max_data_dependent_error=1e-4, **opts)),
                    optimize(model, cal, held, SurgeryOptions(**opts))):
        assert not bounded.report["changes"]["stripped"] and bounded.report["changes"]["reverted_strips"]
        assert "> bound 0.0001" in bounded.report["changes"]["reverted_strips"][0]["why"]
        assert "reverted" in bounded.report["verification"]["note"]
        assert bounded.report["summary"]["data_dependent_held_out_error"] is None
        assert bounded.report["verification"]["held_out"]["rel_error"] <= 1e-5
    # a bound above the error keeps them
    loose = optimize(model, cal, held, SurgeryOptions(max_data_dependent_error=1.0, **opts))
    assert loose.report["changes"]["stripped"]
    # without held-out data there is nothing to bound it with: the note says so
    assert "no held-out data" in optimize(model, cal, None, SurgeryOptions(**opts)).report["verification"]["note"]


def test_few_calibration_samples_warn():
    model = export_module(_offset_mlp(), (2, 6), dynamic=True)
    cal, held = _offset_data()
    few = optimize(model, cal[:32], held, SurgeryOptions(batch_size=32))
    assert len(few.report["warnings"]) == 1 and "only 32 calibration samples" in few.report["warnings"][0]
    assert optimize(model, cal, held, SurgeryOptions(batch_size=32)).report["warnings"] == []
    # no strips, nothing data-dependent to warn about; smooth activations alone are never stripped
    assert optimize(model, cal[:32], held, SurgeryOptions(strip_activations=False)).report["warnings"] == []
    gelu_only = export_module(TokenMLP().eval(), (2, 5, 8))
    assert optimize(gelu_only, randn(8, 5, 8), None, SurgeryOptions()).report["warnings"] == []


def test_cli_shows_and_bounds_the_data_dependent_error(tmp_path, monkeypatch, capsys):
    import json

    import onnx

    from test_surgery_cli import run_cli

    path = tmp_path / "mlp.onnx"
    onnx.save(export_module(_offset_mlp(), (2, 6), dynamic=True), path)
    cal, held = _offset_data()
    np.save(tmp_path / "cal.npy", cal[:40])
    np.save(tmp_path / "held.npy", held)
    common = [path, tmp_path / "out.onnx", "-c", tmp_path / "cal.npy", "--held-out", tmp_path / "held.npy",
              "--min-agreement", 0, "--channel-multiple", 1, "--report", tmp_path / "r.json"]
    code, text = run_cli(monkeypatch, capsys, *common, "--max-data-dependent-error", 1)
    assert code == 0, text
    assert "held-out rel. error (data-dependent)" in text
    assert "warning" in text and "only 40 calibration samples" in " ".join(text.split())
    for bound in ([], ["--max-data-dependent-error", 1e-4]):  # the default bound is 1e-4
        code, text = run_cli(monkeypatch, capsys, *common, *bound)
        assert code == 0, text
        report = json.loads((tmp_path / "r.json").read_text())
        assert report["summary"]["max_data_dependent_error"] == 1e-4
        assert not report["changes"]["stripped"] and "reverted" in report["verification"]["note"]
        assert "data-dependent strips reverted" in text and "> bound 0.0001" in " ".join(text.split())


def test_cli_linearize_smooth_flag(tmp_path, monkeypatch, capsys):
    import json

    import onnx

    from test_surgery_cli import run_cli

    torch.manual_seed(0)
    net = TokenMLP(dim=8, hidden=16).eval()
    with torch.no_grad():
        net.fc1.weight.mul_(0.05)
        net.fc1.bias.copy_(torch.where(torch.arange(16) % 2 == 0, 2.9, -2.9))
    path = tmp_path / "mlp.onnx"
    onnx.save(export_module(net, (2, 5, 8)), path)
    np.save(tmp_path / "cal.npy", randn(160, 5, 8))
    args = [path, tmp_path / "out.onnx", "-c", tmp_path / "cal.npy", "--report", tmp_path / "r.json"]
    code, text = run_cli(monkeypatch, capsys, *args)
    assert code == 0, text
    assert "smooth activations" in text and "(Gelu)" in text
    assert not json.loads((tmp_path / "r.json").read_text())["changes"].get("linearized")
    code, text = run_cli(monkeypatch, capsys, *args, "--linearize-smooth")
    assert code == 0, text
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["changes"]["linearized"]) == 1 and "linearized (inexact)" in " ".join(text.split())
