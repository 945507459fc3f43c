"""Fine-tuning and evaluation: SGD with momentum / weight decay and a per-epoch LR schedule.

Seeded and deterministic on CPU (one seeded generator drives shuffling; no augmentation).
Masks, when given, are enforced after every optimizer step. A non-finite loss stops training
with NonFiniteError. The per-epoch pieces (``train_one_epoch``, ``evaluate``) take a plain loader
and return plain sums so a distributed wrapper can reduce them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from egp_deploy.progress import progress_bar

from egp_deploy.errors import NonFiniteError
from egp_deploy.prune.masks import Masks, enforce_masks


@dataclass
class TrainConfig:
    epochs: int = 8
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    schedule: str = "cosine"  # "cosine" | "step" | "constant"
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # "step": fractions of epochs
    gamma: float = 0.1
    warmup_epochs: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate for 0-based ``epoch``."""
    if cfg.warmup_epochs and epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1) / (cfg.warmup_epochs + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        drops = sum(epoch >= round(m * cfg.epochs) if m < 1 else epoch >= m for m in cfg.milestones)
        return cfg.lr * cfg.gamma**drops
    if cfg.schedule == "cosine":
        span = max(1, cfg.epochs - cfg.warmup_epochs)
        t = (epoch - cfg.warmup_epochs) / span
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * t))
    raise ValueError(f"unknown schedule {cfg.schedule!r}: use cosine, step or constant")


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    # no weight decay on BN/bias parameters (1-D), as common CNN recipes do
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, momentum=cfg.momentum,
    )


def train_one_epoch(
    model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, masks: Masks | None = None,
    device: str | torch.device = "cpu", progress: str | None = None,
) -> tuple[float, int, int]:
    """One pass; returns (loss sum, correct, samples). Raises NonFiniteError on a NaN/Inf loss."""
    model.train()
    # masks are keyed by the bare model's parameter names; a DDP wrapper prefixes them with "module."
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    loss_sum, correct, seen = 0.0, 0, 0
    it = progress_bar(loader, desc=progress, leave=False, disable=progress is None, unit="batch")
    for x, y in it:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss = F.cross_entropy(out, y)
        if not torch.isfinite(loss):
            if x.is_floating_point() and not torch.isfinite(x).all():  # bad data, not a diverging run
                raise NonFiniteError(f"training data contains NaN/Inf values (batch after {seen} samples)")
            raise NonFiniteError(
                f"non-finite training loss ({loss.item()}) after {seen} samples: lower the learning rate"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if masks:
            enforce_masks(net, masks)  # gradients: masked weights get no update, not even momentum
        optimizer.step()
        if masks:
            enforce_masks(net, masks, optimizer)  # weight decay/momentum leftovers
        loss_sum += loss.item() * len(y)
        correct += int((out.argmax(1) == y).sum())
        seen += len(y)
        if progress is not None:
            it.set_postfix(loss=f"{loss_sum / seen:.3f}")
    return loss_sum, correct, seen


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu") -> dict[str, float]:
    """Top-1 accuracy (percent) and mean cross-entropy in eval mode."""
    was = model.training
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += int((out.argmax(1) == y).sum())
        seen += len(y)
    model.train(was)
    if seen == 0:
        return {"acc": float("nan"), "loss": float("nan"), "samples": 0}
    return {"acc": 100.0 * correct / seen, "loss": loss_sum / seen, "samples": seen}


def fit(
    model: nn.Module, train_loader_fn, cfg: TrainConfig, masks: Masks | None = None,
    device: str | torch.device = "cpu", desc: str = "train", show_progress: bool = True,
) -> list[dict[str, float]]:
    """Train ``cfg.epochs`` epochs. ``train_loader_fn(epoch)`` returns that epoch's loader
    (seeded per epoch, so a run is reproducible and restartable). Returns per-epoch history."""
    opt = make_optimizer(model, cfg)
    if masks:
        enforce_masks(model, masks)
    history = []
    epochs = range(cfg.epochs)
    bar = progress_bar(epochs, desc=desc, leave=False, disable=not show_progress, unit="epoch")
    for epoch in bar:
        lr = lr_at(cfg, epoch)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum, correct, seen = train_one_epoch(
            model, train_loader_fn(epoch), opt, masks, device, f"{desc} epoch {epoch + 1}" if show_progress else None
        )
        rec = {"epoch": epoch + 1, "lr": lr, "loss": loss_sum / max(seen, 1), "acc": 100.0 * correct / max(seen, 1)}
        history.append(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.1f}")
    return history
