"""The commands' guards live in the library calls (issue 20): the Python API refuses what the
commands refuse, before any work, with the same exit code; a pass selection that selects nothing is
refused; and the messages and codes of a few odd inputs say what is wrong."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import egp_deploy as egp
from egp_deploy import api
from egp_deploy.checkpoint import load_checkpoint
from egp_deploy.cli._common import invoke
from egp_deploy.errors import (
    EgpError,
    InputFileError,
    NonFiniteError,
    UnsupportedError,
    UsageError,
)


def _run(command: str, args, capsys) -> tuple[int, list[str]]:
    app = importlib.import_module(f"egp_deploy.cli.{command}").app
    code = invoke(app, f"egp-{command}", [str(a) for a in args])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _graph(path: Path | None, nodes, inputs=("x",), initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3]) for n in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if path is not None:
        onnx.save(model, path)
    return model


def _relu(path: Path | None = None) -> onnx.ModelProto:
    return _graph(path, [helper.make_node("Relu", ["x"], ["y"])])


def _tiny_checkpoint(path: Path) -> Path:
    from egp_deploy.archs import create_model
    from egp_deploy.checkpoint import checkpoint_from_model, save_checkpoint

    model = create_model("resnet18", width=4, in_channels=1, num_classes=10)
    return save_checkpoint(path, checkpoint_from_model(model, "resnet18", {"width": 4, "in_channels": 1, "num_classes": 10},
                                                       (1, 32, 32), 10, {"data": "digits"}))


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


class _WorkStarted(BaseException):
    pass


@pytest.fixture
def no_work(monkeypatch):
    """Training, export, data loading or surgery started raise _WorkStarted: the refusals come first."""
    def work(*_a, **_k):
        raise _WorkStarted

    for module, name in (("egp_deploy.distributed", "init_distributed"), ("egp_deploy.export", "load_source"),
                         ("egp_deploy.export", "export_model"), ("egp_deploy.api", "_surgery"),
                         ("egp_deploy.calibration", "load_calibration"), ("egp_deploy.bench", "benchmark_models")):
        monkeypatch.setattr(importlib.import_module(module), name, work)


# ---------------------------------------------------------------- item 3: the API has the commands' guards


@pytest.mark.parametrize("via", ["direct", "symlink"])
def test_api_prune_never_overwrites_its_own_source(via, tmp_path, no_work):
    out = tmp_path / "out"
    best = _tiny_checkpoint(out / "best.pt")
    source = best
    if via == "symlink":
        source = tmp_path / "start.pt"
        source.symlink_to(best)
    before = _tree(tmp_path)
    with pytest.raises(UsageError, match="would overwrite") as refused:
        egp.prune(source, out, resume=True, progress=False)
    assert refused.value.exit_code == 2 and _tree(tmp_path) == before


def test_two_runs_into_one_folder_are_refused_by_the_lock_from_the_api_and_the_command(tmp_path, capsys, no_work):
    from egp_deploy.io_utils import folder_lock

    ckpt = _tiny_checkpoint(tmp_path / "start.pt")
    with folder_lock(tmp_path / "out", "egp-prune"):  # the first run holds it
        with pytest.raises(UsageError, match=f"in use by another run .*pid {os.getpid()}"):
            egp.prune(ckpt, tmp_path / "out", progress=False)
        code, err = _run("prune", [ckpt, "-o", tmp_path / "out"], capsys)
        assert code == 2 and len(err) == 1 and "in use by another run" in err[0], err


def test_a_previous_run_is_kept_unless_resume_or_force(tmp_path, no_work):
    ckpt = _tiny_checkpoint(tmp_path / "start.pt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.json").write_text("{}")
    before = _tree(tmp_path)
    with pytest.raises(UsageError, match="already holds a run"):
        egp.prune(ckpt, out, progress=False)
    assert _tree(tmp_path) == before
    with pytest.raises(_WorkStarted):  # force: past the folder check, into the work
        egp.prune(ckpt, out, force=True, progress=False)
    assert not (out / "log.json").exists() and ckpt.exists()


@pytest.mark.parametrize("call", ["deploy", "surgery_file", "bench", "build"])
def test_api_outputs_equal_to_the_input_are_refused(call, tmp_path, no_work):
    path = tmp_path / "m.onnx"
    _relu(path)
    ckpt = _tiny_checkpoint(tmp_path / "m.pt")
    before = _tree(tmp_path)
    with pytest.raises(UsageError, match="is the input"):
        if call == "deploy":
            egp.deploy(ckpt, ckpt)
        elif call == "surgery_file":
            api.surgery_file(path, path)
        elif call == "bench":
            egp.bench(path, json_path=path)
        else:
            from egp_deploy.build import build_engine

            build_engine(path, tmp_path / "m.engine", timing_cache=path)
    assert _tree(tmp_path) == before


# ---------------------------------------------------------------- item 7: refusals before work


def test_a_bad_surgery_choice_is_refused_before_the_export(tmp_path, capsys, no_work):
    ckpt = _tiny_checkpoint(tmp_path / "m.pt")
    before = _tree(tmp_path)
    code, err = _run("export", [ckpt, "-o", tmp_path / "m.egp.onnx", "--set", "cost=bogus"], capsys)
    assert code == 2 and len(err) == 1 and "cost" in err[0] and "macs or latency" in err[0], err
    with pytest.raises(UsageError, match="latency_backend"):
        egp.deploy(ckpt, tmp_path / "m.egp.onnx", options={"latency_backend": "gpu"})
    assert _tree(tmp_path) == before


def test_egp_surgery_checks_the_model_before_loading_calibration_data(tmp_path, capsys):
    _graph(tmp_path / "two.onnx", [helper.make_node("Add", ["a", "b"], ["y"])], inputs=("a", "b"))
    (tmp_path / "bad.npy").write_bytes(b"not an array")
    code, err = _run("surgery", [tmp_path / "two.onnx", tmp_path / "o.onnx", "-c", tmp_path / "bad.npy"], capsys)
    assert code == 8 and "2 inputs" in err[0], err  # the model's problem, not the data's (4)
    with pytest.raises(UnsupportedError, match="2 inputs"):
        api.surgery_file(tmp_path / "two.onnx", tmp_path / "o.onnx", calibration=str(tmp_path / "bad.npy"))
    assert not (tmp_path / "o.onnx").exists()


# ---------------------------------------------------------------- item 11: a selection that selects nothing


@pytest.mark.parametrize("only", ["", ",", " , "])
@pytest.mark.parametrize("command", ["surgery", "export"])
def test_an_empty_only_is_a_usage_error(command, only, tmp_path, capsys, no_work):
    if command == "surgery":
        args = [_relu(tmp_path / "m.onnx") and tmp_path / "m.onnx", tmp_path / "o.egp.onnx"]
    else:
        args = [_tiny_checkpoint(tmp_path / "m.pt"), "-o", tmp_path / "o.egp.onnx"]
    before = _tree(tmp_path)
    code, err = _run(command, [*args, "--only", only], capsys)
    assert code == 2 and len(err) == 1 and "--only names no surgery pass" in err[0], err
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("selection", [{"only": []}, {"only": ""}, {"only": " , "}, {"skip": "every pass"}])
def test_api_selections_that_run_no_pass_are_refused(selection):
    from egp_deploy.surgery import SurgeryOptions, pass_names
    from egp_deploy.surgery import optimize as surgery_optimize

    if selection.get("skip") == "every pass":
        selection = {"skip": pass_names()}
    model = _relu()
    with pytest.raises(UsageError, match="^(only names no surgery pass|skip names every surgery pass)") as refused:
        egp.optimize(model, **selection)
    assert refused.value.exit_code == 2
    with pytest.raises(UsageError):  # the surgery's own entry point refuses it too
        surgery_optimize(model, np.zeros((4, 1, 3), np.float32), None, SurgeryOptions(**selection))


def test_one_pass_is_still_a_selection():
    assert api.surgery_options(only="fold_constants").only == ["fold_constants"]
    assert api.surgery_options(only=None).only is None


# ---------------------------------------------------------------- item 14: the right words and codes


def _bad_checkpoints(folder: Path) -> dict[str, Path]:
    good = folder / "good.pt"
    torch.save({"a": torch.ones(3)}, good)
    data = good.read_bytes()
    files = {"empty": b"", "random": bytes(range(256)) * 8, "text": b"garbage\n", "truncated": data[: len(data) // 2],
             "zip magic only": b"PK\x03\x04 garbage"}
    out = {}
    for name, content in files.items():
        out[name] = folder / f"{name.replace(' ', '_')}.pt"
        out[name].write_bytes(content)
    return out


def test_a_bad_checkpoint_is_one_clean_line_naming_the_file(tmp_path, capsys):
    for what, path in _bad_checkpoints(tmp_path).items():
        code, err = _run("prune", [path, "-o", tmp_path / "run"], capsys)
        assert code == 3 and len(err) == 1, (what, err)
        line = err[0]
        assert path.name in line and "not a readable egp-deploy checkpoint:" in line, line
        for torch_words in ("(101)", "miniz", "PyTorch 2.6", "weights_only", "...", "internal"):
            assert torch_words not in line, (what, line)


def test_the_reasons_differ_by_what_is_wrong(tmp_path):
    reasons = {}
    for what, path in _bad_checkpoints(tmp_path).items():
        with pytest.raises(InputFileError) as refused:
            load_checkpoint(path)
        reasons[what] = str(refused.value).split(": ", 1)[1]
    assert "empty" in reasons["empty"]
    assert "truncated" in reasons["truncated"] and "truncated" in reasons["zip magic only"]
    assert "not a PyTorch file" in reasons["random"] and "not a PyTorch file" in reasons["text"]


@pytest.mark.parametrize("where", ["initializer", "constant tensor", "constant float"])
def test_a_nan_weight_is_6_wherever_it_is_stored(where, tmp_path, capsys):
    weight = np.array([[1.0, np.nan, 2.0]], np.float32)
    add = helper.make_node("Add", ["x", "w"], ["y"])
    if where == "initializer":
        nodes, inits = [add], [numpy_helper.from_array(weight, "w")]
    elif where == "constant tensor":
        nodes, inits = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weight)), add], []
    else:
        nodes, inits = [helper.make_node("Constant", [], ["w"], value_float=float("inf")), add], []
    model = _graph(tmp_path / "nan.onnx", nodes, initializers=inits)
    code, err = _run("surgery", [tmp_path / "nan.onnx", tmp_path / "o.onnx"], capsys)
    assert code == 6 and len(err) == 1 and "NaN/Inf" in err[0] and "'w'" in err[0], err
    with pytest.raises(NonFiniteError):
        egp.optimize(model)
    assert not (tmp_path / "o.onnx").exists()


def test_a_graph_without_nodes_is_unsupported_not_a_bad_file(tmp_path, capsys):
    graph = helper.make_graph([], "g", [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "empty.onnx")
    code, err = _run("surgery", [tmp_path / "empty.onnx", tmp_path / "o.onnx"], capsys)
    assert code == 8 and "graph with no nodes" in err[0] and "not an ONNX model" not in err[0], err
    with pytest.raises(UnsupportedError, match="graph with no nodes"):
        egp.optimize(tmp_path / "empty.onnx")
    (tmp_path / "text.onnx").write_text("hello")  # a file that is not ONNX at all stays a bad input file
    code, err = _run("surgery", [tmp_path / "text.onnx", tmp_path / "o.onnx"], capsys)
    assert code == 3, err


def test_a_two_input_model_is_8_from_the_api_as_from_the_commands(tmp_path, capsys):
    model = _graph(tmp_path / "two.onnx", [helper.make_node("Add", ["a", "b"], ["y"])], inputs=("a", "b"))
    code, _ = _run("surgery", [tmp_path / "two.onnx", tmp_path / "o.onnx"], capsys)
    for run in (lambda: egp.optimize(model), lambda: egp.optimize(tmp_path / "two.onnx", "random"),
                lambda: egp.optimize(model, np.zeros((4, 3), np.float32))):
        with pytest.raises(EgpError) as refused:
            run()
        assert refused.value.exit_code == code == 8, refused.value
