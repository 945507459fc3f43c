"""egp-export end to end, in-process: outputs, report, exit codes, one-line errors, nothing half-written."""

import json
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from egp_deploy.api import output_paths
from egp_deploy.checkpoint import checkpoint_from_model, save_checkpoint
from egp_deploy.cli import export as cli
from egp_deploy.data import calibration_batch, load_data
from egp_deploy.onnx_metrics import graph_metrics

from test_export import ARCH_KW, _pruned_model

DIGITS = (1, 32, 32)  # the digits data set's sample shape


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_sources")
    model = _pruned_model()
    save_checkpoint(d / "pruned.pt", checkpoint_from_model(model, "resnet18", ARCH_KW, DIGITS, 10, {"data": "digits"}))
    save_checkpoint(d / "nodata.pt", checkpoint_from_model(model, "resnet18", ARCH_KW, DIGITS, 10, {}))
    x = torch.randn(2, *DIGITS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, x[:1]), d / "scripted.pt")
        torch.export.save(torch.export.export(model, (x[:1],)), d / "program.pt2")
    torch.save(model, d / "pickled.pt")
    return d


def run_cli(args, capsys):
    """Run egp-export in-process; returns (exit code, stdout, stderr)."""
    old = sys.argv
    sys.argv = ["egp-export", *map(str, args)]
    try:
        with pytest.raises(SystemExit) as info:
            cli.main()
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return info.value.code or 0, out.out, out.err


