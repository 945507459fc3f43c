"""Where outputs land and what reaches the terminal: devices and FIFOs written into in place, a full
disk as its own one-line error (exit 9) with nothing half-written, Ctrl-C saying ``interrupted``,
and library chatter (onnxruntime's telemetry and kernel errors, terminal codes in library messages,
hard-wrapped lines) kept off the terminal."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from egp_deploy.cli._common import invoke
from egp_deploy.errors import OutputError, first_words
from egp_deploy.io_utils import atomic_files, atomic_path, write_json_atomic

HERE = Path(__file__).parent


def _tiny_onnx(path: Path, reshape_to: list[int] | None = None) -> Path:
    """x (1, 4) -> Gemm -> Relu; with ``reshape_to`` a Reshape that fails when run (not when loaded)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4] if reshape_to is None else reshape_to)
    inits = [numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")]
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y" if reshape_to is None else "r"])]
    if reshape_to is not None:
        inits.append(numpy_helper.from_array(np.array(reshape_to, np.int64), "s"))
        nodes.append(helper.make_node("Reshape", ["r", "s"], ["y"]))
    graph = helper.make_graph(nodes, "tiny", [x], [y], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _cli(stage: str, args, capsys) -> tuple[int, list[str], str]:
    import importlib

    module = importlib.import_module(f"egp_deploy.cli.{stage}")
    code = invoke(module.app, f"egp-{stage}", [str(a) for a in args])
    cap = capsys.readouterr()
    return code, [ln for ln in cap.err.splitlines() if ln.strip()], cap.out


# ---------------------------------------------------------------- special files: written into, never replaced
def _fifo_reader(fifo: Path) -> tuple[threading.Thread, list[bytes]]:
    got: list[bytes] = []

    def read():
        with open(fifo, "rb") as f:
            got.append(f.read())

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, got


def test_a_fifo_output_receives_the_file_and_stays_a_fifo(tmp_path):
    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    thread, got = _fifo_reader(fifo)
    write_json_atomic(fifo, {"verdict": "pass", "ms": 1.5})
    thread.join(10)
    assert json.loads(got[0]) == {"verdict": "pass", "ms": 1.5}
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert _files(tmp_path) == ["report.fifo"]  # no temp file beside it, none left anywhere here


def test_a_group_of_outputs_with_a_fifo_commits_it_in_place(tmp_path):
    fifo, regular = tmp_path / "plot.fifo", tmp_path / "model.onnx"
    os.mkfifo(fifo)
    thread, got = _fifo_reader(fifo)
    with atomic_files() as staged:
        staged.write_bytes(regular, b"model")
        staged.write_bytes(fifo, b"png bytes")
    thread.join(10)
    assert got == [b"png bytes"] and regular.read_bytes() == b"model"
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and _files(tmp_path) == ["model.onnx", "plot.fifo"]


def _null_device(tmp_path: Path) -> Path:
    """A private character device with /dev/null's numbers (the real /dev/null is never put at risk)."""
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, OSError) as e:
        pytest.skip(f"cannot create a device node here ({e})")
    return node


def test_a_device_output_stays_a_device(tmp_path, capsys):
    null = _null_device(tmp_path)
    write_json_atomic(null, {"x": 1})
    with atomic_path(null) as tmp:
        tmp.write_bytes(b"a plot")
    assert stat.S_ISCHR(os.stat(null).st_mode)
    # egp-check writes its --json on every exit path: here after a model it could not measure
    code, err, _ = _cli("check", [tmp_path / "missing.onnx", "--budget-ms", "5", "--json", null], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    assert stat.S_ISCHR(os.stat(null).st_mode) and _files(tmp_path) == ["null"]


# ---------------------------------------------------------------- a full disk: exit 9, one line, nothing half-written
def _disk_full_on_temp_writes(monkeypatch, code=errno.ENOSPC):
    real = Path.write_bytes

    def write_bytes(self, data):
        if self.name.endswith(".tmp"):
            raise OSError(code, os.strerror(code), str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_a_full_disk_is_an_output_error_naming_the_file_not_its_temp(tmp_path, monkeypatch, code):
    _disk_full_on_temp_writes(monkeypatch, code)
    target = tmp_path / "report.json"
    with pytest.raises(OutputError) as e:
        write_json_atomic(target, {"a": 1})
    assert e.value.exit_code == 9 and str(e.value).startswith(f"cannot write {target}: {os.strerror(code)}")
    with pytest.raises(OutputError, match="model.onnx"):
        with atomic_files() as staged:
            with open(staged.path(tmp_path / "ok.json"), "wb") as f:  # this one fits
                f.write(b"{}")
            staged.path(tmp_path / "model.onnx").write_bytes(b"x")  # written by the block itself: the disk is full
    assert _files(tmp_path) == []  # no temp, and the group's other output not committed either


def test_a_rename_refused_by_a_read_only_file_system_is_an_output_error(tmp_path, monkeypatch):
    def read_only(*_a):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "replace", read_only)
    with pytest.raises(OutputError, match="Read-only file system"):
        write_json_atomic(tmp_path / "r.json", {})
    assert _files(tmp_path) == []


def test_egp_surgery_on_a_full_disk_exits_9_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    model = _tiny_onnx(tmp_path / "m.onnx")
    before = _files(tmp_path)
    _disk_full_on_temp_writes(monkeypatch)
    code, err, _ = _cli("surgery", [model, tmp_path / "out.onnx", "-q", "-n", "8", "-c", "random",
                                    "--report", tmp_path / "out.json"], capsys)
    assert code == OutputError.exit_code == 9, err
    assert len(err) == 1 and err[0].startswith("error: cannot write") and "No space left on device" in err[0], err
    assert "internal error" not in err[0] and ".tmp" not in err[0]
    assert _files(tmp_path) == before


def test_a_write_error_met_outside_the_writers_is_exit_9_too(tmp_path, monkeypatch, capsys):
    from egp_deploy import api

    def quota(*_a, **_k):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/somewhere/cache")

    monkeypatch.setattr(api, "surgery_file", quota)
    code, err, _ = _cli("surgery", [_tiny_onnx(tmp_path / "m.onnx"), tmp_path / "o.onnx", "-q"], capsys)
    assert code == 9 and err == [f"error: cannot write /somewhere/cache: {os.strerror(errno.EDQUOT)}; "
                                 "nothing was written there"], err


# ---------------------------------------------------------------- Ctrl-C
def test_ctrl_c_in_a_command_prints_interrupted_and_exits_130(tmp_path, monkeypatch, capsys):
    from egp_deploy import api

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "surgery_file", interrupted)
    code, err, _ = _cli("surgery", [_tiny_onnx(tmp_path / "m.onnx"), tmp_path / "o.onnx", "-q"], capsys)
    assert code == 130 and err == ["interrupted"], err


def _run(args, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]), **env)
    full.pop("ORT_DISABLE_TELEMETRY", None)  # what the package sets for itself is under test
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full, timeout=120)


