"""egp-prune: EGP (or IMP) iterative unstructured pruning with fine-tuning, on CPU or under torchrun."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from egp_deploy.api import parse_arch_kwargs  # noqa: F401  (re-exported: tests and tools use it)
from egp_deploy.cli._common import choices, new_app, run_app, stdout

Method = choices("Method", ("egp", "imp"))
Schedule = choices("Schedule", ("cosine", "step", "constant"))
EntropyMode = choices("EntropyMode", ("dataset", "batch"))
DistBackend = choices("DistBackend", ("auto", "nccl", "gloo"))

app = new_app(
    "Prune a model with EGP (Entropy-Guided Pruning: the per-iteration budget goes to layers whose "
    "rectifiers already have low entropy, so whole layers collapse) or with the IMP baseline (global L1). "
    "SOURCE is a model reference (a dense model is trained first, --dense-epochs, or loaded from --weights) "
    "or an egp-deploy checkpoint. Each iteration measures entropy on the calibration (val) split, prunes, fine-tunes and "
    "evaluates; OUT gets iter_NN.pt per iteration, best.pt, log.json and entropy.png. "
    "Under torchrun (python -m torch.distributed.run --nproc_per_node=N -m egp_deploy.cli prune ...) it runs "
    "data-parallel; --batch-size is then per rank."
)


@app.command()
def prune(
    source: str = typer.Argument(..., help="A model reference: a built-in architecture (resnet18, mobilenet_v2, vgg16_bn, vit_tiny, ...), torchvision:NAME, timm:NAME (the [zoo] extra) or package.module:factory (your own code, importable from PYTHONPATH); or an egp-deploy checkpoint .pt."),
    out: Path = typer.Option(Path("runs/prune"), "--out", "-o", help="Output folder (checkpoints, log.json, entropy.png)."),
    method: Method = typer.Option("egp", "--method", "-m", help="egp (entropy-guided budget) or imp (global L1 baseline)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="digits (bundled, default), cifar10:DIR, folder:DIR or plugin:module:function. Default: the checkpoint's data, else digits."),
    iterations: int = typer.Option(9, "--iterations", "-n", help="Pruning iterations (nominal sparsity 1 - (1-rate)^n)."),
    rate: float = typer.Option(0.5, "--rate", help="Fraction of the remaining prunable weights removed per iteration."),
    min_keep_cut: float = typer.Option(0.01, "--min-keep-cut", metavar="FRACTION", help="EGP only. A prunable layer that lies on EVERY input-output path (a \"cut layer\": VGG's convs and hidden Linears, MobileNetV2 blocks without residual, ResNet's stem) keeps at least this fraction of its original weights: emptying it would make the network output a constant. Its surplus budget goes to the other layers. This deviates from the paper for cut layers only; 0 = the paper's allocation exactly. Cut layers are found on the torch.fx graph; a model fx cannot trace gets no guard (said in the output)."),
    temperature: float = typer.Option(1.0, "--temperature", help="EGP only. Softmax temperature of the budget allocation (logits S / (T * I_l)). 1 = the paper's allocation; below 1 each iteration's budget concentrates on fewer, less relevant layers, so more of them empty completely (not the paper's algorithm: an opt-in variant, recorded in the log)."),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", "-t", help="Stop once test accuracy falls more than this many points below the DENSE model (the dense accuracy a pruned checkpoint records, else the start's); best.pt is the most pruned model within it. Default: no tolerance, run all iterations."),
    patience: int = typer.Option(1, "--patience", help="With --tolerance: stop only after this many consecutive iterations beyond it."),
    epochs: int = typer.Option(8, "--epochs", "-e", help="Fine-tuning epochs after each pruning step."),
    lr: float = typer.Option(0.05, "--lr", help="Fine-tuning learning rate (SGD)."),
    dense_epochs: Optional[int] = typer.Option(None, "--dense-epochs", help="Epochs to train the dense model when SOURCE is a model reference. Default: 30, or 0 with --weights (the weights are the dense model)."),
    dense_lr: float = typer.Option(0.05, "--dense-lr", help="Learning rate of the dense training."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Training batch size (per rank under torchrun)."),
    momentum: float = typer.Option(0.9, "--momentum", help="SGD momentum (dense training and fine-tuning)."),
    weight_decay: float = typer.Option(1e-4, "--weight-decay", help="SGD weight decay on conv/linear weights (not on BN or biases)."),
    schedule: Schedule = typer.Option("cosine", "--schedule", help="Per-epoch LR schedule: cosine, step (x0.1 at 50%/75%) or constant."),
    entropy_mode: EntropyMode = typer.Option("dataset", "--entropy-mode", help="dataset: one p per channel over the whole split (batch-size independent); batch: mean of per-batch entropies (the official code)."),
    calibration_batches: Optional[int] = typer.Option(None, "--calibration-batches", help="Limit entropy measurement to this many batches of 256 (default: the whole val split)."),
    arch_kwargs: Optional[str] = typer.Option(None, "--arch-kwargs", help="Keyword arguments of the model's constructor, e.g. width=16 (only with a model reference). num_classes (and in_channels / timm's in_chans where the constructor has them) follow the data unless given."),
    weights: Optional[Path] = typer.Option(None, "--weights", metavar="FILE", help="A state_dict file to start the model reference from, loaded weights-only (a file that pickles anything beyond tensors is refused)."),
    trust_module: bool = typer.Option(False, "--trust-module", help="Let a checkpoint that names package.module:factory import and call it: that RUNS the module's code. Not needed for zoo, torchvision: or timm: models."),
    seed: int = typer.Option(0, "--seed", help="Seeds initialisation, shuffling and fine-tuning."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUT from its last finished iteration."),
    force: bool = typer.Option(False, "--force", help="Replace the run OUT holds (its checkpoints, log and plot are deleted first). Without --resume or --force a folder holding a run is refused."),
    dist_backend: DistBackend = typer.Option("auto", "--dist-backend", help="torchrun only: auto (nccl with CUDA, else gloo), nccl or gloo."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    method, schedule, entropy_mode, dist_backend = map(str, (method, schedule, entropy_mode, dist_backend))
    import os

    from egp_deploy.api import prune as run_prune

    result = run_prune(
        source, out, method=_value(method), data=data, iterations=iterations, rate=rate, tolerance=tolerance,
        patience=patience, epochs=epochs, lr=lr, dense_epochs=dense_epochs, dense_lr=dense_lr, batch_size=batch_size,
        momentum=momentum, weight_decay=weight_decay, schedule=_value(schedule), entropy_mode=_value(entropy_mode),
        calibration_batches=calibration_batches, min_keep_cut=min_keep_cut, temperature=temperature,
        arch_kwargs=arch_kwargs, weights=weights, trust_module=trust_module, seed=seed, resume=resume, force=force, dist_backend=_value(dist_backend), progress=not quiet,
        log=stdout.print,
    )
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return
    print_summary(result.log, result.best_iteration)
    if tolerance is None:
        stdout.print(f"best (no --tolerance: the last iteration): iteration {result.best_iteration} -> {result.best_path}")
    elif result.log.get("best_within_tolerance", True):
        stdout.print(f"best (the most pruned within {tolerance} points of dense): iteration "
                     f"{result.best_iteration} -> {result.best_path}")
    else:
        stdout.print(f"no iteration is within the tolerance of the dense model; best.pt is the most "
                     f"accurate one: iteration {result.best_iteration} -> {result.best_path}")
    stdout.print(f"log: {out / 'log.json'}   plot: {out / 'entropy.png'}")
    if result.log.get("stopped"):
        stdout.print(f"stopped early: {result.log['stopped']}")
    if _value(method) == "egp" and min_keep_cut > 0 and result.log.get("cut_layers_note"):
        stdout.print(f"note: --min-keep-cut was not applied: {result.log['cut_layers_note']}")


def _value(choice):
    """An Enum choice's value (the option may be declared as an Enum or as plain text)."""
    return getattr(choice, "value", choice)


def print_summary(log: dict, best: int) -> None:
    n_sites = len(log["iterations"][0]["entropy"])
    table = Table(title=f"{log['arch']} {log['config']['method'].upper()} on {log['data']}")
    for col in ("iter", "sparsity", "all weights", "test acc", "zero-H acts", "all-zero layers", "zero out-ch", "s"):
        table.add_column(col, justify="right")
    for r in log["iterations"]:
        table.add_row(
            f"{r['iteration']}{' *' if r['iteration'] == best else ''}", f"{r['sparsity_prunable']:.4f}",
            f"{r['sparsity_all']:.4f}", f"{r['test_acc']:.2f}", f"{len(r['zero_entropy_sites'])}/{n_sites}",
            str(len(r["all_zero_layers"])), f"{r['zero_output_channels']}/{r['output_channels']}", f"{r['seconds']:.0f}",
        )
    stdout.print(table)


def main() -> None:
    run_app(app, "egp-prune")


if __name__ == "__main__":
    main()
