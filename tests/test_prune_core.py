"""Masks through fine-tuning, frozen layers, IMP, a tiny end-to-end run, and egp-prune's bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from egp_deploy.archs import create_model
from egp_deploy.checkpoint import checkpoint_from_model, load_checkpoint, save_checkpoint
from egp_deploy.data import load_data, make_loader
from egp_deploy.prune import masks as M
from egp_deploy.prune.loop import PruneConfig, run_pruning
from egp_deploy.prune.sites import prunable_layers
from egp_deploy.prune.train import TrainConfig, fit

HERE = Path(__file__).parent
SMALL = "plugin:plugin_data:small_digits"


@pytest.fixture(scope="module")
def small_bundle():
    return load_data(SMALL)


def _tiny(seed=0):
    torch.manual_seed(seed)
    kw = {"num_classes": 10, "in_channels": 1, "width": 4}
    return create_model("resnet18", **kw), kw


def test_masked_weights_stay_zero_through_sgd_with_momentum_and_decay(small_bundle):
    model, _ = _tiny()
    layers = prunable_layers(model)
    masks = M.full_masks(model, layers)
    params = dict(model.named_parameters())
    for k in masks:
        masks[k] = M.prune_smallest(params[k], masks[k], params[k].numel() // 2)
    M.apply_masks(model, masks)
    cfg = TrainConfig(epochs=2, lr=0.1, momentum=0.9, weight_decay=1e-3, batch_size=32)
    fit(model, lambda e: make_loader(small_bundle.train, 32, True, seed=e), cfg, masks=masks, show_progress=False)
    for k, m in masks.items():
        w = dict(model.named_parameters())[k]
        assert torch.all(w[~m] == 0), k
        assert torch.any(w[m] != 0), k  # the kept weights did train


def test_prune_smallest_removes_exactly_the_n_smallest():
    w = torch.tensor([[0.5, -0.1, 0.3], [-0.05, 0.9, 0.2]])
    m = torch.ones_like(w, dtype=torch.bool)
    new = M.prune_smallest(w, m, 3)
    assert new.tolist() == [[True, False, True], [False, True, False]]
    assert M.prune_smallest(w, new, 10).sum() == 0  # asking for more than is left empties it


def test_global_l1_picks_smallest_across_layers():
    params = {"a": torch.tensor([0.1, 5.0]), "b": torch.tensor([0.2, 0.05, 3.0])}
    masks = {k: torch.ones_like(v, dtype=torch.bool) for k, v in params.items()}
    new = M.prune_global_smallest(params, masks, 3)
    assert new["a"].tolist() == [False, True] and new["b"].tolist() == [False, False, True]


def _ckpt(tmp_path, small_bundle):
    model, kw = _tiny()
    # one layer emptied up front: its activation sees a constant, so EGP must freeze it
    with torch.no_grad():
        model.layer2[0].conv1.weight.zero_()
    path = tmp_path / "start.pt"
    save_checkpoint(path, checkpoint_from_model(model, "resnet18", kw, small_bundle.input_shape, 10, {"data": SMALL}))
    return load_checkpoint(path)


def test_egp_run_end_to_end_freezes_collapsed_layers(tmp_path, small_bundle):
    start = _ckpt(tmp_path, small_bundle)
    cfg = PruneConfig(iterations=2, finetune=TrainConfig(epochs=1, batch_size=32))
    res = run_pruning(start, small_bundle, cfg, tmp_path / "egp", progress=False)
    recs = res.log["iterations"]
    assert [r["iteration"] for r in recs] == [0, 1, 2]
    assert "layer2.0.relu1" in recs[0]["zero_entropy_sites"]
    for r in recs[1:]:
        assert r["allocation"]["prune"]["layer2.0.conv1"] == 0
        assert "layer2.0.conv1" in r["allocation"]["frozen"]
    # nominal sparsity of the prunable weights: 1 - 0.5^i (up to rounding of the per-layer budget)
    assert recs[1]["sparsity_prunable"] == pytest.approx(0.5, abs=0.01)
    assert recs[2]["sparsity_prunable"] == pytest.approx(0.75, abs=0.01)
    ck = torch.load(tmp_path / "egp" / "iter_02.pt", weights_only=True)
    assert ck["metadata"]["method"] == "egp" and ck["metadata"]["iteration"] == 2
    assert set(ck["metadata"]["entropy"]) == set(recs[0]["entropy"]) and len(recs[0]["entropy"]) == 17
    assert (tmp_path / "egp" / "entropy.png").stat().st_size > 0
    assert json.loads((tmp_path / "egp" / "log.json").read_text())["best_iteration"] == 2


def test_imp_prunes_all_layers_globally(tmp_path, small_bundle):
    start = _ckpt(tmp_path, small_bundle)
    cfg = PruneConfig(method="imp", iterations=1, finetune=TrainConfig(epochs=0))
    res = run_pruning(start, small_bundle, cfg, tmp_path / "imp", progress=False)
    rec = res.log["iterations"][1]
    assert rec["sparsity_all"] == pytest.approx(0.5 + 0.5 * res.log["iterations"][0]["sparsity_all"], abs=0.01)
    sd = torch.load(tmp_path / "imp" / "iter_01.pt", weights_only=True)["state_dict"]
    assert (sd["fc.weight"] == 0).any()  # IMP also prunes the classifier / shortcuts, EGP never does
    assert (sd["layer2.0.downsample.0.weight"] == 0).any()


def test_tolerance_keeps_best_within_and_stops(tmp_path, small_bundle):
    start = _ckpt(tmp_path, small_bundle)
    # lr so high that fine-tuning scrambles accuracy; tolerance 0: any drop below the start stops the run
    cfg = PruneConfig(iterations=4, tolerance=0.0, finetune=TrainConfig(epochs=1, lr=5.0, batch_size=32))
    res = run_pruning(start, small_bundle, cfg, tmp_path / "tol", progress=False)
    recs = res.log["iterations"]
    ref = recs[0]["test_acc"]
    within = [r for r in recs if r["test_acc"] >= ref]
    if "stopped" in res.log:
        assert recs[-1]["test_acc"] < ref  # stopped by the one that fell out
        assert all(r["test_acc"] >= ref for r in recs[:-1])  # and not earlier
    else:
        assert len(recs) == 5 and all(r["test_acc"] >= ref for r in recs)
    best = max(within, key=lambda r: r["sparsity_prunable"])
    assert res.best_iteration == best["iteration"]
    kept = torch.load(tmp_path / "tol" / "best.pt", weights_only=True)["metadata"]
    assert kept["iteration"] == best["iteration"] and kept["test_acc"] >= ref


def _cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(HERE))
    return subprocess.run([sys.executable, "-m", "egp_deploy.cli", "prune", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=120)


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["nosuch_arch"], 8, "neither a checkpoint"),
        (["resnet18", "--data", "folder:/nonexistent"], 4, "image folder not found"),
        (["resnet18", "--data", "cifar10:/nonexistent"], 4, "CIFAR-10 folder not found"),
        (["resnet18", "--data", "plugin:no_such_module:fn"], 4, "cannot import data plugin"),
        (["resnet18", "--data", "plugin:plugin_data:not_a_tuple"], 4, "must return"),
        (["resnet18", "--method", "magic"], 2, "--method"),
        (["resnet18", "--rate", "1.5"], 2, "--rate"),
    ],
)
def test_cli_bad_input_is_one_line_with_distinct_code(tmp_path, args, code, words):
    r = _cli(*args, "-o", str(tmp_path / "out"), "-q", "--dense-epochs", "0", "-n", "0")
    assert r.returncode == code, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not list((tmp_path / "out").glob("*.pt")) if (tmp_path / "out").exists() else True


def test_cli_bad_checkpoints(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(300))
    r = _cli(str(junk), "-o", str(tmp_path / "o1"), "-q")
    assert r.returncode == 3 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    sd = tmp_path / "sd.pt"
    torch.save(create_model("resnet18", width=4).state_dict(), sd)
    r = _cli(str(sd), "-o", str(tmp_path / "o2"), "-q")
    assert r.returncode == 3 and "not an egp-deploy checkpoint" in r.stderr
    # weights of one width declared as another: does not fit the architecture
    model, kw = _tiny()
    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, checkpoint_from_model(model, "resnet18", {**kw, "width": 8}, (1, 32, 32), 10, {"data": "digits"}))
    r = _cli(str(bad), "-o", str(tmp_path / "o3"), "-q")
    assert r.returncode == 3 and "do not fit" in r.stderr
    assert not (tmp_path / "o3").exists() or not list((tmp_path / "o3").iterdir())


def test_cli_non_finite_loss(tmp_path):
    model, kw = _tiny()
    start = tmp_path / "s.pt"
    save_checkpoint(start, checkpoint_from_model(model, "resnet18", kw, (1, 32, 32), 10, {"data": SMALL}))
    r = _cli(str(start), "-o", str(tmp_path / "o"), "--data", SMALL, "-q", "-n", "1", "--epochs", "1", "--lr", "1e30")
    assert r.returncode == 6 and "non-finite" in r.stderr and "Traceback" not in r.stderr
    # the finished iteration 0 stays; no half-written iteration 1
    assert (tmp_path / "o" / "iter_00.pt").is_file() and not (tmp_path / "o" / "iter_01.pt").exists()
    assert not list((tmp_path / "o").glob("*.tmp")) and not list((tmp_path / "o").glob(".*.tmp"))
