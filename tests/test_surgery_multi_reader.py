"""A linear layer read by two layers (a squeeze feeding two expands, a trunk feeding two heads) is
merged into each of them when every merge is exact and their MACs stay within --max-mac-growth."""

from __future__ import annotations

import logging

import pytest
import torch

from egp_deploy.surgery import SurgeryOptions, optimize
from surgery_blocks import PooledFire, SharedHeads, export
from test_surgery_helpers import export_module, outputs, randn, rel_error

TOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet_dynamo():
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def _layers(model, op="Conv") -> int:
    return sum(n.op_type == op for n in model.graph.node)


def _run(model, shape, growth):
    held = randn(32, *shape, seed=1)
    res = optimize(model, randn(128, *shape), held, SurgeryOptions(batch_size=64, max_mac_growth=growth))
    assert rel_error(outputs(model, held), outputs(res.model, held)) <= TOL
    return res


def test_shared_trunk_merges_into_both_heads_when_it_pays():
    torch.manual_seed(0)
    model = export_module(SharedHeads().eval(), (2, 8), dynamic=True)
    res = _run(model, (8,), 1.0)
    # 8x16 + 2 x 16x2 = 192 MACs before, 2 x 8x2 = 32 after: the trunk goes, each head reads x
    assert _layers(model, "Gemm") == 3 and _layers(res.model, "Gemm") == 2
    (rec,) = [r for r in res.report["changes"]["merged"] if r.get("shared")]
    assert rec["shared"] == 2 and (rec["macs_before"], rec["macs_after"]) == (192, 32)


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_fire_squeeze_merges_into_both_expands_within_the_mac_growth(dynamo):
    torch.manual_seed(0)
    model = export(PooledFire(), (1, 16, 8, 8), dynamo=dynamo)
    # per position: squeeze 16x4 + expand1 4x8 + expand3 4x8x9 = 384 MACs; merged 16x8 + 16x8x9 = 1280 (x3.3)
    kept = _run(model, (16, 8, 8), 1.0)
    assert _layers(kept.model) == 3 and not any(r.get("shared") for r in kept.report["changes"]["merged"])
    merged = _run(model, (16, 8, 8), 4.0)
    assert _layers(merged.model) == 2  # the squeeze is inside both expands (the 3x3 with a border bias)
    (rec,) = [r for r in merged.report["changes"]["merged"] if r.get("shared")]
    assert (rec["macs_before"], rec["macs_after"]) == (384 * 64, 1280 * 64) and rec["border_bias"]


def test_unpruned_fire_is_left_alone():
    torch.manual_seed(0)
    model = export(PooledFire(linear_squeeze=False), (1, 16, 8, 8), dynamo=False)
    res = _run(model, (16, 8, 8), 4.0)
    assert _layers(res.model) == 3 and not res.report["changes"]["merged"]