def test_export_surgery_report_and_equivalence(files, tmp_path, capsys):
    out = tmp_path / "pruned.egp.onnx"
    code, stdout, stderr = run_cli([files / "pruned.pt", "-o", out, "--samples", "64", "--threads", "1"], capsys)
    assert code == 0, stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["pruned.egp.json", "pruned.egp.onnx", "pruned.egp.png", "pruned.onnx"]
    report = json.loads((tmp_path / "pruned.egp.json").read_text())
    assert report["source"]["kind"] == "checkpoint" and report["calibration"].startswith("digits")
    assert report["export"]["max_rel_error_vs_torch"] < 1e-4
    assert (tmp_path / "pruned.egp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    exported, surgered = onnx.load(str(tmp_path / "pruned.onnx")), onnx.load(str(out))
    onnx.checker.check_model(surgered, full_check=True)
    before, after = graph_metrics(exported), graph_metrics(surgered)
    assert report["metrics_exported"]["conv_gemm_layers"] == before["conv_gemm_layers"]
    assert report["metrics_surgered"]["conv_gemm_layers"] == after["conv_gemm_layers"]
    # the fixture zeroes a whole conv and half a layer's channels: the surgery must remove something
    assert after["conv_gemm_layers"] < before["conv_gemm_layers"]
    assert after["macs_dense"] < before["macs_dense"]
    assert "gained:" in stdout

    held = calibration_batch(load_data("digits"), 64, "test").numpy()
    run = lambda m: np.concatenate([  # noqa: E731
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": held[i:i + 1]})[0]
        for i in range(len(held))
    ])
    y, y2 = run(exported), run(surgered)
    assert np.mean(y.argmax(1) == y2.argmax(1)) >= 0.99


def test_every_source_format_without_surgery(files, tmp_path, capsys):
    cases = [
        ([files / "pruned.pt", "--dynamic-batch"], "checkpoint"),
        ([files / "scripted.pt", "--input-shape", "1,32,32", "--unsafe-pickle"], "torchscript"),
        ([files / "program.pt2"], "exported"),
        ([files / "pickled.pt", "--input-shape", "1,32,32", "--unsafe-pickle"], "pickled"),
    ]
    for args, kind in cases:
        out = tmp_path / f"{kind}.onnx"
        code, stdout, stderr = run_cli([*args, "--no-surgery", "-o", out, "--build"], capsys)
        assert code == 0, stderr
        report = json.loads((tmp_path / f"{kind}.export.json").read_text())
        assert report["source"]["kind"] == kind
        assert "surgery" not in report and report["build"]["built"] is False
        assert "TensorRT" in stderr  # says why no engine was built instead of failing
        model = onnx.load(str(out))
        dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert (dim0.dim_param == "batch") == (kind == "checkpoint")
    assert len(list(tmp_path.iterdir())) == 8


def test_random_calibration_warns(files, tmp_path, capsys):
    code, _, stderr = run_cli([files / "nodata.pt", "-o", tmp_path / "n.egp.onnx", "--samples", "16",
                               "--no-plot", "--threads", "1"], capsys)
    assert code == 0, stderr
    assert "random normal" in stderr and "warning" in stderr
    assert json.loads((tmp_path / "n.egp.json").read_text())["calibration"] == "random normal"


def test_bad_input_one_line_distinct_codes_nothing_written(files, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    good = (files / "pruned.pt").read_bytes()
    (src / "truncated.pt").write_bytes(good[: len(good) // 3])
    (src / "notes.pt").write_text("not a model\n")
    np.save(src / "wrong_shape.npy", np.zeros((8, 3, 32, 32), np.float32))
    nan = np.random.default_rng(0).standard_normal((8, *DIGITS)).astype(np.float32)
    nan[3, 0, 4, 4] = np.nan
    np.save(src / "nan.npy", nan)
    out_dir = tmp_path / "out"
    out = out_dir / "m.egp.onnx"
    cases = [
        ([src / "missing.pt", "-o", out], 3, "not found"),
        ([src / "truncated.pt", "-o", out], 3, "truncated"),
        ([src / "notes.pt", "-o", out], 3, "not a PyTorch model"),
        ([files / "pickled.pt", "--input-shape", "1,32,32", "-o", out], 3, "--unsafe-pickle"),
        ([files / "scripted.pt", "--input-shape", "1,32,32", "-o", out], 3, "--unsafe-pickle"),
        ([files / "pruned.pt", "--input-shape", "3,32,32", "-o", out], 2, "--input-shape"),
        ([files / "pruned.pt", "--input-shape", "1,x", "-o", out], 2, "--input-shape"),
        ([files / "pruned.pt", "-o", files / "pruned.pt"], 2, "is the input"),
        ([files / "pruned.pt", "-o", out, "--calibration", src / "wrong_shape.npy"], 4, "sample shape"),
        ([files / "pruned.pt", "-o", out, "--calibration", src / "nan.npy"], 6, "NaN"),
        ([files / "pruned.pt", "-o", out, "--calibration", "cifar10:/nonexistent"], 4, "CIFAR-10"),
        ([files / "pruned.pt", "-o", out, "--set", "no_such_option=1"], 2, "--set"),
    ]
    codes = set()
    for args, want_code, needle in cases:
        code, _, stderr = run_cli(args, capsys)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == want_code, (args, stderr)
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1 and lines[-1] == errors[0] and needle in errors[0], (args, stderr)
        assert not out_dir.exists() or list(out_dir.iterdir()) == [], (args, list(out_dir.iterdir()))
        codes.add(code)
    assert codes == {2, 3, 4, 6}
    assert (files / "pruned.pt").read_bytes() == good


def test_output_paths_layout(tmp_path):
    m = tmp_path / "net.pt"
    p = output_paths(m, None, surgery=True)
    assert (p.exported.name, p.surgered.name, p.report.name, p.plot.name) == (
        "net.onnx", "net.egp.onnx", "net.egp.json", "net.egp.png")
    p = output_paths(m, tmp_path / "final.onnx", surgery=True)
    assert p.surgered.name == "final.onnx" and p.exported.name == "final.exported.onnx"
    p = output_paths(m, None, surgery=False)
    assert p.exported.name == "net.onnx" and p.report.name == "net.export.json" and p.surgered is None
