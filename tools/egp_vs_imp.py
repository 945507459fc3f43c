#!/usr/bin/env python
"""EGP vs IMP on digits, from the same dense checkpoint with the same schedule (the paper's claim).

The claim (EGP.md): at equal sparsity EGP leaves more zero-entropy activation layers than IMP
(global L1), at comparable accuracy. Both methods start from one dense checkpoint and run the
same number of iterations at the same rate with the same fine-tuning; per iteration this prints
and saves, for each method: sparsity (of the prunable layers and of all conv/linear weights),
test accuracy, zero-entropy activations (of all sites) and all-zero layers.

"Equal sparsity" = the same iteration: each method removes the same fraction (--rate) of what it
may prune (EGP: the prunable layers; IMP: all conv/linear weights); both sparsities are recorded.
"Comparable accuracy" = both within --tolerance points of the dense model.

    python tools/egp_vs_imp.py                      # defaults: ~4-6 min on 2 cores
    python tools/egp_vs_imp.py --iterations 9 --epochs 14   # the reference recipe (~20 min)

Outputs (--out, default docs/results/): egp_vs_imp.json, egp_vs_imp.md (the table), egp_vs_imp.png.
Run folders (checkpoints, logs, entropy plots) go to --work (default runs/egp_vs_imp/).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from egp_deploy.archs import check_arch
from egp_deploy.bench import cpu_model
from egp_deploy.errors import UnsupportedError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DENSE = ROOT / "models" / "resnet18_digits_dense.pt"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help=f"dense start (default: {DEFAULT_DENSE.relative_to(ROOT)} if present, else one is trained)")
    ap.add_argument("--arch", default="resnet18", help="architecture trained when there is no checkpoint")
    ap.add_argument("--width", type=int, default=16, help="width of the architecture trained when there is no checkpoint")
    ap.add_argument("--dense-epochs", type=int, default=15, help="epochs of the dense training (only without checkpoint)")
    ap.add_argument("--data", default=None, help="data spec (default: the checkpoint's, else digits)")
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--rate", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs per iteration (both methods)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--tolerance", type=float, default=1.0, help="points below dense that still count as comparable")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "egp_vs_imp")
    ap.add_argument("--resume", action="store_true", help="continue the runs in --work")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args()
    try:
        check_arch(args.arch)
    except UnsupportedError as e:  # one line and exit 8, as an unknown architecture anywhere in egp-deploy
        print(f"error: --arch: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    return args


def dense_start(args):
    from egp_deploy.api import train_dense
    from egp_deploy.checkpoint import load_checkpoint, save_checkpoint
    from egp_deploy.data import load_data
    from egp_deploy.prune.train import TrainConfig

    path = args.checkpoint or (DEFAULT_DENSE if DEFAULT_DENSE.is_file() else None)
    if path is not None:
        start = load_checkpoint(path)
        return start, load_data(args.data or start.metadata.get("data", "digits")), rel(path)
    bundle = load_data(args.data or "digits")
    path = args.work / "dense.pt"
    if args.resume and path.is_file():
        return load_checkpoint(path), bundle, rel(path)
    recipe = TrainConfig(epochs=args.dense_epochs, lr=args.lr, batch_size=args.batch_size)
    start = train_dense(args.arch, bundle, recipe, {"width": args.width}, args.seed, progress=not args.quiet)
    save_checkpoint(path, start)
    return start, bundle, rel(path)


def rel(path) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def rows_of(log: dict) -> list[dict]:
    return [{
        "iteration": r["iteration"], "sparsity_prunable": r["sparsity_prunable"], "sparsity_all": r["sparsity_all"],
        "test_acc": r["test_acc"], "zero_entropy": len(r["zero_entropy_sites"]), "zero_entropy_sites": r["zero_entropy_sites"],
        "all_zero_layers": len(r["all_zero_layers"]), "zero_output_channels": r["zero_output_channels"],
        "output_channels": r["output_channels"], "seconds": r["seconds"],
    } for r in log["iterations"]]


def verdict(egp: list[dict], imp: list[dict], dense_acc: float, tol: float) -> dict:
    """The project's one EGP-vs-IMP verdict (egp_deploy.prune.verdict), on this tool's rows."""
    from egp_deploy.prune.verdict import compare_methods

    return compare_methods(egp, imp, tol, key="zero_entropy", dense_acc=dense_acc)


def table_md(egp: list[dict], imp: list[dict], n_sites: int) -> str:
    head = ("| iter | EGP sparsity (prunable / all) | EGP test acc | EGP zero-H acts | EGP all-zero layers "
            "| IMP sparsity (prunable / all) | IMP test acc | IMP zero-H acts | IMP all-zero layers |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    lines = [
        f"| {e['iteration']} | {e['sparsity_prunable']:.4f} / {e['sparsity_all']:.4f} | {e['test_acc']:.2f} | "
        f"{e['zero_entropy']}/{n_sites} | {e['all_zero_layers']} | {i['sparsity_prunable']:.4f} / {i['sparsity_all']:.4f} | "
        f"{i['test_acc']:.2f} | {i['zero_entropy']}/{n_sites} | {i['all_zero_layers']} |"
        for e, i in zip(egp, imp)
    ]
    return head + "\n".join(lines) + "\n"


def plot(egp: list[dict], imp: list[dict], dense_acc: float, tol: float, n_sites: int, title: str, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures stay untouched

    from egp_deploy.io_utils import atomic_path

    fig = Figure(figsize=(11, 4))
    a, b = fig.subplots(1, 2)
    for rows, name, marker, color in ((egp, "EGP", "o", "tab:blue"), (imp, "IMP", "s", "tab:orange")):
        it = [r["iteration"] for r in rows]
        a.plot(it, [r["zero_entropy"] for r in rows], marker + "-", color=color, label=f"{name}: zero-entropy activations")
        a.plot(it, [r["all_zero_layers"] for r in rows], marker + ":", color=color, alpha=0.5,
               label=f"{name}: all-zero layers")
        b.plot(it, [r["test_acc"] for r in rows], marker + "-", color=color, label=name)
    a.set_xlabel("iteration (same nominal sparsity for both: 1 - (1 - rate)^i)")
    a.set_ylabel(f"count (of {n_sites} activation sites / prunable layers)")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    b.axhline(dense_acc, color="gray", lw=0.8, label="dense")
    b.axhspan(dense_acc - tol, dense_acc, color="green", alpha=0.08, label=f"within {tol} points")
    b.set_xlabel("iteration")
    b.set_ylabel("test accuracy (%)")
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from egp_deploy.io_utils import write_bytes_atomic, write_json_atomic
    from egp_deploy.prune.loop import PruneConfig, run_pruning
    from egp_deploy.prune.train import TrainConfig

    t0 = time.perf_counter()
    start, bundle, start_path = dense_start(args)
    logs = {}
    for method in ("egp", "imp"):
        cfg = PruneConfig(method=method, iterations=args.iterations, rate=args.rate, seed=args.seed,
                          finetune=TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size))
        res = run_pruning(start, bundle, cfg, args.work / method, resume=args.resume, progress=not args.quiet)
        logs[method] = res.log
    egp, imp = rows_of(logs["egp"]), rows_of(logs["imp"])
    dense_acc = egp[0]["test_acc"]
    assert imp[0]["test_acc"] == dense_acc  # the same start
    n_sites = len(logs["egp"]["sites"])
    v = verdict(egp, imp, dense_acc, args.tolerance)
    elapsed = time.perf_counter() - t0
    command = "python tools/egp_vs_imp.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    env = {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "seconds": round(elapsed, 1)}
    settings = {k: (rel(v_) if isinstance(v_, Path) else v_) for k, v_ in vars(args).items()}
    report = {"what": "EGP vs IMP from the same dense checkpoint, same schedule, per iteration",
              "command": command.strip(), "start": start_path, "arch": start.arch, "arch_kwargs": start.arch_kwargs,
              "data": bundle.spec, "activation_sites": n_sites, "prunable_layers": len(logs["egp"]["prunable_layers"]),
              "settings": settings, "environment": env, "egp": egp, "imp": imp, "verdict": v}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "egp_vs_imp.json", report)
    title = (f"{start.arch} {start.arch_kwargs.get('width', '')} on {bundle.spec}: EGP vs IMP, rate {args.rate}, "
             f"{args.epochs} fine-tuning epochs/iteration")
    plot(egp, imp, dense_acc, args.tolerance, n_sites, title, args.out / "egp_vs_imp.png")
    table = table_md(egp, imp, n_sites)
    md = (f"# EGP vs IMP ({time.strftime('%Y-%m-%d')})\n\n`{report['command']}` from `{start_path}` "
          f"({start.arch} {start.arch_kwargs}, {bundle.spec}); {env['cpu']}, {args.threads} threads, torch "
          f"{env['torch']}, {elapsed / 60:.1f} min.\n\nSparsity: of the prunable layers (those feeding an activation) "
          f"and of all conv/linear weights. Zero-H acts: activation sites with zero layer entropy (of {n_sites}). "
          f"All-zero layers: prunable layers whose weights are all zero.\n\n{table}\n**Verdict:** {v['text']}. "
          f"Over all iterations, EGP had more zero-entropy activations than IMP in {v['wins']} of "
          f"{len(v['iterations'])}, fewer in {v['losses']}.\n")
    write_bytes_atomic(args.out / "egp_vs_imp.md", md.encode())
    print(table)
    print(f"verdict: {v['text']}")
    print(f"EGP more zero-entropy activations than IMP in {v['wins']}/{len(v['iterations'])} "
          f"iterations, fewer in {v['losses']}; {elapsed / 60:.1f} min")
    print(f"wrote {args.out / 'egp_vs_imp.json'}, {args.out / 'egp_vs_imp.md'}, {args.out / 'egp_vs_imp.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
