"""Make the shipped reference checkpoints in models/ (dense and EGP-pruned ResNet-18 on digits).

    python tools/make_reference_models.py                    # width 16, ~10 min on 2 CPU cores
    python tools/make_reference_models.py --width 32         # the wider EGP reference, ~25 min

Runs exactly (W = --width):
    egp-prune resnet18 --arch-kwargs width=W --dense-epochs 30 --epochs 14 --lr 0.05 \
        --iterations 12 --tolerance 1.0 --patience 2 --seed 0 -o RUN -q
then copies into models/
    width 16: dense.pt -> resnet18_digits_dense.pt, best.pt -> resnet18_digits_egp.pt
    width W != 16: best.pt -> resnet18_wW_digits_egp.pt only (its dense checkpoint is ~11 MB of
        incompressible floats at width 32; tools/wide_reference.py remakes it with this same command)
plus the run's log.json and entropy plot beside the EGP checkpoint, and prints the figures
models/README.md quotes. --reuse skips pruning when RUN already holds a finished run of this recipe.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ITERATIONS = 12


def prune_args(width: int, iterations: int = ITERATIONS) -> list[str]:
    """The reference recipe as egp-prune arguments (also used by tools/wide_reference.py)."""
    return ["resnet18", "--arch-kwargs", f"width={width}", "--dense-epochs", "30", "--epochs", "14", "--lr", "0.05",
            "--iterations", str(iterations), "--tolerance", "1.0", "--patience", "2", "--seed", "0"]


def finished(run: Path, iterations: int = ITERATIONS) -> bool:
    """True when RUN holds a completed run: a log that stopped early or ran all ``iterations``, with
    its dense.pt and best.pt."""
    try:
        log = json.loads((run / "log.json").read_text())
    except (OSError, ValueError):
        return False
    done = log.get("stopped") or len(log.get("iterations", [])) > iterations
    return bool(done) and (run / "best.pt").is_file() and (run / "dense.pt").is_file()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=16, help="ResNet-18 base width (default 16)")
    ap.add_argument("--run-dir", type=Path, default=None,
                    help="default runs/reference_resnet18 (width 16) or runs/wide_reference_wW")
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--reuse", action="store_true", help="skip pruning when the run folder holds a finished run")
    args = ap.parse_args()
    if args.width < 1:
        ap.error("--width must be positive")
    run = args.run_dir or ROOT / "runs" / ("reference_resnet18" if args.width == 16 else f"wide_reference_w{args.width}")
    if args.reuse and finished(run):
        print(f"reusing the finished run in {run}", flush=True)
    else:
        cmd = [sys.executable, "-m", "egp_deploy.cli", "prune", *prune_args(args.width), "-o", str(run)]
        print("$ egp-prune", " ".join(cmd[4:]), flush=True)
        if subprocess.run(cmd).returncode != 0:
            print("error: egp-prune failed (see above)", file=sys.stderr)
            return 1
    log = json.loads((run / "log.json").read_text())
    stem = "resnet18_digits" if args.width == 16 else f"resnet18_w{args.width}_digits"
    args.models.mkdir(exist_ok=True)
    if args.width == 16:
        shutil.copyfile(run / "dense.pt", args.models / f"{stem}_dense.pt")
    shutil.copyfile(run / "best.pt", args.models / f"{stem}_egp.pt")
    shutil.copyfile(run / "entropy.png", args.models / f"{stem}_egp_entropy.png")
    shutil.copyfile(run / "log.json", args.models / f"{stem}_egp_log.json")
    dense, best = log["iterations"][0], log["iterations"][log["best_iteration"]]
    for name, r in (("dense", dense), ("egp", best)):
        print(f"{name}: iteration {r['iteration']} test {r['test_acc']:.2f} % sparsity(prunable) "
              f"{r['sparsity_prunable']:.4f} zero-entropy {len(r['zero_entropy_sites'])}/{len(r['entropy'])} "
              f"all-zero layers {len(r['all_zero_layers'])} zero out-channels {r['zero_output_channels']}/{r['output_channels']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
