"""The EGP / IMP iteration loop: measure -> allocate -> prune -> fine-tune -> evaluate -> save.

One folder per run:
    iter_00.pt ... iter_NN.pt   a checkpoint per finished iteration (00 = the starting model)
    best.pt                     the most pruned checkpoint whose test accuracy is within tolerance
    log.json                    config + one record per iteration (rewritten atomically each time)
    entropy.png                 layer entropy per activation site per iteration
A killed run restarts from the last iteration recorded in log.json (``resume=True``). Under
torchrun every rank runs this loop; statistics are all-reduced, decisions are the same on every
rank (and masks are broadcast from rank 0), and only rank 0 writes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from egp_deploy.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from egp_deploy.data import DataBundle
from egp_deploy.distributed import (
    DistContext, all_reduce_sum, barrier, eval_loader, set_epoch, train_loader,
)
from egp_deploy.errors import InputFileError, UsageError
from egp_deploy.io_utils import atomic_path, write_json_atomic
from egp_deploy.prune import masks as M
from egp_deploy.prune.entropy import SiteStats
from egp_deploy.prune.pruner import OPTIONS as PRUNER_OPTIONS
from egp_deploy.prune.pruner import Pruner, unwrap
from egp_deploy.prune.train import TrainConfig, lr_at, make_optimizer, train_one_epoch

LOG_FORMAT = "egp-deploy-prune-log"


@dataclass
class PruneConfig:
    method: str = "egp"  # "egp" | "imp"
    iterations: int = 9
    rate: float = 0.5  # fraction of the remaining (prunable) weights removed per iteration
    tolerance: float | None = None  # stop once test accuracy drops more than this many points
    patience: int = 1  # ... for this many consecutive iterations (small test sets are noisy)
    finetune: TrainConfig = field(default_factory=TrainConfig)
    entropy_mode: str = "dataset"  # "dataset" | "batch"
    calibration_batches: int | None = None  # None: the whole calibration (val) split
    eval_batch_size: int = 256
    seed: int = 0
    # EGP only: a layer on every input-output path keeps at least this fraction of its original
    # weights (emptying it makes the output constant); 0 = the paper's allocation
    min_keep_cut: float = 0.01
    # EGP only: softmax temperature of the allocation (logits S / (T I_l)); 1 = the paper's
    temperature: float = 1.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["finetune"] = self.finetune.to_json()
        return d

    def validate(self) -> None:
        """The ranges egp-prune and egp_deploy.prune() check (egp_deploy.validation.RANGES)."""
        from egp_deploy.validation import option_name, validate_options

        if self.method not in ("egp", "imp"):
            raise UsageError(f"{option_name('method', '--method')} must be egp or imp, got {self.method!r}")
        validate_options("prune", {"iterations": self.iterations, "rate": self.rate, "tolerance": self.tolerance,
                                   "patience": self.patience, "min_keep_cut": self.min_keep_cut,
                                   "temperature": self.temperature, "calibration_batches": self.calibration_batches,
                                   "seed": self.seed})
        if self.entropy_mode not in ("dataset", "batch"):
            raise UsageError(f"{option_name('entropy_mode', '--entropy-mode')} must be dataset or batch, "
                             f"got {self.entropy_mode!r}")


def measure(pruner: Pruner, bundle: DataBundle, cfg: PruneConfig, ctx: DistContext) -> dict[str, SiteStats]:
    """Entropy over the calibration split (this rank's shard; the Pruner sums counts over ranks)."""
    return pruner.measure(eval_loader(ctx, bundle.val, cfg.eval_batch_size))


@torch.no_grad()
def accuracy(model: nn.Module, ds, cfg: PruneConfig, ctx: DistContext) -> float:
    """Top-1 (percent) over a split, exact across ranks (correct/seen are summed)."""
    net = unwrap(model)
    was = net.training
    net.eval()
    tally = torch.zeros(2, dtype=torch.int64)
    for x, y in eval_loader(ctx, ds, cfg.eval_batch_size):
        out = net(x.to(ctx.device))
        tally[0] += int((out.argmax(1).cpu() == y).sum())
        tally[1] += len(y)
    net.train(was)
    all_reduce_sum(ctx, tally)
    return 100.0 * int(tally[0]) / max(int(tally[1]), 1)


def finetune(model: nn.Module, bundle: DataBundle, tcfg: TrainConfig, masks: M.Masks | None,
             ctx: DistContext, seed: int, desc: str, progress: bool) -> list[dict[str, float]]:
    """Fine-tune (DDP-wrapped under torchrun); masks enforced after every step."""
    net = unwrap(model)
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(net, device_ids=[ctx.local_rank] if ctx.backend == "nccl" else None)
    opt = make_optimizer(net, tcfg)
    if masks:
        M.enforce_masks(net, masks)
    loader = train_loader(ctx, bundle.train, tcfg.batch_size, seed)
    history = []
    for epoch in range(tcfg.epochs):
        lr = lr_at(tcfg, epoch)
        for g in opt.param_groups:
            g["lr"] = lr
        set_epoch(loader, epoch)
        if not ctx.enabled:  # single process: a fresh seeded shuffle per epoch, resumable
            loader.generator.manual_seed(seed * 1000 + epoch)
        show = f"{desc} epoch {epoch + 1}/{tcfg.epochs}" if progress and ctx.is_main else None
        loss_sum, correct, seen = train_one_epoch(model, loader, opt, masks, ctx.device, show)
        tally = torch.tensor([loss_sum, correct, seen], dtype=torch.float64)
        all_reduce_sum(ctx, tally)
        history.append({"epoch": epoch + 1, "lr": lr, "loss": float(tally[0] / tally[2].clamp_min(1)),
                        "acc": float(100 * tally[1] / tally[2].clamp_min(1))})
    return history


def _record(iteration: int, pruner: Pruner, cfg: PruneConfig, bundle: DataBundle, ctx: DistContext,
            extra: dict) -> dict[str, Any]:
    info = pruner.summary()
    return {
        "iteration": iteration,
        "method": cfg.method,
        "sparsity_prunable": info["sparsity_prunable"],
        "sparsity_all": info["sparsity_all"],
        "val_acc": accuracy(pruner.net, bundle.val, cfg, ctx),
        "test_acc": accuracy(pruner.net, bundle.test, cfg, ctx),
        **{k: info[k] for k in ("entropy", "sites", "zero_entropy_sites", "all_zero_layers", "zero_output_channels",
                                "output_channels")},
        **extra,
    }


@dataclass
class RunResult:
    out_dir: Path
    log: dict[str, Any]
    best_iteration: int
    best_path: Path


def _checkpoint(model: nn.Module, base: Checkpoint, rec: dict, cfg: PruneConfig, bundle: DataBundle,
                layers: list[str], dense_acc: float) -> Checkpoint:
    meta = dict(base.metadata)
    meta.update({
        "data": bundle.spec, "method": cfg.method, "iteration": rec["iteration"],
        "sparsity_prunable": rec["sparsity_prunable"], "sparsity_all": rec["sparsity_all"],
        "sparsity": rec["sparsity_prunable"], "test_acc": rec["test_acc"], "val_acc": rec["val_acc"],
        "entropy": rec["entropy"], "zero_entropy_sites": rec["zero_entropy_sites"],
        "all_zero_layers": rec["all_zero_layers"], "prunable_layers": layers, "recipe": cfg.to_json(),
    })
    meta["dense_test_acc"] = dense_acc
    return Checkpoint(base.arch, base.arch_kwargs, unwrap(model).state_dict(), base.input_shape, base.num_classes, meta)


def _dense_acc(log: dict, start: Checkpoint) -> float:
    """The tolerance is measured against the DENSE model, also when a run starts from a pruned one."""
    return float(start.metadata.get("dense_test_acc", log["iterations"][0]["test_acc"]))


def _within(rec: dict, dense_acc: float, tol: float | None) -> bool:
    return tol is None or dense_acc - rec["test_acc"] <= tol + 1e-9


def _should_stop(records: list[dict], dense_acc: float, cfg: PruneConfig) -> bool:
    """The last ``patience`` iterations all fell beyond the tolerance."""
    recent = records[-cfg.patience:]
    return len(recent) == cfg.patience and not any(_within(r, dense_acc, cfg.tolerance) for r in recent)


def run_pruning(start: Checkpoint, bundle: DataBundle, cfg: PruneConfig, out_dir: str | Path,
                ctx: DistContext = DistContext(), resume: bool = False, progress: bool = True) -> RunResult:
    """Prune ``start`` (a dense or partly pruned checkpoint) for ``cfg.iterations`` iterations."""
    cfg.validate()
    out = Path(out_dir)
    log_path = out / "log.json"
    model = start.build_model().to(ctx.device)
    log: dict[str, Any] = {"format": LOG_FORMAT, "arch": start.arch, "arch_kwargs": start.arch_kwargs,
                           "data": bundle.spec, "config": cfg.to_json(), "prunable_layers": None,
                           "sites": None, "iterations": [], "world_size": ctx.world_size}
    if resume and log_path.is_file():
        import json

        try:
            log = json.loads(log_path.read_text())
            before = log["config"]
            last = log["iterations"][-1]["iteration"] if log["iterations"] else None
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise InputFileError(f"cannot resume: {log_path} is not a readable prune log ({type(e).__name__}: {e})") from None
        # continuing with another method, rate or guard would silently mix two schedules in one run
        before.setdefault("min_keep_cut", 0.0)  # a log written before the guard existed: no guard
        before.setdefault("temperature", 1.0)  # ... or before the temperature: the paper's
        for key in ("method", "rate") + (("min_keep_cut", "temperature") if cfg.method == "egp" else ()):
            if before.get(key) != getattr(cfg, key):
                raise UsageError(f"cannot resume: {out} holds a run with {key} {before.get(key)!r}, "
                                 f"this command asks for {getattr(cfg, key)!r}")
        before.update(iterations=cfg.iterations, tolerance=cfg.tolerance, patience=cfg.patience)  # "resume to N"
        if last is not None:
            model = load_checkpoint(out / f"iter_{last:02d}.pt", expected_arch=start.arch).build_model().to(ctx.device)
    elif ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        # a fresh run owns OUT's iteration checkpoints: one left by an older, longer run would
        # otherwise sit beside this run's as if it belonged to it
        for stale in out.glob("iter_[0-9][0-9].pt"):
            stale.unlink()
    barrier(ctx)
    # sites, prunable layers, cut layers and masks (a checkpoint's masks are its zeros) of the model
    # the run continues from; the loop keeps the masks itself (train_one_epoch), so no hooks
    example = torch.zeros((1, *start.input_shape), device=ctx.device)
    pruner = Pruner(model, example, cfg.method, cfg.rate, **{k: getattr(cfg, k) for k in PRUNER_OPTIONS},
                    keep_masked_zero=False, context=ctx)
    layers = pruner.layers
    log["prunable_layers"] = layers
    log["sites"] = [s.to_json() for s in pruner.sites]
    # which layers nothing bypasses (they are the ones the min_keep_cut guard protects)
    log["cut_layers"] = pruner.cuts.layers
    log["cut_layer_min_keep"] = pruner.min_keep
    if not pruner.cuts.known:
        log["cut_layers_note"] = pruner.cuts.note

    measured = False  # entropy of the current weights; an iteration's closing measurement opens the next
    if not log["iterations"]:  # iteration 0: the starting model
        measure(pruner, bundle, cfg, ctx)
        measured = True
        rec = _record(0, pruner, cfg, bundle, ctx, {"seconds": 0.0})
        log["iterations"].append(rec)
        _save(out, 0, model, start, rec, cfg, bundle, layers, log, ctx)
    dense_acc = _dense_acc(log, start)
    if resume and log.get("stopped") and not _should_stop(log["iterations"], dense_acc, cfg):
        del log["stopped"]  # resumed with a wider tolerance or more patience: the run goes on
    from egp_deploy.progress import progress_bar

    done = log["iterations"][-1]["iteration"]
    bar = progress_bar(range(done + 1, cfg.iterations + 1), desc=f"{cfg.method} iterations",
                       disable=not (progress and ctx.is_main), initial=done, total=cfg.iterations, unit="iter")
    for it in bar:
        if log.get("stopped"):
            break
        t0 = time.perf_counter()
        if not measured:  # resumed: measure the checkpoint the run continues from
            measure(pruner, bundle, cfg, ctx)
            measured = True
        info = pruner.step()
        hist = finetune(model, bundle, cfg.finetune, pruner.masks, ctx, cfg.seed * 7919 + it, f"iter {it}", progress)
        measure(pruner, bundle, cfg, ctx)
        rec = _record(it, pruner, cfg, bundle, ctx, {"allocation": info, "finetune": hist,
                                                     "seconds": time.perf_counter() - t0})
        log["iterations"].append(rec)
        if _should_stop(log["iterations"], dense_acc, cfg):
            log["stopped"] = (f"iteration {it}: test accuracy {rec['test_acc']:.2f} more than {cfg.tolerance} points "
                              f"below {dense_acc:.2f} for {cfg.patience} iteration(s)")
        _save(out, it, model, start, rec, cfg, bundle, layers, log, ctx)
        bar.set_postfix(sparsity=f"{rec['sparsity_prunable']:.3f}", acc=f"{rec['test_acc']:.1f}",
                        zero_H=len(rec["zero_entropy_sites"]))
        if log.get("stopped"):
            break
    best = log["best_iteration"]
    return RunResult(out, log, best, out / "best.pt")


def _save(out: Path, it: int, model: nn.Module, start: Checkpoint, rec: dict, cfg: PruneConfig,
          bundle: DataBundle, layers: list[str], log: dict, ctx: DistContext) -> None:
    """Rank 0 writes the iteration checkpoint, best.pt, the log and the plot; the log goes last,
    so a run killed in between resumes from the previous iteration."""
    dense_acc = _dense_acc(log, start)
    ok = [r for r in log["iterations"] if _within(r, dense_acc, cfg.tolerance)]
    if ok:
        best = max(ok, key=lambda r: (r["sparsity_prunable"], r["test_acc"]))["iteration"]
    else:  # a start already beyond the tolerance (a pruned checkpoint): keep the most accurate model
        best = max(log["iterations"], key=lambda r: (r["test_acc"], -r["iteration"]))["iteration"]
    log["best_iteration"] = best
    log["best_within_tolerance"] = bool(ok)
    if ctx.is_main:
        ckpt = _checkpoint(model, start, rec, cfg, bundle, layers, dense_acc)
        save_checkpoint(out / f"iter_{it:02d}.pt", ckpt)
        if best == it:
            save_checkpoint(out / "best.pt", ckpt)
        plot_entropy(log, out / "entropy.png")
        write_json_atomic(out / "log.json", log)
    barrier(ctx)


def plot_entropy(log: dict, path: Path) -> None:
    """Heat map: layer entropy per activation site (columns) per iteration (rows)."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures stay untouched

    recs = log["iterations"]
    names = list(recs[0]["entropy"])
    grid = [[r["entropy"].get(n, 0.0) for n in names] for r in recs]
    fig = Figure(figsize=(max(6, 0.38 * len(names) + 2), 1.2 + 0.42 * len(recs)))
    ax = fig.subplots()
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1e-9, max(map(max, grid))))
    ax.set_xticks(range(len(names)), names, rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(len(recs)), [f"{r['iteration']} ({100 * r['sparsity_prunable']:.1f}%)" for r in recs], fontsize=8)
    for i, r in enumerate(recs):
        for j, n in enumerate(names):
            if r["entropy"].get(n, 1.0) == 0.0:
                ax.text(j, i, "0", ha="center", va="center", color="white", fontsize=7)
    ax.set_ylabel("iteration (sparsity)")
    ax.set_title(f"{log['arch']} {log['config']['method'].upper()}: layer entropy (bits); 0 = collapsible")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
