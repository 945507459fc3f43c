"""What every stage's command line shares: its program name, and one exit code per error kind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from egp_deploy.cli import STAGES

HERE = Path(__file__).parent


def _run(*args: str) -> subprocess.CompletedProcess:
    # the tools import egp_deploy from the checkout they sit in, not from wherever it is installed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]), COLUMNS="100")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("stage", STAGES)
def test_usage_line_names_the_console_script(stage):
    # under the dispatcher click used to derive "python -m egp_deploy.cli.egp-prune"
    for entry in (["-m", "egp_deploy.cli", stage], ["-m", f"egp_deploy.cli.{stage}"]):
        r = _run(*entry, "--help")
        assert r.returncode == 0, r.stderr
        usage = next(line for line in r.stdout.splitlines() if "Usage:" in line)
        assert usage.split()[:2] == ["Usage:", f"egp-{stage}"], usage


def test_unknown_architecture_is_exit_8_from_every_command_that_takes_one(tmp_path):
    from egp_deploy.archs import create_model
    from egp_deploy.checkpoint import checkpoint_from_model, save_checkpoint
    from egp_deploy.errors import UnsupportedError

    ckpt = tmp_path / "nosuch.pt"  # weights of a real model under an unknown architecture name
    save_checkpoint(ckpt, checkpoint_from_model(create_model("resnet18", width=4, in_channels=1), "nosuch",
                                                {"width": 4}, (1, 32, 32), 10, {"data": "digits"}))
    root = HERE.parent
    commands = {
        "egp-prune NAME": ["-m", "egp_deploy.cli", "prune", "nosuch", "-o", str(tmp_path / "p1")],
        "egp-prune CHECKPOINT": ["-m", "egp_deploy.cli", "prune", str(ckpt), "-o", str(tmp_path / "p2")],
        "egp-export CHECKPOINT": ["-m", "egp_deploy.cli", "export", str(ckpt), "-o", str(tmp_path / "m.onnx")],
        "reproduce --archs": [str(root / "tools" / "reproduce.py"), "--archs", "nosuch", "--out", str(tmp_path / "r")],
        "egp_vs_imp --arch": [str(root / "tools" / "egp_vs_imp.py"), "--arch", "nosuch", "--out", str(tmp_path / "e")],
    }
    for what, args in commands.items():
        r = _run(*args)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == UnsupportedError.exit_code == 8, (what, r.returncode, r.stderr)
        assert len(lines) == 1 and lines[0].startswith("error:") and "nosuch" in lines[0], (what, r.stderr)
    assert not any(p.is_file() for p in tmp_path.rglob("*") if p != ckpt)  # nothing written
