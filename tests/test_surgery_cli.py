"""egp-surgery from the command line: success path, and bad input -> one line, exit code, nothing written."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from egp_deploy.cli import surgery as cli
from test_surgery_helpers import export_module, randn


@pytest.fixture
def small_model(tmp_path):
    m = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(),
                      nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    path = tmp_path / "in.onnx"
    onnx.save(export_module(m, (1, 1, 8, 8), dynamic=True), path)
    return path


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["egp-surgery", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    cap = capsys.readouterr()
    return int(exc.value.code or 0), cap.out + cap.err


def test_cli_writes_verified_model_report_and_plot(tmp_path, monkeypatch, capsys, small_model):
    cal = tmp_path / "cal.npy"
    np.save(cal, randn(12, 1, 8, 8))
    out, rep, png = tmp_path / "out.onnx", tmp_path / "r.json", tmp_path / "r.png"
    code, text = run_cli(monkeypatch, capsys, small_model, out, "--calibration", cal, "--held-out", cal,
                         "--report", rep, "--plot", png, "-n", 12)
    assert code == 0, text
    onnx.checker.check_model(onnx.load(out), full_check=True)
    report = json.loads(rep.read_text())
    assert report["verification"]["calibration"]["rel_error"] <= 1e-5
    assert report["before"]["nodes"] >= report["after"]["nodes"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "graph surgery" in text and "conv/gemm layers" in text


def test_cli_random_calibration_warns(tmp_path, monkeypatch, capsys):
    path = tmp_path / "static.onnx"
    onnx.save(export_module(nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU()), (1, 2, 4, 4)), path)
    code, text = run_cli(monkeypatch, capsys, path, tmp_path / "o.onnx", "-q", "-n", 4, "--held-out-samples", 2)
    assert code == 0 and "warning" in text and "random" in text
    assert (tmp_path / "o.onnx").is_file()


def _assert_failed(code, text, expected_code, out, needle):
    assert code == expected_code, text
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and needle in lines[-1].lower(), text
    assert "Traceback" not in text
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def test_cli_truncated_file(tmp_path, monkeypatch, capsys, small_model):
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(small_model.read_bytes()[:300])
    out = tmp_path / "out.onnx"
    _assert_failed(*run_cli(monkeypatch, capsys, bad, out), 3, out, "onnx")


def test_cli_not_onnx(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model\n" * 20)
    out = tmp_path / "out.onnx"
    _assert_failed(*run_cli(monkeypatch, capsys, bad, out), 3, out, "onnx")


def test_cli_missing_file(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.onnx"
    _assert_failed(*run_cli(monkeypatch, capsys, tmp_path / "nope.onnx", out), 3, out, "not found")


def test_cli_nan_calibration(tmp_path, monkeypatch, capsys, small_model):
    cal = randn(4, 1, 8, 8)
    cal[1, 0, 2, 2] = np.nan
    np.save(tmp_path / "nan.npy", cal)
    out = tmp_path / "out.onnx"
    _assert_failed(*run_cli(monkeypatch, capsys, small_model, out, "-c", tmp_path / "nan.npy"), 6, out, "nan")


def test_cli_wrong_calibration_shape(tmp_path, monkeypatch, capsys, small_model):
    np.save(tmp_path / "wrong.npy", randn(4, 3, 8, 8))
    out = tmp_path / "out.onnx"
    _assert_failed(*run_cli(monkeypatch, capsys, small_model, out, "-c", tmp_path / "wrong.npy"), 4, out, "shape")


def test_cli_output_equals_input(monkeypatch, capsys, small_model):
    before = small_model.read_bytes()
    code, text = run_cli(monkeypatch, capsys, small_model, small_model)
    assert code == 2 and "input" in text.strip().splitlines()[-1]
    assert small_model.read_bytes() == before


def test_unsupported_ops_pass_through(tmp_path, monkeypatch, capsys):
    """Ops no pass knows (TopK, Softmax, LpNormalization) are kept as they are, around a pruned layer."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 2, 1, 1)).astype(np.float32)
    w[1] = 0.0
    nodes = [
        helper.make_node("LpNormalization", ["x"], ["n"], name="norm", axis=1),
        helper.make_node("Conv", ["n", "w", "b"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["c2"], name="conv2"),
        helper.make_node("Softmax", ["c2"], ["y"], name="softmax", axis=1),
        helper.make_node("Flatten", ["c2"], ["f"], name="flat"),
        helper.make_node("TopK", ["f", "k"], ["v", "i"], name="topk", axis=1),
    ]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 3, 3]),
                           helper.make_tensor_value_info("v", TensorProto.FLOAT, ["N", 2])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.full(4, -0.5, np.float32), "b"),
                           numpy_helper.from_array(rng.standard_normal((3, 4, 1, 1)).astype(np.float32), "w2"),
                           numpy_helper.from_array(np.array([2], np.int64), "k")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "odd.onnx"
    onnx.save(model, path)
    np.save(tmp_path / "c.npy", randn(8, 2, 3, 3))
    out = tmp_path / "out.onnx"
    code, text = run_cli(monkeypatch, capsys, path, out, "-c", tmp_path / "c.npy", "-q")
    assert code == 0, text
    result_ops = [n.op_type for n in onnx.load(out).graph.node]
    for op in ("LpNormalization", "Softmax", "TopK"):
        assert op in result_ops
    w_after = [i for i in onnx.load(out).graph.initializer if list(i.dims)[:2] == [3, 2] or list(i.dims)[:2] == [3, 3]]
    assert "Relu" in result_ops or w_after  # conv channel 1 (constant) is gone either way


def test_model_onnxruntime_cannot_run(tmp_path, monkeypatch, capsys):
    node = helper.make_node("MysteryOp", ["x"], ["y"], name="m", domain="com.example")
    g = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    np.save(tmp_path / "c.npy", randn(2, 2))
    out = tmp_path / "out.onnx"
    code, text = run_cli(monkeypatch, capsys, path, out, "-c", tmp_path / "c.npy")
    assert code in (3, 8) and "error:" in text and "Traceback" not in text
    assert not out.exists()



def test_skip_and_only_choose_passes_and_an_unknown_name_is_one_line(tmp_path, monkeypatch, capsys, small_model):
    """--skip / --only reach SurgeryOptions; a typo is refused before any work with the valid pass
    names listed, and nothing is written."""
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    code, text = run_cli(monkeypatch, capsys, small_model, out, "-n", 8, "--skip", "fold_afine", "--report", rep)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "fold_afine" in lines[0] and "fold_affine" in lines[0], text
    assert not out.exists() and not rep.exists()
    code, text = run_cli(monkeypatch, capsys, small_model, out, "-n", 8, "-q", "--skip", "fold_affine,merge_linear",
                         "--report", rep)
    assert code == 0, text
    report = json.loads(rep.read_text())
    assert report["options"]["skip"] == ["fold_affine", "merge_linear"]
    assert not {"fold_affine", "merge_linear"} & set(report["timing_s"]["passes_s"])
    code, text = run_cli(monkeypatch, capsys, small_model, out, "-n", 8, "-q", "--only", "remove_identities",
                         "--report", rep)
    ran = set(json.loads(rep.read_text())["timing_s"]["passes_s"]) if code == 0 else set()
    assert code == 0 and ran <= {"remove_identities"}, text
