"""The pipeline as a loop over registered passes: selection by name, per-pass time, stable names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from egp_deploy.errors import UsageError
from egp_deploy.surgery import SurgeryOptions, optimize, pass_names
from egp_deploy.surgery.passes import REGISTRY
from test_surgery_helpers import export_module, ops, randn


class _Scale(nn.Module):
    """A per-channel Mul by a constant (the exporter folds BatchNormalization itself; this it keeps)."""

    def __init__(self, c: int):
        super().__init__()
        self.register_buffer("s", torch.linspace(0.5, 2.0, c).reshape(1, c, 1, 1))

    def forward(self, x):
        return x * self.s


def _net() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), _Scale(8), nn.ReLU(), nn.Conv2d(8, 8, 1),
                      nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 3))
    return m.eval()


@pytest.fixture(scope="module")
def model():
    return export_module(_net(), (1, 2, 6, 6), dynamic=True)


def test_unknown_pass_name_is_refused_before_any_work(model):
    with pytest.raises(UsageError) as e:
        optimize(model, np.full((2, 5, 5), np.nan, np.float32), None, SurgeryOptions(skip=["fold_afine"]))
    msg = str(e.value)
    assert "fold_afine" in msg and "\n" not in msg
    assert all(name in msg for name in pass_names())  # the valid names are listed
    with pytest.raises(UsageError, match="only"):
        optimize(model, randn(4, 2, 6, 6), None, SurgeryOptions(only=["merge_linear", "nope"]))


def test_skip_leaves_the_pass_undone_and_the_result_exact(model):
    x = randn(8, 2, 6, 6)
    full = optimize(model, x, None)
    assert "Mul" not in ops(full.model)
    kept = optimize(model, x, None, SurgeryOptions(skip=["fold_affine", "merge_linear"]))
    assert "Mul" in ops(kept.model)
    assert not any(r["pass"] == "affine_folded" for r in kept.report["changes"]["canonicalized"])
    assert not kept.report["changes"]["merged"]
    assert kept.report["verification"]["calibration"]["rel_error"] <= 1e-5
    assert set(kept.report["timing_s"]["passes_s"]) <= set(pass_names()) - {"fold_affine", "merge_linear"}


def test_skip_as_a_comma_separated_string(model):
    """What egp-export --surgery-option skip=a,b passes through."""
    res = optimize(model, randn(4, 2, 6, 6), None, SurgeryOptions(skip="fold_affine,merge_linear"))
    assert res.report["options"]["skip"] == ["fold_affine", "merge_linear"]
    assert "Mul" in ops(res.model)


def test_only_runs_just_the_named_passes(model):
    res = optimize(model, randn(4, 2, 6, 6), None, SurgeryOptions(only=["fold_affine"]))
    assert set(res.report["timing_s"]["passes_s"]) == {"fold_affine"}
    assert "Mul" not in ops(res.model) and "Relu" in ops(res.model)
    assert not res.report["changes"]["dead_channels"] and not res.report["changes"]["stripped"]


def test_report_times_every_pass_that_ran(model):
    res = optimize(model, randn(4, 2, 6, 6), None)
    times = res.report["timing_s"]["passes_s"]
    assert {"fold_affine", "dead_channels", "merge_linear", "strip_activations"} <= set(times)
    assert all(t >= 0.0 for t in times.values())
    assert "canonicalized" in res.report["passes"]  # the report's sections are filled as before


def test_every_registered_pass_declares_stages_and_a_summary():
    for p in REGISTRY.values():
        assert p.stages and p.doc, p.name


def test_two_surgeries_in_one_process_write_identical_bytes():
    """Names the passes create are numbered per surgery, not per process."""
    model = export_module(_net(), (1, 2, 6, 6), dynamic=True)
    x = randn(8, 2, 6, 6)
    first = optimize(model, x, None).model.SerializeToString()
    optimize(export_module(_net(), (1, 2, 6, 6)), x, None)  # another surgery in between
    assert optimize(model, x, None).model.SerializeToString() == first


def test_egp_export_set_reaches_skip_and_only(model):
    """``egp-export --set skip=a,b`` / ``--set only=none``: the string is split by the pipeline, and an
    unknown name is refused with the valid ones, before any work (the --skip/--only flags: test_surgery_cli)."""
    from egp_deploy.api import parse_surgery_settings, surgery_options

    def _surgery_options(_cls, settings):
        return surgery_options(parse_surgery_settings(settings))

    opts = _surgery_options(SurgeryOptions, ["skip=fold_affine,merge_linear", "only=none"])
    assert opts.only is None
    assert optimize(model, randn(4, 2, 6, 6), None, opts).report["options"]["skip"] == ["fold_affine", "merge_linear"]
    with pytest.raises(UsageError, match="valid: "):
        _surgery_options(SurgeryOptions, ["skip=merge"])
