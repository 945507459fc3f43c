"""Hardening (issue 13): a careless or malicious user gets one line and an exit code, never a
traceback, a hang, a payload that runs, or a lost file."""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import socket
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from egp_deploy.cli._common import invoke
from egp_deploy.errors import InputFileError
from egp_deploy.pt2_archive import UNSAFE_HINT, is_safe_expression, load_exported_program
from egp_deploy.validation import RANGES, SURGERY_OPTIONS

# ---------------------------------------------------------------- 1. a .pt2 cannot run code


class _Payload:
    """Unpickling this creates ``marker``: proof that the loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _torch_save_payload(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"x": _Payload(marker)}, buf)
    return buf.getvalue()


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) + torch.tensor([1.0, 2.0, 3.0])  # a lifted constant: a constants member


@pytest.fixture(scope="module")
def plain_pt2(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "plain.pt2"
    torch.export.save(torch.export.export(_Tiny().eval(), (torch.randn(2, 4),),
                                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}}), path)
    return path


def _rewrite(src: Path, dst: Path, edit) -> Path:
    with zipfile.ZipFile(src) as zin:
        items = {n: zin.read(n) for n in zin.namelist()}
    root = next(iter(items)).split("/")[0]
    members = {n.split("/", 1)[1]: v for n, v in items.items()}
    edit(members)
    with zipfile.ZipFile(dst, "w") as zout:
        for name, data in members.items():
            zout.writestr(f"{root}/{name}", data)
    return dst


def _edit_config(members: dict, which: str, change) -> None:
    key = f"data/{which}/model_{which}_config.json"
    config = json.loads(members[key])
    change(next(iter(config["config"].values())))
    members[key] = json.dumps(config).encode()


def _sample_inputs(m, marker):
    m["data/sample_inputs/model.pt"] = _torch_save_payload(marker)


def _pickled_weight(m, marker):
    _edit_config(m, "weights", lambda e: e.update(use_pickle=True))
    m["data/weights/weight_0"] = _torch_save_payload(marker)


def _pickled_constant(m, marker):
    _edit_config(m, "constants", lambda e: e.update(use_pickle=True))
    m["data/constants/tensor_0"] = _torch_save_payload(marker)


def _opaque_constant(m, marker):
    _edit_config(m, "constants", lambda e: e.update(path_name="opaque_obj_0", use_pickle=True))
    m["data/constants/opaque_obj_0"] = pickle.dumps(_Payload(marker))


def _custom_constant(m, marker):
    _edit_config(m, "constants", lambda e: e.update(path_name="custom_obj_0", use_pickle=True))
    m["data/constants/custom_obj_0"] = pickle.dumps(_Payload(marker))


def _legacy_weights(m, marker):
    m["data/weights/model.pt"] = _torch_save_payload(marker)


def _legacy_constants(m, marker):
    m["data/constants/model.pt"] = _torch_save_payload(marker)


def _guard_code(m, marker):
    program = json.loads(m["models/model.json"])
    program["guards_code"] = [f"open({str(marker)!r}, 'w') is not None"]
    m["models/model.json"] = json.dumps(program).encode()


def _shape_expression(m, marker):  # sympy.sympify evaluates these strings
    text = m["models/model.json"].decode()
    symbol = "Symbol('s"
    start = text.index(symbol)
    end = text.index(")", start) + 1
    m["models/model.json"] = (text[:start] + f"(open({str(marker)!r}, 'w') and {text[start:end]})"
                              + text[end:]).encode()


def _graph_target(m, marker):
    program = json.loads(m["models/model.json"])
    program["graph_module"]["graph"]["nodes"][0]["target"] = "_operator.attrgetter"
    m["models/model.json"] = json.dumps(program).encode()


def _operator_argument(m, marker):
    program = json.loads(m["models/model.json"])
    program["graph_module"]["graph"]["nodes"][0]["inputs"][0]["arg"] = {"as_operator": "_operator.methodcaller"}
    m["models/model.json"] = json.dumps(program).encode()


def _compiled_code(m, marker):
    m["data/aotinductor/model/model.so"] = b"\x7fELF"


PAYLOADS = {
    "sample_inputs": _sample_inputs, "pickled weight": _pickled_weight, "pickled constant": _pickled_constant,
    "opaque object": _opaque_constant, "custom object": _custom_constant, "legacy weights": _legacy_weights,
    "legacy constants": _legacy_constants, "guard code": _guard_code, "shape expression": _shape_expression,
    "graph target": _graph_target, "operator argument": _operator_argument, "compiled code": _compiled_code,
}


@pytest.mark.parametrize("member", list(PAYLOADS))
def test_pt2_payload_in_any_member_does_not_run(member, plain_pt2, tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    evil = _rewrite(plain_pt2, tmp_path / "evil.pt2", lambda m: PAYLOADS[member](m, marker))
    with pytest.raises(InputFileError) as info:
        load_exported_program(evil)
    assert not marker.exists(), f"the {member} payload ran"
    assert UNSAFE_HINT in str(info.value) and "\n" not in str(info.value)
    assert InputFileError.exit_code == 3


@pytest.mark.parametrize("member", ["sample_inputs", "pickled weight", "opaque object", "shape expression"])
def test_plain_torch_export_load_would_run_those_payloads(member, plain_pt2, tmp_path):
    # guards the test above: the crafted archives are real exploits of torch.export.load
    marker = tmp_path / "PAYLOAD_RAN"
    evil = _rewrite(plain_pt2, tmp_path / "evil.pt2", lambda m: PAYLOADS[member](m, marker))
    try:
        torch.export.load(str(evil))
    except Exception:
        pass
    assert marker.exists()


def test_plain_pt2_still_loads_and_runs(plain_pt2):
    ep = load_exported_program(plain_pt2)
    out = ep.module()(torch.ones(3, 4))
    assert out.shape == (3, 3)


def test_egp_export_refuses_payload_pt2_with_one_line_exit_3(plain_pt2, tmp_path, capsys):
    from egp_deploy.cli import export as cli

    marker = tmp_path / "PAYLOAD_RAN"
    evil = _rewrite(plain_pt2, tmp_path / "evil.pt2", lambda m: _sample_inputs(m, marker))
    out = tmp_path / "out.onnx"
    code = invoke(cli.app, "egp-export", [str(evil), "-o", str(out), "--no-surgery"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 3 and not marker.exists() and not out.exists()
    assert len(err) == 1 and err[0].startswith("error:") and "--unsafe-pickle" in err[0], err


@pytest.mark.parametrize("text", [
    "Symbol('s77', positive=True, integer=True)", "2*s0 + 1", "Max(1, s0)", "Eq(Mod(s0, 2), 0)",
    "L['x'].size()[0] <= 1024", "FloorDiv(s1, 4) >= 2", "Mul(Integer(65), Symbol('s77', positive=True, integer=True))",
])
def test_shape_expressions_torch_writes_are_accepted(text):
    assert is_safe_expression(text)


@pytest.mark.parametrize("text", [
    "open('/x', 'w')", "__import__('os').system('true')", "s0.__class__", "exec(bytes((1, 2)))",
    "(lambda: 1)()", "L['x'].size.__self__", "getattr(s0, 'x')", "[s0 for s0 in s1]", "Symbol('a; b')",
])
def test_shape_expressions_that_reach_code_are_refused(text):
    assert not is_safe_expression(text)


# ---------------------------------------------------------------- shared: commands in-process


COMMANDS = ("prune", "export", "surgery", "build", "bench", "check")


def _app(stage: str):
    import importlib

    return importlib.import_module(f"egp_deploy.cli.{stage}").app


def _error_exit(stage: str):
    return (lambda e: 2) if stage == "check" else None


def run_cli(stage: str, args, capsys, timeout_s: int = 60):
    """Run egp-STAGE in-process: (exit code, non-empty stderr lines, stdout). A hang fails the test."""
    def on_alarm(*_):
        raise TimeoutError(f"egp-{stage} {args} did not return within {timeout_s} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(timeout_s)
    try:
        code = invoke(_app(stage), f"egp-{stage}", [str(a) for a in args], error_exit=_error_exit(stage),
                      on_argument_error=_check_json_hook() if stage == "check" else None)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.strip()], captured.out


def _check_json_hook():
    from egp_deploy.cli.check import _report_argument_error

    return _report_argument_error


def _tiny_onnx(path: Path, elem_type=TensorProto.FLOAT, inputs: int = 1, weight=None) -> Path:
    w = numpy_helper.from_array(np.ones((4, 3), np.float32) if weight is None else weight, "w")
    names = [f"x{i}" for i in range(inputs)]
    nodes = [helper.make_node("MatMul", [names[0], "w"], ["y"])]
    if inputs > 1:
        nodes = [helper.make_node("Add", names, ["s"]), helper.make_node("MatMul", ["s", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, elem_type, [1, 4]) for n in names],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _tiny_checkpoint(path: Path) -> Path:
    from egp_deploy.archs import create_model
    from egp_deploy.checkpoint import checkpoint_from_model, save_checkpoint

    model = create_model("resnet18", width=4, in_channels=1, num_classes=10)
    return save_checkpoint(path, checkpoint_from_model(model, "resnet18", {"width": 4, "in_channels": 1, "num_classes": 10},
                                                       (1, 32, 32), 10, {"data": "digits"}))


def _one_error_line(code, err, expected_code, *words):
    assert code == expected_code, (code, err)
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert "Traceback" not in err[0]
    for w in words:
        assert w in err[0], (w, err[0])


# ---------------------------------------------------------------- 2. NaN/inf durations never hang


@pytest.mark.parametrize("stage,args", [
    ("check", ["--budget-ms", "50", "--duration", "nan"]), ("check", ["--budget-ms", "50", "--duration", "inf"]),
    ("bench", ["--duration", "inf"]), ("bench", ["--warmup-ms", "nan"]),
])
def test_non_finite_durations_are_refused_at_once(stage, args, workdir, capsys):
    model = _tiny_onnx(workdir / "m.onnx")
    code, err, _ = run_cli(stage, [model, *args], capsys, timeout_s=30)
    _one_error_line(code, err, 2, "finite", "[0, ")


# ---------------------------------------------------------------- 3. outputs never replace an input


@pytest.mark.parametrize("stage,flag", [("check", "--json"), ("bench", "--plot"), ("bench", "--json")])
@pytest.mark.parametrize("via", ["same path", "symlink", "hard link"])
def test_an_output_equal_to_the_model_is_refused(stage, flag, via, workdir, capsys):
    model = _tiny_onnx(workdir / "m.onnx")
    before = model.read_bytes()
    target = {"same path": model, "symlink": workdir / "link.onnx", "hard link": workdir / "hard.onnx"}[via]
    if via == "symlink":
        target.symlink_to(model)
    elif via == "hard link":
        os.link(model, target)
    extra = ["--budget-ms", "50"] if stage == "check" else []
    code, err, _ = run_cli(stage, [model, *extra, flag, target, "--duration", "0"], capsys)
    assert code == 2 and "is the input" in err[-1], err
    assert model.read_bytes() == before


# ---------------------------------------------------------------- 4. egp-prune never overwrites its input


@pytest.mark.parametrize("via", ["direct", "symlink"])
def test_prune_refuses_a_source_that_is_a_file_of_its_output_run(via, workdir, capsys):
    out = workdir / "out"
    best = _tiny_checkpoint(out / "best.pt")
    before = best.read_bytes()
    source = best
    if via == "symlink":
        source = workdir / "start.pt"
        source.symlink_to(best)
    code, err, _ = run_cli("prune", [source, "-o", out, "--resume"], capsys)
    _one_error_line(code, err, 2, "would overwrite")
    assert best.read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["best.pt"]


# ---------------------------------------------------------------- 5. one run per folder, none replaced


def test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder(workdir, capsys):
    from egp_deploy.io_utils import folder_lock

    ckpt = _tiny_checkpoint(workdir / "start.pt")
    with folder_lock(workdir / "out", "egp-prune"):  # a live run (this process) holds it
        code, err, _ = run_cli("prune", [ckpt, "-o", workdir / "out"], capsys)
    _one_error_line(code, err, 2, "in use", f"pid {os.getpid()}", socket.gethostname())
    assert not (workdir / "out" / ".egp-lock").exists()  # the holder released it; the refused run took nothing


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    from egp_deploy.io_utils import folder_lock

    lock = tmp_path / ".egp-lock"
    lock.write_text(json.dumps({"command": "egp-prune", "pid": 2**22 + 12345, "host": socket.gethostname()}))
    with folder_lock(tmp_path, "egp-prune"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_a_folder_holding_a_run_is_not_replaced_without_resume_or_force(workdir, capsys):
    ckpt = _tiny_checkpoint(workdir / "start.pt")
    out = workdir / "out"
    out.mkdir()
    (out / "log.json").write_text("{}")
    (out / "iter_00.pt").write_bytes(b"old")
    before = _files(out)
    code, err, _ = run_cli("prune", [ckpt, "-o", out], capsys)
    _one_error_line(code, err, 2, "already holds a run", "--resume", "--force")
    assert _files(out) == before


def test_force_replaces_the_previous_run_and_resume_keeps_it(tmp_path):
    from egp_deploy.io_utils import run_folder
    from egp_deploy.validation import PRUNE_RUN_FILES

    (tmp_path / "log.json").write_text("{}")
    (tmp_path / "iter_03.pt").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("the user's own file")
    with run_folder(tmp_path, resume=True, force=False, command="t", run_files=PRUNE_RUN_FILES):
        assert (tmp_path / "iter_03.pt").exists()
    (tmp_path / "dense.pt").write_bytes(b"the run's source")
    with run_folder(tmp_path, resume=False, force=True, command="t", run_files=PRUNE_RUN_FILES,
                    keep=[tmp_path / "dense.pt"]):
        assert sorted(p.name for p in tmp_path.iterdir()) == [".egp-lock", "dense.pt", "notes.txt"]


# ---------------------------------------------------------------- 6. unwritable outputs fail first


def test_surgery_with_a_report_under_a_file_writes_nothing(workdir, capsys):
    model = _tiny_onnx(workdir / "m.onnx")
    (workdir / "afile").write_text("not a folder")
    before = _files(workdir)
    code, err, _ = run_cli("surgery", [model, workdir / "out.onnx", "--report", workdir / "afile" / "r.json"], capsys)
    _one_error_line(code, err, 2, "is a file, not a folder")
    assert _files(workdir) == before


def test_export_into_a_folder_under_a_file_is_refused_before_loading(workdir, capsys):
    ckpt = _tiny_checkpoint(workdir / "m.pt")
    (workdir / "afile").write_text("x")
    code, err, _ = run_cli("export", [ckpt, "-o", workdir / "afile" / "sub" / "m.onnx"], capsys)
    _one_error_line(code, err, 2, "afile", "not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused_before_work(workdir, capsys):
    model = _tiny_onnx(workdir / "m.onnx")
    ro = workdir / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, err, _ = run_cli("surgery", [model, workdir / "out.onnx", "--report", ro / "r.json"], capsys)
    finally:
        ro.chmod(0o755)
    _one_error_line(code, err, 2, "not writable")
    assert not (workdir / "out.onnx").exists()


def test_atomic_files_commit_together_or_not_at_all(tmp_path):
    from egp_deploy.io_utils import atomic_files

    with pytest.raises(RuntimeError):
        with atomic_files() as group:
            group.write_bytes(tmp_path / "a.onnx", b"model")
            raise RuntimeError("the second output failed")
    assert list(tmp_path.iterdir()) == []
    with atomic_files() as group:
        group.write_bytes(tmp_path / "a.onnx", b"model")
        group.write_json(tmp_path / "a.json", {"ok": float("nan")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.onnx"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"ok": None}


# ---------------------------------------------------------------- 7/8. numeric options: exit 2, first


@pytest.mark.parametrize("stage,args,words", [
    ("surgery", ["--tolerance", "nan"], "(0, 1]"), ("surgery", ["--tolerance", "-1"], "(0, 1]"),
    ("surgery", ["--tolerance", "inf"], "finite"), ("surgery", ["--max-mac-growth", "nan"], "--max-mac-growth"),
    ("surgery", ["--min-agreement", "nan"], "[0, 1]"), ("surgery", ["--samples", "0"], "--samples"),
    ("export", ["--export-tolerance", "nan"], "--export-tolerance"), ("export", ["--export-tolerance", "-1"], "(0, 1]"),
    ("export", ["--set", "min_held_out_agreement=2"], "[0, 1]"), ("export", ["--seed", "-1"], "--seed"),
    ("prune", ["--tolerance", "nan"], "[0, 100]"), ("prune", ["--epochs", "-1"], "--epochs"),
    ("prune", ["--lr", "-1"], "> 0"), ("prune", ["--batch-size", "0"], "--batch-size"),
    ("prune", ["--calibration-batches", "0"], "--calibration-batches"), ("prune", ["--rate", "1"], "(0, 1)"),
    ("check", ["--budget-ms", "50", "--warmup-ms", "nan"], "--warmup-ms"),
    ("check", ["--budget-ms", "nan"], "--budget-ms"), ("bench", ["--iterations", "0"], "--iterations"),
    ("build", ["--workspace", "-1"], "--workspace"),
])
def test_numeric_options_are_checked_before_any_work(stage, args, words, workdir, capsys):
    model = _tiny_checkpoint(workdir / "m.pt") if stage in ("prune", "export") else _tiny_onnx(workdir / "m.onnx")
    positional = {"surgery": [model, workdir / "out.onnx"], "prune": [model, "-o", workdir / "run"]}.get(stage, [model])
    before = _files(workdir)
    code, err, _ = run_cli(stage, [*positional, *args], capsys)
    _one_error_line(code, err, 2, words)
    assert _files(workdir) == before


@pytest.mark.parametrize("stage,flag,typo,valid", [
    ("bench", "--backend", "ortcpu", "'ort-cpu'"), ("check", "--backend", "trtt", "'trt'"),
    ("bench", "--precision", "fp8", "'fp16'"), ("build", "--precision", "int8", "'fp32'"),
    ("prune", "--method", "egpp", "'imp'"), ("prune", "--dist-backend", "bogus", "'gloo'"),
    ("prune", "--schedule", "linear", "'cosine'"), ("export", "--exporter", "onnx", "'dynamo'"),
])
def test_a_typo_in_a_choice_is_refused_listing_the_valid_ones(stage, flag, typo, valid, workdir, capsys):
    extra = ["--budget-ms", "5"] if stage == "check" else []
    code, err, _ = run_cli(stage, [workdir / "m.onnx", *extra, flag, typo], capsys)
    _one_error_line(code, err, 2, typo, valid, f"egp-{stage} --help")


def test_surgery_of_an_int64_input_model_is_unsupported_not_internal(workdir, capsys):
    model = _tiny_onnx(workdir / "int.onnx", TensorProto.INT64)
    code, err, _ = run_cli("surgery", [model, workdir / "o.onnx"], capsys)
    _one_error_line(code, err, 8, "int64")


def test_an_input_too_large_to_allocate_is_refused_before_allocating(workdir, capsys):
    w = np.ones((4, 3), np.float32)
    path = workdir / "huge.onnx"
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 100000, 100000, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 100000, 100000, 3])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph), path)
    code, err, _ = run_cli("surgery", [path, workdir / "o.onnx"], capsys)
    _one_error_line(code, err, 8, "GiB")  # one sample's tensors exceed the one-tensor limit (onnx_file.py)


def test_an_export_shape_too_large_to_allocate_is_refused_before_allocating(workdir, capsys):
    ckpt = _tiny_checkpoint(workdir / "m.pt")
    code, err, _ = run_cli("export", [ckpt, "-o", workdir / "m.onnx", "--no-surgery", "--input-shape", "1,100000,100000"],
                           capsys)
    _one_error_line(code, err, 8, "GiB", "--input-shape")


# ---------------------------------------------------------------- 9. argument errors: one line


@pytest.mark.parametrize("stage", COMMANDS)
def test_an_unknown_option_is_one_line_pointing_to_help(stage, workdir, capsys):
    code, err, out = run_cli(stage, [workdir / "m.onnx", "--no-such-flag"], capsys)
    _one_error_line(code, err, 2, "--no-such-flag", f"egp-{stage} --help")
    assert "╭" not in out + "".join(err)


@pytest.mark.parametrize("args", [["--budget-ms", "abc"], ["--no-such-flag", "--budget-ms", "5"], []])
def test_check_writes_its_json_when_the_command_line_is_bad(args, workdir, capsys):
    model = _tiny_onnx(workdir / "m.onnx")
    report = workdir / "r.json"
    code, err, _ = run_cli("check", [model, *args, "--json", report], capsys)
    _one_error_line(code, err, 2)
    data = json.loads(report.read_text())
    assert data["verdict"] == "could_not_measure" and data["exit_code"] == 2 and "--help" in data["message"]


def test_check_json_on_a_bad_command_line_never_replaces_the_model(workdir, capsys):
    model = _tiny_onnx(workdir / "m.onnx")
    before = model.read_bytes()
    code, _, _ = run_cli("check", [model, "--budget-ms", "abc", "--json", model], capsys)
    assert code == 2 and model.read_bytes() == before


# ---------------------------------------------------------------- 10. temp files of interrupted writes


def test_temp_files_of_a_killed_write_are_removed_by_the_next_write(tmp_path):
    from egp_deploy.io_utils import _HOST, write_bytes_atomic

    legacy = tmp_path / ".out.onnx.k2j3h4g5.tmp"  # what kill -9 left before temp names carried a pid
    dead = tmp_path / f".out.onnx.{_HOST}-{2**22 + 4321}.abcd1234.tmp"
    live = tmp_path / f".out.onnx.{_HOST}-{os.getpid()}.abcd1234.tmp"  # a write in progress
    other = tmp_path / ".other.onnx.k2j3h4g5.tmp"
    for p in (legacy, dead, live, other):
        p.write_bytes(b"partial")
    write_bytes_atomic(tmp_path / "out.onnx", b"model")
    assert not legacy.exists() and not dead.exists() and live.exists() and other.exists()
    assert (tmp_path / "out.onnx").read_bytes() == b"model"


def test_kill_9_mid_write_leaves_a_temp_that_the_next_write_removes(tmp_path):
    import subprocess
    import sys

    writer = ("import sys, time\nfrom egp_deploy.io_utils import atomic_path\n"
              "with atomic_path(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'half')\n"
              "    print('writing', flush=True)\n    time.sleep(120)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    proc = subprocess.Popen([sys.executable, "-c", writer, str(tmp_path / "out.onnx")], stdout=subprocess.PIPE,
                            env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.kill()  # SIGKILL: no finally block, no cleanup in the writer
        proc.wait(timeout=30)
    left = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1 and left[0].name.startswith(".out.onnx.")
    from egp_deploy.io_utils import write_bytes_atomic

    write_bytes_atomic(tmp_path / "out.onnx", b"model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_resume_into_a_run_folder_removes_its_stale_temps(tmp_path):
    from egp_deploy.io_utils import run_folder
    from egp_deploy.validation import PRUNE_RUN_FILES

    (tmp_path / "log.json").write_text("{}")
    stale = tmp_path / ".best.pt.x8y7z6w5.tmp"
    stale.write_bytes(b"half a checkpoint")
    with run_folder(tmp_path, resume=True, force=False, command="egp-prune", run_files=PRUNE_RUN_FILES):
        assert not stale.exists() and (tmp_path / "log.json").exists()


# ---------------------------------------------------------------- 11. the right code and words


def test_missing_external_data_names_onnx_reason(workdir, capsys):
    model = onnx.load(_tiny_onnx(workdir / "m.onnx"))
    onnx.save_model(model, workdir / "ext.onnx", save_as_external_data=True, location="ext.data", size_threshold=0)
    (workdir / "ext.data").unlink()
    code, err, _ = run_cli("surgery", [workdir / "ext.onnx", workdir / "o.onnx"], capsys)
    _one_error_line(code, err, 3, "ext.data")


def test_a_nan_weight_is_exit_6(workdir, capsys):
    weight = np.ones((4, 3), np.float32)
    weight[1, 2] = np.nan
    model = _tiny_onnx(workdir / "nan.onnx", weight=weight)
    code, err, _ = run_cli("surgery", [model, workdir / "o.onnx"], capsys)
    _one_error_line(code, err, 6, "'w'", "NaN")


def test_an_fp16_model_is_unsupported_in_words_that_are_true(workdir, capsys):
    model = _tiny_onnx(workdir / "h.onnx", TensorProto.FLOAT16)
    code, err, _ = run_cli("surgery", [model, workdir / "o.onnx"], capsys)
    _one_error_line(code, err, 8, "float16", "float32")
    assert "cannot run" not in err[0]


@pytest.mark.parametrize("content", [None, b"garbage, not an array"])
def test_a_bad_held_out_file_is_named_as_held_out(content, workdir, capsys):
    model = _tiny_onnx(workdir / "m.onnx")
    np.save(workdir / "cal.npy", np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32))
    held = workdir / "held.npy"
    if content is not None:
        held.write_bytes(content)
    code, err, _ = run_cli("surgery", [model, workdir / "o.onnx", "-c", workdir / "cal.npy", "--held-out", held], capsys)
    _one_error_line(code, err, 4, "--held-out")
    assert "calibration" not in err[0]


def test_a_two_input_model_is_exit_8_for_surgery_and_export(workdir, capsys):
    model = _tiny_onnx(workdir / "two.onnx", inputs=2)
    code, err, _ = run_cli("surgery", [model, workdir / "o.onnx"], capsys)
    _one_error_line(code, err, 8, "2 inputs")

    class TwoInputs(nn.Module):
        def forward(self, a, b):
            return a + b

    torch.export.save(torch.export.export(TwoInputs(), (torch.ones(1, 4), torch.ones(1, 4))), workdir / "two.pt2")
    code, err, _ = run_cli("export", [workdir / "two.pt2", "-o", workdir / "t.onnx", "--no-surgery"], capsys)
    _one_error_line(code, err, 8, "2 inputs")


def test_long_library_messages_are_cut_at_a_word():
    from egp_deploy.errors import first_words

    text = "onnxruntime failed: " + "word " * 100
    cut = first_words(text, 60)
    assert len(cut) <= 64 and cut.endswith(" ...") and cut[:-4].endswith("word")
    assert first_words("short\nsecond line") == "short"


# ---------------------------------------------------------------- 12. library warnings stay off the error


@pytest.mark.parametrize("verbose", [False, True])
def test_library_warnings_do_not_precede_the_one_line_error(verbose, workdir, capsys, monkeypatch):
    import egp_deploy.export as export_module
    from egp_deploy.errors import InputFileError as Refused

    def warn_then_fail(path):
        warnings.warn("/site-packages/torch/serialization.py:1234: something deprecated", UserWarning)
        raise Refused(f"{path} is not a model")

    monkeypatch.setattr(export_module, "detect_kind", warn_then_fail)
    args = [workdir / "m.pt", "-o", workdir / "m.onnx"] + (["--verbose"] if verbose else [])
    code, err, _ = run_cli("export", args, capsys)
    assert code == 3 and err[-1].startswith("error:")
    assert any("something deprecated" in line for line in err) == verbose
    if not verbose:
        assert len(err) == 1


# ---------------------------------------------------------------- help, --version


HELP_WORDS = {"prune": "Entropy-Guided Pruning", "export": "self-contained ONNX", "surgery": "Graph surgery",
              "build": "TensorRT engine", "bench": "interleaved", "check": "Latency gate"}


@pytest.mark.parametrize("stage", COMMANDS)
def test_help_shows_the_description_and_the_exit_codes(stage, capsys):
    code, err, out = run_cli(stage, ["--help"], capsys)
    text = " ".join(out.split())
    assert code == 0 and not err
    assert HELP_WORDS[stage] in text and "--version" in text
    if stage == "check":
        assert "0 within budget, 1 over budget, 2 could not measure" in text
    else:
        assert "Exit codes: 0 ok" in text and "6 non-finite" in text


@pytest.mark.parametrize("stage", COMMANDS)
def test_version_on_every_command(stage, capsys):
    from egp_deploy.cli._common import version

    code, err, out = run_cli(stage, ["--version"], capsys)
    assert code == 0 and out.strip() == f"egp-{stage} {version()}"


def test_help_lists_the_choices(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich shortens long metavars to fit a narrow terminal
    _, _, out = run_cli("bench", ["--help"], capsys)
    text = "".join(out.split())
    assert "ort-cpu|ort-cuda|ort-trt|trt|torch-cpu|torch-cuda" in text


def test_choices_match_the_library():
    from egp_deploy.cli._common import BACKEND_CHOICES
    from egp_deploy.runners import BACKENDS

    assert BACKEND_CHOICES == ("auto", *BACKENDS)


# ---------------------------------------------------------------- fuzz: every numeric option of every command



class _ReachedTheWork(BaseException):
    """Raised by the stubbed first piece of real work: every check before it passed."""


_WORK = {  # the first call that does real work, per command (stubbed: the fuzz checks what comes before)
    "bench": ("egp_deploy.bench", "benchmark_models"), "check": ("egp_deploy.bench", "benchmark_models"),
    "build": ("egp_deploy.build", "build_engine"), "export": ("egp_deploy.export", "load_source"),
    "surgery": ("egp_deploy.api", "_load_onnx"), "prune": ("egp_deploy.distributed", "init_distributed"),
}

_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-10**12, 10**12).map(str),
    st.sampled_from(["nan", "-nan", "inf", "-inf", "1e309", "-0", "0", "1", "0.5", "abc", "", "1,5", "0x10", "1e-320"]),
)


def _in_range(rng):
    """Values the option accepts, so that the fuzz also reaches the work (and sees nothing refused there)."""
    low = rng.low if rng.low is not None else 0
    high = rng.high if rng.high is not None else low + 1000
    if rng.integer:
        return st.integers(int(low) + rng.low_open, min(int(high), int(low) + 64)).map(str)
    return st.floats(low, high, exclude_min=rng.low_open, exclude_max=rng.high_open).map(repr)


def _command_options(stage: str) -> dict:
    """{name: (flag, range)} the flags of egp-STAGE are checked with (egp-surgery's surgery options too)."""
    return {**RANGES[stage], **(SURGERY_OPTIONS if stage == "surgery" else {})}


def test_fuzz_covers_every_numeric_option_of_every_command():
    import importlib
    import inspect
    import typing

    for stage in COMMANDS:
        func = getattr(importlib.import_module(f"egp_deploy.cli.{stage}"), stage)
        numeric = set()
        for name, param in inspect.signature(func, eval_str=True).parameters.items():
            kinds = typing.get_args(param.annotation) or (param.annotation,)
            if any(k in (int, float) for k in kinds):
                numeric.add(name)
        assert numeric and numeric <= set(_command_options(stage)), (stage, numeric - set(_command_options(stage)))


@pytest.mark.parametrize("stage", COMMANDS)
def test_fuzz_numeric_options(stage, tmp_path, monkeypatch, capsys):
    import importlib

    def reached(*_a, **_k):
        raise _ReachedTheWork

    module, name = _WORK[stage]
    monkeypatch.setattr(importlib.import_module(module), name, reached)
    monkeypatch.chdir(tmp_path)
    model = _tiny_checkpoint(tmp_path / "m.pt") if stage in ("prune", "export") else _tiny_onnx(tmp_path / "m.onnx")
    base = {"check": [model, "--budget-ms", "50"], "export": [model, "-o", tmp_path / "o.onnx"],
            "surgery": [model, tmp_path / "o.onnx"], "prune": [model, "-o", tmp_path / "run"]}.get(stage, [model])
    ranges = {flag: rng for flag, rng in _command_options(stage).values() if flag}
    option = st.sampled_from(sorted(ranges)).flatmap(lambda flag: st.tuples(st.just(flag), st.one_of(_VALUES, _in_range(ranges[flag]))))

    @settings(max_examples=16, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(st.lists(option, min_size=1, max_size=3))
    def one_command_line(options):
        args = [*base] + [a for flag, value in options for a in (f"{flag}={value}",)]
        before = _files(tmp_path)
        try:
            code, err, out = run_cli(stage, args, capsys, timeout_s=20)
        except _ReachedTheWork:
            capsys.readouterr()
            outcomes.append(0)
            return  # every option was in range (exit 0 would follow)
        outcomes.append(code)
        assert code == 2, (args, code, err)
        assert len(err) == 1 and err[0].startswith("error:") and "Traceback" not in out, (args, err)
        assert _files(tmp_path) == before, args

    outcomes: list[int] = []
    one_command_line()
    assert len(outcomes) >= 12 and set(outcomes) <= {0, 2}, outcomes
    assert 0 in outcomes and 2 in outcomes, outcomes  # both sides of the check were exercised


def test_export_whose_surgery_fails_writes_none_of_its_outputs(workdir, capsys, monkeypatch):
    import egp_deploy.surgery as surgery
    from egp_deploy.errors import VerificationError

    def refuse(*_a, **_k):
        raise VerificationError("the surgered graph differs from the exported one")

    monkeypatch.setattr(surgery, "optimize", refuse)
    ckpt = _tiny_checkpoint(workdir / "m.pt")
    np.save(workdir / "cal.npy", np.random.default_rng(0).standard_normal((8, 1, 32, 32)).astype(np.float32))
    before = _files(workdir)
    code, err, _ = run_cli("export", [ckpt, "-o", workdir / "m.egp.onnx", "--calibration", workdir / "cal.npy",
                                      "--samples", "4"], capsys, timeout_s=120)
    assert code == 7 and err[-1].startswith("error:"), err
    assert _files(workdir) == before  # neither m.onnx nor m.egp.onnx, the report or a temp file


@pytest.mark.parametrize("field,value", [("min_duration_s", float("nan")), ("min_duration_s", float("inf")),
                                         ("warmup_ms", float("nan")), ("min_iterations", 0)])
def test_library_bench_settings_refuse_what_would_never_end(field, value):
    from egp_deploy.bench import BenchSettings
    from egp_deploy.errors import UsageError

    with pytest.raises(UsageError):
        BenchSettings(**{field: value}).validate()


def test_check_writes_its_json_when_interrupted(workdir, capsys, monkeypatch):
    import egp_deploy.bench as bench

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "benchmark_models", interrupted)
    model = _tiny_onnx(workdir / "m.onnx")
    code, err, _ = run_cli("check", [model, "--budget-ms", "5", "--json", workdir / "r.json"], capsys)
    _one_error_line(code, err, 130, "interrupted")
    assert json.loads((workdir / "r.json").read_text())["exit_code"] == 130


@pytest.mark.parametrize("arch,kwargs", [("vit_tiny", {}), ("resnet18", {"width": 4})])
def test_bundled_architectures_as_dynamic_pt2_are_not_refused(arch, kwargs, tmp_path):
    # a dynamic batch makes torch write shape expressions (sympy srepr): they must pass the check
    from egp_deploy.archs import create_model

    model = create_model(arch, num_classes=10, in_channels=1, **kwargs).eval()
    x = torch.randn(2, 1, 32, 32)
    name = next(iter(__import__("inspect").signature(model.forward).parameters))
    ep = torch.export.export(model, (x,), dynamic_shapes={name: {0: torch.export.Dim("batch", min=1, max=64)}})
    torch.export.save(ep, tmp_path / "m.pt2")
    loaded = load_exported_program(tmp_path / "m.pt2")
    torch.testing.assert_close(loaded.module()(x), ep.module()(x))
