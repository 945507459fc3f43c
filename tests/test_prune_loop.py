"""The EGP/IMP iteration loop (egp_deploy/prune/loop.py) on a small slice of digits.

A width-4 ResNet-18 (17 sites) and tests/plugin_data.py:small_digits (192/96/96 samples) keep
each run to a few seconds. (tests/test_prune_core.py has an end-to-end run with a pre-emptied
layer, an IMP run and a tolerance run driven by a huge learning rate; here: resume identity,
the log schema, the frozen-layer invariant on every iteration, and the tolerance logic with a
scripted accuracy sequence.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from egp_deploy.archs import create_model
from egp_deploy.checkpoint import checkpoint_from_model, load_checkpoint, save_checkpoint
from egp_deploy.data import load_data, make_loader
from egp_deploy.prune import loop as L
from egp_deploy.prune.entropy import measure_entropy
from egp_deploy.prune.loop import PruneConfig, run_pruning
from egp_deploy.prune.train import TrainConfig

HERE = Path(__file__).parent
SMALL = "plugin:plugin_data:small_digits"
KW = {"num_classes": 10, "in_channels": 1, "width": 4}


@pytest.fixture(scope="module")
def bundle():
    return load_data(SMALL)


@pytest.fixture(scope="module")
def start(bundle, tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("resnet18", **KW)
    for m in model.modules():  # non-trivial BN statistics: activations are not symmetric around 0
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("start") / "start.pt"
    save_checkpoint(path, checkpoint_from_model(model, "resnet18", KW, bundle.input_shape, 10, {"data": SMALL}))
    return load_checkpoint(path)


def cfg(**kw) -> PruneConfig:
    ft = kw.pop("finetune", TrainConfig(epochs=1, lr=0.05, batch_size=32))
    return PruneConfig(iterations=kw.pop("iterations", 2), finetune=ft, seed=kw.pop("seed", 3), **kw)


@pytest.fixture(scope="module")
def full_run(start, bundle, tmp_path_factory):
    """The uninterrupted run: EGP, 2 iterations, 1 fine-tuning epoch each."""
    out = tmp_path_factory.mktemp("full")
    return run_pruning(start, bundle, cfg(), out, progress=False)


def strip_timing(log: dict) -> dict:
    log = json.loads(json.dumps(log))
    for r in log["iterations"]:
        r.pop("seconds", None)
    return log


def test_log_schema_and_outputs(full_run):
    out = full_run.out_dir
    log = json.loads((out / "log.json").read_text())
    assert log["format"] == "egp-deploy-prune-log" and log["arch"] == "resnet18" and log["data"] == SMALL
    assert log["config"]["method"] == "egp" and log["config"]["iterations"] == 2
    assert len(log["prunable_layers"]) == 17 and len(log["sites"]) == 17
    assert [r["iteration"] for r in log["iterations"]] == [0, 1, 2]
    site_names = {s["name"] for s in log["sites"]}
    prev_sparsity = -1.0
    for r in log["iterations"]:
        for key in ("sparsity_prunable", "sparsity_all", "test_acc", "val_acc", "entropy", "zero_entropy_sites",
                    "all_zero_layers", "zero_output_channels", "output_channels", "sites"):
            assert key in r, key
        assert set(r["entropy"]) == site_names
        assert all(0.0 <= h <= 1.0 for h in r["entropy"].values())  # binary entropy, bits
        assert r["zero_entropy_sites"] == [k for k, h in r["entropy"].items() if h == 0.0]
        assert set(r["all_zero_layers"]) <= set(log["prunable_layers"])
        assert 0.0 <= r["test_acc"] <= 100.0
        assert r["sparsity_prunable"] > prev_sparsity and r["sparsity_all"] <= r["sparsity_prunable"]
        prev_sparsity = r["sparsity_prunable"]
    for r in log["iterations"][1:]:
        assert set(r["allocation"]) >= {"prune", "frozen", "full", "shares", "budget"}
        assert len(r["finetune"]) == 1 and r["finetune"][0]["epoch"] == 1
    # nominal sparsity 1 - 0.5^i (per-layer budgets are rounded)
    assert log["iterations"][2]["sparsity_prunable"] == pytest.approx(0.75, abs=0.01)
    png = (out / "entropy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "entropy.png", "iter_00.pt", "iter_01.pt",
                                                     "iter_02.pt", "log.json"]


def test_checkpoints_load_with_weights_only_and_carry_their_figures(full_run, bundle):
    log = full_run.log
    for it in (0, 1, 2):
        raw = torch.load(full_run.out_dir / f"iter_{it:02d}.pt", weights_only=True)
        meta = raw["metadata"]
        rec = log["iterations"][it]
        assert meta["iteration"] == it and meta["method"] == "egp" and meta["data"] == SMALL
        assert meta["sparsity_prunable"] == rec["sparsity_prunable"] and meta["test_acc"] == rec["test_acc"]
        assert meta["entropy"] == rec["entropy"] and meta["recipe"]["rate"] == 0.5
        assert meta["dense_test_acc"] == log["iterations"][0]["test_acc"]
        # the recorded sparsity is the exact-zero fraction of the saved prunable weights
        sd = raw["state_dict"]
        zeros = sum(int((sd[f"{l}.weight"] == 0).sum()) for l in meta["prunable_layers"])
        total = sum(sd[f"{l}.weight"].numel() for l in meta["prunable_layers"])
        assert zeros / total == pytest.approx(rec["sparsity_prunable"])
        # EGP never touches the classifier or the shortcuts
        assert not (sd["fc.weight"] == 0).any() and not (sd["layer3.0.downsample.0.weight"] == 0).any()
    best = torch.load(full_run.out_dir / "best.pt", weights_only=True)
    assert best["metadata"]["iteration"] == full_run.best_iteration == 2  # no tolerance: the last one


def test_frozen_layers_are_never_pruned_further(full_run):
    """A layer feeding a zero-entropy activation, or one already emptied, keeps its weight count."""
    log = full_run.log
    feeder = {s["name"]: s["feeder"] for s in log["sites"]}
    nonzero = []
    for it in range(3):
        sd = torch.load(full_run.out_dir / f"iter_{it:02d}.pt", weights_only=True)["state_dict"]
        nonzero.append({l: int((sd[f"{l}.weight"] != 0).sum()) for l in log["prunable_layers"]})
    checked = 0
    for it in (1, 2):
        prev = log["iterations"][it - 1]
        alloc = log["iterations"][it]["allocation"]
        frozen_now = {feeder[s] for s in prev["zero_entropy_sites"]} | set(prev["all_zero_layers"])
        assert frozen_now <= set(alloc["frozen"])
        for layer in frozen_now:
            assert alloc["prune"][layer] == 0
            assert nonzero[it][layer] == nonzero[it - 1][layer], (it, layer)
            checked += 1
        for layer, n in alloc["prune"].items():  # the others lose exactly what was allocated
            assert nonzero[it][layer] == nonzero[it - 1][layer] - n, (it, layer)
    assert checked > 0, "the tiny run should collapse at least one layer (EGP empties layers early)"


def test_resume_after_interruption_equals_uninterrupted_run(full_run, start, bundle, tmp_path):
    out = tmp_path / "resumed"
    first = run_pruning(start, bundle, cfg(iterations=1), out, progress=False)
    assert [r["iteration"] for r in first.log["iterations"]] == [0, 1]
    # a kill after iteration 2's checkpoint was written but before its log: the log still says 1,
    # so the stray file must be redone, not trusted
    (out / "iter_02.pt").write_bytes(b"not a checkpoint")
    resumed = run_pruning(start, bundle, cfg(iterations=2), out, resume=True, progress=False)
    a, b = strip_timing(full_run.log), strip_timing(resumed.log)
    assert a["iterations"] == b["iterations"]
    for it in (1, 2):
        sd_a = torch.load(full_run.out_dir / f"iter_{it:02d}.pt", weights_only=True)["state_dict"]
        sd_b = torch.load(out / f"iter_{it:02d}.pt", weights_only=True)["state_dict"]
        assert sd_a.keys() == sd_b.keys()
        for k in sd_a:
            assert torch.equal(sd_a[k], sd_b[k]), (it, k)
    # resuming a finished run is a no-op
    again = run_pruning(start, bundle, cfg(iterations=2), out, resume=True, progress=False)
    assert strip_timing(again.log)["iterations"] == b["iterations"]


def test_imp_prunes_globally_with_the_same_schedule(start, bundle, tmp_path):
    res = run_pruning(start, bundle, cfg(method="imp", iterations=2, finetune=TrainConfig(epochs=0)), tmp_path,
                      progress=False)
    recs = res.log["iterations"]
    assert recs[0]["sparsity_all"] == 0.0
    # every conv/linear weight counts for IMP: 1 - 0.5^i of ALL weights
    assert recs[1]["sparsity_all"] == pytest.approx(0.5, abs=1e-4)
    assert recs[2]["sparsity_all"] == pytest.approx(0.75, abs=1e-4)
    assert all("prune_total" in r["allocation"] for r in recs[1:])
    meta = torch.load(tmp_path / "iter_02.pt", weights_only=True)["metadata"]
    assert meta["method"] == "imp" and meta["recipe"]["method"] == "imp"


def scripted_accuracy(monkeypatch, bundle, test_accs: list[float]):
    """Replace the evaluation with a fixed sequence of test accuracies (one per iteration)."""
    seq = iter(test_accs)

    def fake(model, ds, cfg, ctx):
        return next(seq) if ds is bundle.test else 50.0

    monkeypatch.setattr(L, "accuracy", fake)


def test_tolerance_stops_and_keeps_most_pruned_within(monkeypatch, start, bundle, tmp_path):
    # dense 90; tolerance 2 points: 89 and 88 (exactly -2) are within, 85 is not -> stop after 3
    scripted_accuracy(monkeypatch, bundle, [90.0, 89.0, 88.0, 85.0, 99.0])
    c = cfg(iterations=4, tolerance=2.0, finetune=TrainConfig(epochs=0))
    res = run_pruning(start, bundle, c, tmp_path, progress=False)
    assert [r["iteration"] for r in res.log["iterations"]] == [0, 1, 2, 3]
    assert "iteration 3" in res.log["stopped"]
    assert res.best_iteration == 2 == res.log["best_iteration"]
    best = torch.load(tmp_path / "best.pt", weights_only=True)["metadata"]
    assert best["iteration"] == 2 and best["test_acc"] == 88.0
    assert not (tmp_path / "iter_04.pt").exists()
    # resuming a stopped run with the same tolerance does not go on
    res2 = run_pruning(start, bundle, c, tmp_path, resume=True, progress=False)
    assert len(res2.log["iterations"]) == 4 and res2.log["stopped"]
    # ... a wider tolerance does: iteration 4 (99.0, the next scripted accuracy) runs and becomes best
    wider = cfg(iterations=4, tolerance=6.0, finetune=TrainConfig(epochs=0))
    res3 = run_pruning(start, bundle, wider, tmp_path, resume=True, progress=False)
    assert [r["iteration"] for r in res3.log["iterations"]] == [0, 1, 2, 3, 4]
    assert "stopped" not in res3.log and res3.best_iteration == 4


def test_tolerance_with_patience_tolerates_one_bad_iteration(monkeypatch, start, bundle, tmp_path):
    # out at 2, back within at 3, out at 4 and 5 -> stop at 5; best = 3 (the most pruned within)
    scripted_accuracy(monkeypatch, bundle, [90.0, 89.5, 85.0, 88.5, 80.0, 79.0, 90.0])
    c = cfg(iterations=6, tolerance=2.0, patience=2, finetune=TrainConfig(epochs=0))
    res = run_pruning(start, bundle, c, tmp_path, progress=False)
    assert [r["iteration"] for r in res.log["iterations"]] == [0, 1, 2, 3, 4, 5]
    assert res.best_iteration == 3
    assert torch.load(tmp_path / "best.pt", weights_only=True)["metadata"]["iteration"] == 3


def test_tolerance_is_measured_against_the_dense_model_of_a_pruned_start(monkeypatch, start, bundle, tmp_path):
    """Starting from a pruned checkpoint that is already beyond the tolerance: no crash, the run
    stops after one iteration, and best.pt is the most accurate model (flagged as not within)."""
    meta = dict(start.metadata, dense_test_acc=95.0)
    ck = type(start)(start.arch, start.arch_kwargs, start.state_dict, start.input_shape, start.num_classes, meta)
    scripted_accuracy(monkeypatch, bundle, [90.0, 89.0, 99.0])
    res = run_pruning(ck, bundle, cfg(iterations=3, tolerance=1.0, finetune=TrainConfig(epochs=0)), tmp_path / "o",
                      progress=False)
    assert [r["iteration"] for r in res.log["iterations"]] == [0, 1]
    assert res.log["best_within_tolerance"] is False
    assert res.best_iteration == 0  # 90 > 89: the start is the most accurate
    assert torch.load(tmp_path / "o" / "best.pt", weights_only=True)["metadata"]["iteration"] == 0


def test_entropy_batch_mode_and_calibration_batches_are_recorded(start, bundle, tmp_path):
    c = cfg(iterations=0, entropy_mode="batch", calibration_batches=1)
    c.eval_batch_size = 32
    res = run_pruning(start, bundle, c, tmp_path, progress=False)
    rec = res.log["iterations"][0]
    assert res.log["config"]["entropy_mode"] == "batch" and res.log["config"]["calibration_batches"] == 1
    # the same numbers as a direct per-batch measurement on the first 32 calibration samples only
    direct = measure_entropy(start.build_model(), make_loader(bundle.val, 32), max_batches=1, mode="batch")
    assert rec["entropy"] == {k: v.entropy for k, v in direct.items()}
    assert torch.load(tmp_path / "iter_00.pt", weights_only=True)["metadata"]["entropy"] == rec["entropy"]


def test_bad_config_is_a_usage_error(start, bundle, tmp_path):
    from egp_deploy.errors import UsageError

    for bad in (dict(method="magnitude"), dict(iterations=-1), dict(patience=0), dict(tolerance=-1.0),
                dict(temperature=0.0), dict(temperature=float("nan"))):
        with pytest.raises(UsageError):
            run_pruning(start, bundle, cfg(**bad), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_resume_refuses_another_method_or_rate_and_a_broken_log(full_run, start, bundle, tmp_path):
    from egp_deploy.errors import InputFileError, UsageError

    before = (full_run.out_dir / "log.json").read_bytes()
    with pytest.raises(UsageError, match="method 'egp'"):
        run_pruning(start, bundle, cfg(method="imp", iterations=3), full_run.out_dir, resume=True, progress=False)
    with pytest.raises(UsageError, match="rate 0.5"):
        run_pruning(start, bundle, cfg(rate=0.3, iterations=3), full_run.out_dir, resume=True, progress=False)
    with pytest.raises(UsageError, match="temperature 1.0"):
        run_pruning(start, bundle, cfg(temperature=0.5, iterations=3), full_run.out_dir, resume=True, progress=False)
    assert (full_run.out_dir / "log.json").read_bytes() == before  # refused before writing anything
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "log.json").write_text('{"iterations": [')
    with pytest.raises(InputFileError, match="not a readable prune log"):
        run_pruning(start, bundle, cfg(), broken, resume=True, progress=False)


def test_torchrun_fine_tuning_keeps_masks(start, tmp_path):
    """Regression: under DDP the model is wrapped ("module." names); masks must still be enforced."""
    import os
    import subprocess

    path = tmp_path / "start.pt"
    save_checkpoint(path, start)
    env = dict(os.environ, PYTHONPATH=str(HERE), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "egp_deploy.cli",
           "prune", str(path), "-o", str(tmp_path / "ddp"), "-n", "1", "--epochs", "1", "--batch-size", "32", "-q",
           "--data", start.metadata["data"]]  # a recorded plugin is code: it is used only when named
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    log = json.loads((tmp_path / "ddp" / "log.json").read_text())
    assert log["world_size"] == 2
    rec = log["iterations"][1]
    assert rec["finetune"][0]["epoch"] == 1
    before = torch.load(tmp_path / "ddp" / "iter_00.pt", weights_only=True)["state_dict"]
    after = torch.load(tmp_path / "ddp" / "iter_01.pt", weights_only=True)["state_dict"]
    changed = 0
    for layer, n in rec["allocation"]["prune"].items():
        w0, w1 = before[f"{layer}.weight"], after[f"{layer}.weight"]
        assert int((w1 == 0).sum()) == int((w0 == 0).sum()) + n, layer  # exactly the pruned ones are zero
        # a layer whose output is dead downstream gets no gradient, so count the fine-tuned ones overall
        changed += int((w1 != 0).any() and not torch.equal(w0[w1 != 0], w1[w1 != 0]))
    assert changed > 0  # fine-tuning did run under DDP


def test_fresh_run_clears_iteration_checkpoints_of_an_older_run(start, bundle, tmp_path):
    (tmp_path / "iter_07.pt").write_bytes(b"left by an older, longer run")
    (tmp_path / "notes.txt").write_text("the user's")
    run_pruning(start, bundle, cfg(iterations=0), tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "entropy.png", "iter_00.pt", "log.json", "notes.txt"]
