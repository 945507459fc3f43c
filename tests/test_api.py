"""The public API: the documented snippet end to end, the one calibration policy, fresh surgered metadata."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import numpy_helper

import egp_deploy as egp
from egp_deploy.calibration import load_calibration
from egp_deploy.checkpoint import checkpoint_from_model, save_checkpoint
from egp_deploy.errors import DataError, NonFiniteError, UsageError

from test_export import ARCH_KW, _pruned_model

ROOT = Path(__file__).resolve().parents[1]
DIGITS = (1, 32, 32)


def _snippet(doc: str = "docs/api.md") -> str:
    text = (ROOT / doc).read_text()
    match = re.search(r"<!-- snippet:from-python -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"{doc} lost its From Python snippet"
    return match.group(1)


def test_readme_shows_the_snippet_that_runs():
    # the README's "From Python" code is the one the test below executes, character for character
    assert _snippet("README.md") == _snippet("docs/api.md")


@pytest.mark.slow
def test_documented_snippet_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(_snippet(), "docs/api.md", "exec"), {"__name__": "snippet"})
    out = capsys.readouterr().out
    assert "best:" in out and "PASS" in out and "surgered / exported:" in out
    for name in ("dense.pt", "best.pt", "model.onnx", "model.egp.onnx", "model.egp.json", "model.egp.png"):
        assert (tmp_path / "runs" / "py" / name).is_file(), name


def test_import_is_light():
    code = ("import sys, egp_deploy; heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'matplotlib') "
            "if m in sys.modules]; print(heavy); assert callable(egp_deploy.deploy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_api_calls_survive_importing_the_stage_modules():
    # importing a submodule binds it onto the package: prune/export/bench must stay the API calls
    import inspect

    import egp_deploy.bench
    import egp_deploy.export
    import egp_deploy.prune.loop  # noqa: F401
    from egp_deploy import api

    for name in ("prune", "export", "bench", "optimize", "deploy", "check"):
        assert callable(getattr(egp, name)), name
    assert egp.export.export_model is egp_deploy.export.export_model  # still the module, too
    with pytest.raises(TypeError, match="source"):  # the call reaches api.prune (a missing argument), not "module not callable"
        egp.prune()
    assert "source" in inspect.signature(api.prune).parameters


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    save_checkpoint(d / "m.pt", checkpoint_from_model(_pruned_model(), "resnet18", ARCH_KW, DIGITS, 10, {"data": "digits"}))
    res = egp.export(d / "m.pt", d / "m.onnx")
    return d, res.model


def test_surgered_metadata_is_fresh(exported):
    d, model = exported
    data = load_calibration("digits", DIGITS, samples=32)
    result = egp.optimize(model, data.calibration, data.held_out, threads=1)
    out = result.model
    props = {p.key: p.value for p in out.metadata_props}
    names = {n.name for n in out.graph.node}

    assert (out.producer_name, out.producer_version) == ("egp-deploy", egp.__version__)
    assert props["egp.version"] == egp.__version__
    record = json.loads(props["egp.surgery"])
    assert record["version"] == egp.__version__ and record["input_producer"].startswith("pytorch")
    assert record["options"]["tolerance"] == result.report["options"]["tolerance"]
    assert record["removed"]["layers_removed"] == result.report["layers_removed"] and record["removed"]["layers_removed"]
    assert record["verification"]["held_out"]["rel_error"] == result.report["verification"]["held_out"]["rel_error"]
    assert record["metrics"]["conv_gemm_layers"] == [result.report["before"]["conv_gemm_layers"],
                                                    result.report["after"]["conv_gemm_layers"]]

    # no node -> module entry names a node that is gone; the surviving convs keep their modules
    node_modules = json.loads(props["egp.node_modules"])
    before_map = json.loads({p.key: p.value for p in model.metadata_props}["egp.node_modules"])
    assert set(node_modules) <= names
    assert len(set(before_map) - {n.name for n in out.graph.node}) > 0  # the surgery did remove mapped nodes
    assert any(v.startswith("layer1.") for v in node_modules.values())

    # weight counts are the surgered graph's own
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    weights = [inits[n.input[1]] for n in out.graph.node
               if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in inits and inits[n.input[1]].ndim >= 2]
    total, zeros = sum(w.size for w in weights), sum(int((w == 0).sum()) for w in weights)
    assert json.loads(props["egp.weight_counts"]) == {"weights": total, "zero_weights": zeros}
    assert json.loads(props["egp.sparsity"]) == pytest.approx(zeros / total)
    old = {p.key: p.value for p in model.metadata_props}
    assert props["egp.source_weight_counts"] == old["egp.weight_counts"]
    assert json.loads(old["egp.weight_counts"])["weights"] != total  # it really changed


def test_optimize_takes_a_path_and_a_data_spec(exported):
    d, _ = exported
    result = egp.optimize(d / "m.onnx", "digits", samples=16, threads=1)
    assert result.report["samples"] == {"calibration": 16, "held_out": 16}
    with pytest.raises(UsageError, match="unknown surgery option"):
        egp.optimize(d / "m.onnx", "random", no_such_option=1)


def test_calibration_policy(tmp_path):
    arr = np.random.default_rng(0).standard_normal((10, *DIGITS)).astype(np.float32)
    np.save(tmp_path / "a.npy", arr)
    s = load_calibration(str(tmp_path / "a.npy"), DIGITS, samples=256)
    np.testing.assert_array_equal(s.calibration, arr[:5])
    np.testing.assert_array_equal(s.held_out, arr[5:])  # first half calibrates, second half is held out
    s = load_calibration(str(tmp_path / "a.npy"), DIGITS, samples=256, held_out="random")
    assert len(s.calibration) == 10 and len(s.held_out) == 256 and "held-out: random" in s.description
    s = load_calibration("digits", DIGITS, samples=8, held_out_samples=4)
    assert s.calibration.shape == (8, *DIGITS) and s.held_out.shape == (4, *DIGITS)
    assert s.description == "digits: 8 val + 4 test samples" and not s.warnings
    s = load_calibration(None, DIGITS, samples=4)
    assert s.description == "random normal" and "random" in s.warnings[0]
    assert not np.array_equal(s.calibration, s.held_out[:4])
    with pytest.raises(DataError, match="sample shape"):
        load_calibration(str(tmp_path / "a.npy"), (3, 32, 32))
    with pytest.raises(DataError, match="static input shape"):
        load_calibration("random", (1, None, None))
    arr[7, 0, 0, 0] = np.inf
    np.save(tmp_path / "b.npy", arr)
    with pytest.raises(NonFiniteError):
        load_calibration(str(tmp_path / "b.npy"), DIGITS)


def test_check_never_raises_for_a_measurement_problem(tmp_path):
    result = egp.check(tmp_path / "missing.onnx", budget_ms=1.0, json_path=tmp_path / "c.json")
    assert (result.verdict, result.exit_code, result.passed) == ("could_not_measure", 2, False)
    assert json.loads((tmp_path / "c.json").read_text())["verdict"] == "could_not_measure"


def test_deploy_refuses_before_any_work(exported, tmp_path):
    d, _ = exported
    with pytest.raises(UsageError, match="is the input"):
        egp.deploy(d / "m.pt", d / "m.pt")
    with pytest.raises(UsageError, match="unknown surgery option"):
        egp.deploy(d / "m.pt", tmp_path / "x.egp.onnx", options={"nope": 1})
    assert list(tmp_path.iterdir()) == []


def test_plots_leave_pyplot_and_the_backend_alone(tmp_path):
    # library plots go through matplotlib's Figure API: no pyplot, so no backend switch and no global figure
    code = f"""
import sys
from egp_deploy.bench import save_latency_plot
from egp_deploy.surgery.report import save_report_plot
from egp_deploy.prune.loop import plot_entropy
m = {{"name": "a.onnx", "samples_ms": [1.0, 1.5, 2.0, 1.2], "latency_ms": {{"min": 1.0, "p99": 2.0, "median": 1.35}}}}
save_latency_plot({{"models": [m, dict(m, name="b.onnx")], "settings": {{"backend": "ort-cpu"}}}}, r"{tmp_path / 'b.png'}")
save_report_plot({{"before": {{"nodes": 10, "macs_dense": 100}}, "after": {{"nodes": 6, "macs_dense": 40}}}}, r"{tmp_path / 's.png'}")
assert "matplotlib.pyplot" not in sys.modules, "pyplot imported"  # (matplotlib.get_backend() itself would import it)
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    for name in ("b.png", "s.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
