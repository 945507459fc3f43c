"""Smoke test of tools/reproduce.py: --quick on one tiny architecture, one iteration, both methods.

Checks the JSON carries, for EGP and IMP alike, every per-iteration field the results document
is built from, that the figures are consistent with each other, and that the PNG and markdown
were written. Accuracy and timing are not asserted (a one-epoch model on a shared CPU).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ITERATION_FIELDS = (
    "iteration", "nominal_sparsity", "sparsity", "sparsity_all", "test_acc", "val_acc", "activation_sites",
    "zero_entropy_layers", "zero_entropy_sites", "all_zero_layers", "conv_gemm_before", "conv_gemm_after",
    "activations_before", "activations_after", "activations_removed", "layers_removed", "layers_removed_names",
    "longest_path_before", "longest_path_after", "macs_dense_before", "macs_dense_after", "latency_ratio",
    "latency_ratio_unsurgered", "surgery_error",
)


def _load_tool():
    spec = importlib.util.spec_from_file_location("reproduce_tool", ROOT / "tools" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    tool = _load_tool()
    code = tool.main(["--quick", "--archs", "vgg16_bn", "--iterations", "1", "--out", str(out)])
    assert code == 0
    return out, json.loads((out / "reproduce.json").read_text())


def test_json_has_every_iteration_field_for_both_methods(quick_run):
    _, data = quick_run
    assert list(data["archs"]) == ["vgg16_bn"]
    res = data["archs"]["vgg16_bn"]
    assert set(res["methods"]) == {"egp", "imp"}
    for method, rows in res["methods"].items():
        assert [r["iteration"] for r in rows] == [0, 1], method
        for r in rows:
            missing = [k for k in ITERATION_FIELDS if k not in r]
            assert not missing, f"{method} iteration {r['iteration']} lacks {missing}"
            assert r["surgery_error"] is None
            assert r["activation_sites"] == 15  # VGG-16-BN: 13 convs + 2 hidden linears
            assert 0 <= r["zero_entropy_layers"] <= r["activation_sites"]
            assert r["zero_entropy_layers"] == len(r["zero_entropy_sites"])
            assert r["conv_gemm_before"] == 16
            assert r["conv_gemm_after"] <= r["conv_gemm_before"]
            assert r["activations_removed"] == r["activations_before"] - r["activations_after"]
            assert r["layers_removed"] == len(r["layers_removed_names"])
            assert r["longest_path_after"] <= r["longest_path_before"]
            assert 0 < r["macs_dense_after"] <= r["macs_dense_before"]
            ratio = r["latency_ratio"]
            assert ratio["pairs"] >= 10 and 0 < ratio["min"] <= ratio["median"] <= ratio["max"]
        # iteration 0 is the shared dense checkpoint; iteration 1 is pruned at rate 0.5
        assert rows[0]["sparsity"] == 0.0
        assert rows[1]["nominal_sparsity"] == pytest.approx(0.5)
        assert 0.3 < rows[1]["sparsity"] < 0.7
    egp0, imp0 = res["methods"]["egp"][0], res["methods"]["imp"][0]
    assert egp0["test_acc"] == imp0["test_acc"] and egp0["macs_dense_after"] == imp0["macs_dense_after"]


def test_comparison_verdict_and_artifacts(quick_run):
    out, data = quick_run
    comp = data["archs"]["vgg16_bn"]["comparison"]
    rows = data["archs"]["vgg16_bn"]["methods"]
    diff = rows["egp"][1]["zero_entropy_layers"] - rows["imp"][1]["zero_entropy_layers"]
    assert comp["zero_entropy_diff"] == [diff]
    # the one verdict (egp_deploy.prune.verdict): counted only where both stay within the tolerance
    dense = rows["egp"][0]["test_acc"]
    comparable = all(dense - rows[m][1]["test_acc"] <= comp["tolerance_points"] + 1e-9 for m in ("egp", "imp"))
    assert comp["at_accuracy"]["iterations"] == ([1] if comparable else [])
    assert comp["egp_more"] == (comparable and diff > 0)
    assert comp["egp_more_all_iterations"] == (diff > 0)
    assert data["verdict"]["egp_more"] == int(comp["egp_more"])
    assert data["environment"]["versions"]["onnxruntime"]
    assert (out / "reproduce.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "reproduce.md").read_text()
    assert "python tools/reproduce.py --quick --archs vgg16_bn" in md
    assert "### vgg16_bn" in md