def test_sigint_to_a_running_command_prints_interrupted(tmp_path):
    import signal
    import time

    script = ("import sys, time; import egp_deploy.api as api\n"
              "def slow(*a, **k):\n    print('started', flush=True); time.sleep(60)\n"
              "api.surgery_file = slow\n"
              "from egp_deploy.cli.surgery import main\nsys.argv = ['egp-surgery', sys.argv[1], sys.argv[2], '-q']\nmain()\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(_tiny_onnx(tmp_path / "m.onnx")), str(tmp_path / "o.onnx")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(HERE.parent)))
    assert proc.stdout.readline().strip() == "started"
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and [ln for ln in err.splitlines() if ln.strip()] == ["interrupted"], err


# ---------------------------------------------------------------- library output on the terminal
def test_onnxruntime_prints_nothing_itself_with_an_unwritable_home_or_a_failing_kernel(tmp_path):
    home = tmp_path / "home_is_a_file"
    home.write_text("")
    bad = _tiny_onnx(tmp_path / "bad.onnx", reshape_to=[3])  # loads, then fails in Reshape when run
    r = _run(["-m", "egp_deploy.cli", "bench", str(bad), "--duration", "0.1"], HOME=str(home))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode not in (0, 1) and len(lines) == 1 and lines[0].startswith("error: onnxruntime failed"), r.stderr
    assert "\x1b" not in r.stderr + r.stdout  # no telemetry line, no "[E:onnxruntime ...]" in colour


def test_terminal_codes_in_library_messages_never_reach_ours():
    torch_onnx = "Failed to export the model with torch.export. \x1b[96mThis is step 1/3\x1b[0m of exporting"
    assert first_words(torch_onnx) == "Failed to export the model with torch.export. This is step 1/3 of exporting"


def test_a_warning_is_one_line_whatever_the_width(tmp_path, capsys):
    from egp_deploy.cli._common import console

    long = "warning: " + " ".join(f"word{i}" for i in range(60))  # ~400 characters
    console.print(long)
    assert capsys.readouterr().err.strip() == long


def test_a_checkpoint_written_on_a_full_disk_is_an_output_error(tmp_path, monkeypatch):
    import builtins

    import torch

    from egp_deploy import checkpoint
    from egp_deploy.checkpoint import Checkpoint, save_checkpoint

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    real_open = builtins.open
    monkeypatch.setattr(checkpoint, "open", lambda path, mode="r": real_open("/dev/full", mode), raising=False)
    ckpt = Checkpoint("resnet18", {}, {"w": torch.zeros(50_000)}, (1, 8, 8), 10, {})
    with pytest.raises(OutputError, match="No space left on device"):
        save_checkpoint(tmp_path / "best.pt", ckpt)
    assert _files(tmp_path) == []


def test_a_socket_output_is_refused_before_any_work(tmp_path):
    import socket

    from egp_deploy.errors import UsageError
    from egp_deploy.validation import check_outputs

    sock_path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        with pytest.raises(UsageError, match="is a socket"):
            check_outputs([], {"--json": sock_path})
