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
    env = dict(os.environ, PYTHONPATH=str(HERE), COLUMNS="100")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("stage", STAGES)
def test_usage_line_names_the_console_script(stage):
    # under the dispatcher click used to derive "python -m egp_deploy.cli.egp-prune"
    for entry in (["-m", "egp_deploy.cli", stage], ["-m", f"egp_deploy.cli.{stage}"]):
        r = _run(*entry, "--help")
        assert r.returncode == 0, r.stderr
        usage = next(line for line in r.stdout.splitlines() if "Usage:" in line)
        assert usage.split()[:2] == ["Usage:", f"egp-{stage}"], usage
