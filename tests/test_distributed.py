"""egp-prune under torchrun: 2 CPU processes with gloo give exactly the single-process result.

With --epochs 0 (no fine-tuning) a run is fully determined by the entropy statistics, the
allocation and the masks, so the logs and weights of a 2-rank run must equal a 1-process run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from egp_deploy.archs import create_model
from egp_deploy.checkpoint import checkpoint_from_model, save_checkpoint

HERE = Path(__file__).parent
PLUGIN = "plugin:plugin_data:small_digits"


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _prune(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "egp_deploy.cli", "prune", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "egp_deploy.cli", "prune", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)


@pytest.fixture(scope="module")
def start_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    kwargs = {"num_classes": 10, "in_channels": 1, "width": 4}
    model = create_model("resnet18", **kwargs)
    # BN statistics that are not the identity, so activations are not trivially symmetric
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("start") / "start.pt"
    save_checkpoint(path, checkpoint_from_model(model, "resnet18", kwargs, (1, 32, 32), 10, {"data": PLUGIN}))
    return path


def _common(start: Path, out: Path, n: int) -> list[str]:
    return [str(start), "-o", str(out), "--data", PLUGIN, "-n", str(n), "--epochs", "0", "-q", "--batch-size", "32"]


def _state(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def test_two_ranks_equal_single_process_and_resume(start_ckpt, tmp_path):
    single = _prune(_common(start_ckpt, tmp_path / "single", 3))
    assert single.returncode == 0, single.stderr[-2000:]

    # distributed: 1 iteration, then resume to 3, still under torchrun
    first = _prune(_common(start_ckpt, tmp_path / "dist", 1), nproc=2)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (tmp_path / "dist" / "iter_01.pt").is_file() and not (tmp_path / "dist" / "iter_02.pt").exists()
    resumed = _prune(_common(start_ckpt, tmp_path / "dist", 3) + ["--resume"], nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    log_s = json.loads((tmp_path / "single" / "log.json").read_text())
    log_d = json.loads((tmp_path / "dist" / "log.json").read_text())
    assert log_d["world_size"] == 2 and log_s["world_size"] == 1
    assert [r["iteration"] for r in log_d["iterations"]] == [0, 1, 2, 3]
    for rs, rd in zip(log_s["iterations"], log_d["iterations"]):
        assert rd["entropy"] == rs["entropy"]  # summed counts: bit-identical entropies
        assert rd["sites"] == rs["sites"]
        assert rd["test_acc"] == rs["test_acc"] and rd["val_acc"] == rs["val_acc"]
        assert rd.get("allocation") == rs.get("allocation")
        assert rd["sparsity_prunable"] == rs["sparsity_prunable"]
    assert any(r["sparsity_prunable"] > 0.8 for r in log_d["iterations"])
    sd_s, sd_d = _state(tmp_path / "single" / "iter_03.pt"), _state(tmp_path / "dist" / "iter_03.pt")
    for k in sd_s:
        assert torch.equal(sd_s[k], sd_d[k]), k  # identical masks and weights


def test_failing_rank_stops_run_and_keeps_last_checkpoint(start_ckpt, tmp_path):
    ok = _prune(_common(start_ckpt, tmp_path / "run", 1), nproc=2)
    assert ok.returncode == 0, ok.stderr[-2000:]
    before = (tmp_path / "run" / "iter_01.pt").read_bytes()
    bad = _common(start_ckpt, tmp_path / "run", 3) + ["--resume", "--data", "plugin:plugin_data:small_digits_failing_on_rank1"]
    failed = _prune(bad, nproc=2)
    assert failed.returncode != 0
    assert "simulated unreadable sample on rank 1" in failed.stderr
    assert "(rank 1)" in failed.stderr
    assert (tmp_path / "run" / "iter_01.pt").read_bytes() == before
    assert not (tmp_path / "run" / "iter_02.pt").exists()
    assert json.loads((tmp_path / "run" / "log.json").read_text())["iterations"][-1]["iteration"] == 1
