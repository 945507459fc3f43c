"""Formats that are code load only with the opt-in flag, and without it nothing of the file runs.

A TorchScript archive is a program: torch.jit.load runs its __setstate__ methods and its graph can
call any operator (aten::from_file maps any file writable); the refusal comes before torch.jit.load.
A data plugin recorded in a checkpoint is a module to import named by the file: it is used only
when the user names it."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import egp_deploy
from egp_deploy.cli._common import invoke
from egp_deploy.errors import InputFileError
from egp_deploy.export import detect_kind, load_source
from test_reliability import _tiny_checkpoint


class _WritesFiles(nn.Module):
    """Loading it writes ``marker`` (from __setstate__); calling it writes ``marker.forward``."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.written = 0

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.marker = state[0]
        self.training = state[1]
        self.written = int(torch.from_file(self.marker, shared=True, size=4, dtype=torch.uint8).fill_(65).sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        written = torch.from_file(self.marker + ".forward", shared=True, size=4, dtype=torch.uint8).fill_(66)
        return x * 2 + written.sum() * 0  # used, so the TorchScript optimizer keeps the write


@pytest.fixture
def evil_torchscript(tmp_path) -> tuple[Path, list[Path]]:
    marker = tmp_path / "LOADED"
    path = tmp_path / "writes_files.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated: still what such a file is made with
        torch.jit.script(_WritesFiles(str(marker))).save(str(path))
    return path, [marker, Path(f"{marker}.forward")]


@pytest.fixture
def jit_loads(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = torch.jit.load

    def recording(f, *args, **kwargs):
        calls.append(str(f))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch.jit, "load", recording)
    return calls


def test_torchscript_is_refused_by_the_api_before_it_loads(evil_torchscript, jit_loads, tmp_path):
    path, markers = evil_torchscript
    assert detect_kind(path) == "torchscript"
    calls = [lambda: load_source(path),
             lambda: egp_deploy.export(path, tmp_path / "out.onnx", input_shape=(1, 4, 4)),
             lambda: egp_deploy.deploy(path, tmp_path / "out.egp.onnx", input_shape=(1, 4, 4), calibration="random")]
    for call in calls:
        with pytest.raises(InputFileError) as info:
            call()
        message = str(info.value)
        assert info.value.exit_code == 3 and "TorchScript" in message and "--unsafe-pickle" in message
        assert "\n" not in message
    assert jit_loads == [] and not any(m.exists() for m in markers)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_egp_export_refuses_torchscript_with_one_line_exit_3(evil_torchscript, jit_loads, tmp_path, capsys):
    from egp_deploy.cli import export as cli

    path, markers = evil_torchscript
    code = invoke(cli.app, "egp-export", [str(path), "--input-shape", "1,4,4", "-o", str(tmp_path / "out.egp.onnx")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 3 and len(err) == 1 and err[0].startswith("error:") and "--unsafe-pickle" in err[0], err
    assert jit_loads == [] and not any(m.exists() for m in markers)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_torchscript_loads_with_the_flag(evil_torchscript):
    path, (loaded, called) = evil_torchscript
    source = load_source(path, unsafe_pickle=True)
    assert source.kind == "torchscript"
    assert loaded.read_bytes() == b"AAAA"  # the fixture is a real program: loading it ran __setstate__
    assert torch.equal(source.module(torch.ones(2)), torch.full((2,), 2.0)) and called.read_bytes() == b"BBBB"


@pytest.fixture
def plugin_checkpoint(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A checkpoint recording a data plugin whose import creates a marker file."""
    marker = tmp_path / "IMPORTED"
    (tmp_path / "plugin_that_writes.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef data():\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = _tiny_checkpoint(tmp_path / "model.pt")
    obj = torch.load(ckpt, weights_only=True)
    obj["metadata"]["data"] = "plugin:plugin_that_writes:data"
    torch.save(obj, ckpt)
    return ckpt, marker


def test_a_plugin_recorded_in_a_checkpoint_is_not_imported(plugin_checkpoint, tmp_path, capsys):
    from egp_deploy.cli import export as cli

    ckpt, marker = plugin_checkpoint
    before = sorted(p.name for p in tmp_path.iterdir())
    for call in (lambda: egp_deploy.deploy(ckpt, tmp_path / "out.egp.onnx"),
                 lambda: egp_deploy.prune(ckpt, tmp_path / "run", iterations=1, epochs=0)):
        with pytest.raises(InputFileError) as info:
            call()
        assert info.value.exit_code == 3 and "plugin:plugin_that_writes:data" in str(info.value)
    code = invoke(cli.app, "egp-export", [str(ckpt), "-o", str(tmp_path / "out.egp.onnx")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 3 and len(err) == 1 and "--calibration plugin:plugin_that_writes:data" in err[0], err
    assert not marker.exists() and sorted(p.name for p in tmp_path.iterdir()) == before
