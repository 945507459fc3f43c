"""Data-dependent strips under a default bound on their held-out error: a strip on chance structure
(units OFF on every calibration sample of an untrained net) is reverted per site, with the reason in
the report; a strip on real structure (a unit dead for any input) is kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from egp_deploy.surgery import SurgeryOptions, optimize
from egp_deploy.surgery.activation_stats import measure_activation_stats
from egp_deploy.surgery.pipeline import DATA_DEPENDENT_ERROR_BOUND, name_nodes
from egp_deploy.surgery.strip_activations import strip_error
from test_surgery_helpers import export_module, randn


class SqueezeExcite(nn.Module):
    """stem conv -> ReLU -> x * sigmoid(expand(relu(squeeze(mean(x))))) -> mean -> linear -> ReLU ->
    linear; randomly initialised, so the squeeze's ReLU sees a pooled, low-variance input: many of its
    units are OFF on every calibration sample by chance."""

    def __init__(self, c: int = 32, r: int = 4) -> None:
        super().__init__()
        self.stem, self.act = nn.Conv2d(3, c, 3, padding=1), nn.ReLU()
        self.squeeze, self.relu, self.expand = nn.Conv2d(c, c * r, 1), nn.ReLU(), nn.Conv2d(c * r, c, 1)
        self.fc, self.fc_act, self.head = nn.Linear(c, 16), nn.ReLU(), nn.Linear(16, 10)

    def forward(self, x):
        x = self.act(self.stem(x))
        w = torch.sigmoid(self.expand(self.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        return self.head(self.fc_act(self.fc((x * w).mean((2, 3)))))


def _se_model(dead: int = 0):
    torch.manual_seed(0)
    net = SqueezeExcite().eval()
    with torch.no_grad():  # fc units OFF for any input (non-positive weights on a non-negative input, negative
        # bias): real structure that only the data shows, exact anywhere
        net.fc.weight[:dead] = -net.fc.weight[:dead].abs()
        net.fc.bias[:dead] = -0.1
    return export_module(net, (2, 3, 8, 8), dynamic=True)


def test_chance_structure_is_reverted_by_default_and_real_structure_kept():
    model = _se_model(dead=8)
    cal, held = randn(128, 3, 8, 8), randn(128, 3, 8, 8, seed=1)
    opts = dict(batch_size=64, channel_multiple=1)
    # without a bound, the squeeze's chance-OFF units go and the result is off on held-out data
    unbounded = optimize(model, cal, held, SurgeryOptions(max_data_dependent_error=None, **opts))
    assert {r["module"] for r in unbounded.report["changes"]["stripped"]} == {"fc_act", "relu"}
    assert unbounded.report["verification"]["held_out"]["rel_error"] > 1e-6
    # the default bound reverts that site, and only that one, and says why
    res = optimize(model, cal, held, SurgeryOptions(**opts))
    assert res.report["options"]["max_data_dependent_error"] == DATA_DEPENDENT_ERROR_BOUND
    assert [r["module"] for r in res.report["changes"]["stripped"]] == ["fc_act"]
    (rev,) = res.report["changes"]["reverted_strips"]
    assert rev["module"] == "relu" and rev["held_out_error"] > DATA_DEPENDENT_ERROR_BOUND
    assert 0 < rev["channels_left_region"] <= rev["channels_stripped"]
    assert f"> bound {DATA_DEPENDENT_ERROR_BOUND:g}" in rev["why"]
    assert res.report["summary"]["strips_reverted"] == 1 and "1 data-dependent strip reverted" in \
        res.report["verification"]["note"]
    # the dead fc units are exact on any data: the result is exact on held-out data too
    assert res.report["summary"]["channels_removed"] >= 8
    assert res.report["verification"]["held_out"]["rel_error"] <= 1e-5


def test_strip_error_is_zero_on_data_where_the_strip_holds_and_measures_the_deviation():
    model = name_nodes(_se_model())
    cal, held = randn(64, 3, 8, 8), randn(64, 3, 8, 8, seed=1)
    stats, _ = measure_activation_stats(model, cal)
    again = strip_error(stats["/relu/Relu"], stats["/relu/Relu"])
    assert again["held_out_error"] == 0 and again["channels_left_region"] == 0  # exact where measured
    held_stats, _ = measure_activation_stats(model, held)
    err = strip_error(stats["/relu/Relu"], held_stats["/relu/Relu"])
    st, hs = stats["/relu/Relu"], held_stats["/relu/Relu"]
    off = st.channel_states() == "off"
    # the largest positive pre-activation a stripped (OFF) unit reached on held-out data, over the largest output
    expected = np.maximum(hs.seen_max[off], 0).max() / max(hs.seen_max.max(), 0)
    assert err["held_out_error"] == pytest.approx(expected, rel=1e-6) and expected > 0
    assert err["channels_left_region"] == int((off & (hs.channel_states() != "off")).sum()) > 0


class TwoSites(nn.Module):
    """Linear -> ReLU (a) -> Linear -> ReLU (b) -> Linear. Site a: unit 0 OFF on calibration only, and
    weighed heavily at the output, while unit 1 is huge and always ON (so a's own relative error is
    small); site b: units 0..3 OFF for any input, which only the data shows."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.a, self.fc2, self.b, self.fc3 = nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), \
            nn.Linear(16, 4)
        torch.manual_seed(0)
        nn.init.normal_(self.fc1.weight)
        with torch.no_grad():
            self.fc1.weight[0] = 0.0
            self.fc1.weight[0, 0] = 1.0  # unit 0 = x0 - 0.5
            self.fc1.bias[0] = -0.5
            self.fc1.weight[1] = 0.0
            self.fc1.bias[1] = 1e6  # always ON, dwarfs the rest of site a
            self.fc2.weight[:, 1] = 0.0
            self.fc2.weight[:, 0] = 30.0
            self.fc2.weight[:4] = -self.fc2.weight[:4].abs()  # OFF for any input (a's output is >= 0)
            self.fc2.bias[:4] = -0.1

    def forward(self, x):
        return self.fc3(self.b(self.fc2(self.a(self.fc1(x)))))


def test_result_over_the_bound_reverts_the_sites_off_on_held_out_and_keeps_exact_ones():
    model = export_module(TwoSites().eval(), (2, 6), dynamic=True)
    cal, held = randn(128, 6), randn(64, 6, seed=1)
    cal[:, 0] = -np.abs(cal[:, 0])  # unit 0 of site a never ON on calibration
    res = optimize(model, cal, held, SurgeryOptions(batch_size=32, channel_multiple=1, min_held_out_agreement=0.0))
    rep = res.report
    (rev,) = rep["changes"]["reverted_strips"]
    assert rev["module"] == "a" and 0 < rev["held_out_error"] <= DATA_DEPENDENT_ERROR_BOUND  # small at its site ...
    assert "outside the bounds" in rev["why"]  # ... but the result was off: reverted as the site that is off
    assert [r["module"] for r in rep["changes"]["stripped"]] == ["b"]
    assert rep["verification"]["held_out"]["rel_error"] <= 1e-5


def test_bound_none_keeps_the_old_policy_and_no_held_out_data_is_not_an_error():
    model = _se_model()
    cal = randn(128, 3, 8, 8)
    res = optimize(model, cal, None, SurgeryOptions(batch_size=64))  # nothing to bound it with: said so
    assert res.report["changes"]["stripped"] and "no held-out data" in res.report["verification"]["note"]
