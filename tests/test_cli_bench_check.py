"""egp-check exit codes 0/1/2 and egp-bench JSON/exit codes, run in-process through main()."""

import importlib.util
import json
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from egp_deploy.cli import bench as bench_cli
from egp_deploy.cli import build as build_cli
from egp_deploy.cli import check as check_cli

FAST = ["--warmup-ms", "5", "--iterations", "5", "--duration", "0.02", "--threads", "1"]


def tiny_onnx(path):
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W"),
         numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def run_cli(module, args, monkeypatch, prog):
    monkeypatch.setattr(sys, "argv", [prog, *map(str, args)])
    with pytest.raises(SystemExit) as info:
        module.main()
    return info.value.code or 0


@pytest.fixture
def model(tmp_path):
    return tiny_onnx(tmp_path / "m.onnx")


# ---------------------------------------------------------------------------- egp-check
def test_check_generous_budget_passes(model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "check.json"
    code = run_cli(check_cli, [model, "--budget-ms", "1e6", "--json", out, *FAST], monkeypatch, "egp-check")
    assert code == 0
    assert "PASS" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["verdict"] == "pass" and report["exit_code"] == 0
    assert report["measured_ms"] == report["latency_ms"]["p99"]  # default percentile is 99
    assert report["environment"]["versions"]["onnxruntime"]
    assert report["settings"]["backend"] == "ort-cpu"


def test_check_impossible_budget_fails(model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "check.json"
    code = run_cli(check_cli, [model, "--budget-ms", "1e-6", "--percentile", "50", "--json", out, *FAST],
                   monkeypatch, "egp-check")
    assert code == 1
    assert "FAIL" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["verdict"] == "over_budget" and report["measured_ms"] == report["latency_ms"]["median"]


def test_check_missing_backend_is_2(model, tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; the CUDA backend may work here")
    out = tmp_path / "check.json"
    code = run_cli(check_cli, [model, "--budget-ms", "10", "--backend", "ort-cuda", "--json", out, *FAST],
                   monkeypatch, "egp-check")
    assert code == 2
    err = capsys.readouterr().err
    assert "could not measure" in err and "egp-deploy[gpu]" in err
    report = json.loads(out.read_text())
    assert report["verdict"] == "could_not_measure" and report["error"] == "BackendUnavailableError"
    assert "cpu_model" in report["environment"]


@pytest.mark.parametrize("case", ["not_onnx", "missing", "bad_budget", "bad_shapes", "engine_without_trt"])
def test_check_could_not_measure_cases(tmp_path, monkeypatch, capsys, case):
    path = tiny_onnx(tmp_path / "m.onnx")
    extra = ["--budget-ms", "10"]
    if case == "not_onnx":
        path = tmp_path / "notes.onnx"
        path.write_text("hello")
    elif case == "missing":
        path = tmp_path / "nope.onnx"
    elif case == "bad_budget":
        extra = ["--budget-ms", "-1"]
    elif case == "bad_shapes":
        extra += ["--shapes", "x:2x5"]
    elif case == "engine_without_trt":
        if importlib.util.find_spec("tensorrt"):
            pytest.skip("tensorrt is installed")
        path = tmp_path / "m.engine"
        path.write_bytes(b"\0" * 16)
    code = run_cli(check_cli, [path, *extra, *FAST], monkeypatch, "egp-check")
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not measure" in err  # one line


# ---------------------------------------------------------------------------- egp-bench
def test_bench_two_models_json_table(model, tmp_path, monkeypatch, capsys):
    other = tiny_onnx(tmp_path / "other.onnx")
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    code = run_cli(bench_cli, [model, other, "--batch", "2", "--json", out, "--plot", png, "--no-progress", *FAST],
                   monkeypatch, "egp-bench")
    assert code == 0
    table = capsys.readouterr().out
    assert "m.onnx" in table and "other.onnx" in table and "ratio" in table
    report = json.loads(out.read_text())
    assert [m["name"] for m in report["models"]] == ["m.onnx", "other.onnx"]
    assert report["models"][0]["inputs"][0]["shape"] == [2, 4]
    assert png.stat().st_size > 0


def test_bench_exit_codes(model, tmp_path, monkeypatch, capsys):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01garbage")
    assert run_cli(bench_cli, [junk, "--no-progress", *FAST], monkeypatch, "egp-bench") == 3
    if not torch.cuda.is_available():
        assert run_cli(bench_cli, [model, "--backend", "ort-cuda", "--no-progress", *FAST], monkeypatch, "egp-bench") == 5
        assert "egp-deploy[gpu]" in capsys.readouterr().err
    assert run_cli(bench_cli, [model, "--iterations", "0", "--no-progress"], monkeypatch, "egp-bench") == 2


def test_build_exit_codes(model, tmp_path, monkeypatch, capsys):
    assert run_cli(build_cli, [tmp_path / "missing.onnx"], monkeypatch, "egp-build") == 3
    if importlib.util.find_spec("tensorrt") is None:
        assert run_cli(build_cli, [model], monkeypatch, "egp-build") == 5
        assert "egp-deploy[tensorrt-cu12]" in capsys.readouterr().err
        assert not (tmp_path / "m.engine").exists()
