"""Make the shipped reference checkpoints in models/ (dense and EGP-pruned ResNet-18 on digits).

    python tools/make_reference_models.py            # ~10 min on 2 CPU cores

Runs exactly:
    egp-prune resnet18 --arch-kwargs width=16 --dense-epochs 30 --epochs 14 --lr 0.05 \
        --iterations 12 --tolerance 1.0 --patience 2 --seed 0 -o runs/reference_resnet18 -q
then copies dense.pt -> models/resnet18_digits_dense.pt and best.pt -> models/resnet18_digits_egp.pt
and prints the figures models/README.md quotes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMAND = [
    "resnet18", "--arch-kwargs", "width=16", "--dense-epochs", "30", "--epochs", "14", "--lr", "0.05",
    "--iterations", "12", "--tolerance", "1.0", "--patience", "2", "--seed", "0", "-q",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "reference_resnet18")
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "egp_deploy.cli", "prune", *COMMAND, "-o", str(args.run_dir)]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)
    log = json.loads((args.run_dir / "log.json").read_text())
    args.models.mkdir(exist_ok=True)
    shutil.copyfile(args.run_dir / "dense.pt", args.models / "resnet18_digits_dense.pt")
    shutil.copyfile(args.run_dir / "best.pt", args.models / "resnet18_digits_egp.pt")
    shutil.copyfile(args.run_dir / "entropy.png", args.models / "resnet18_digits_egp_entropy.png")
    shutil.copyfile(args.run_dir / "log.json", args.models / "resnet18_digits_egp_log.json")
    dense, best = log["iterations"][0], log["iterations"][log["best_iteration"]]
    for name, r in (("dense", dense), ("egp", best)):
        print(f"{name}: iteration {r['iteration']} test {r['test_acc']:.2f} % sparsity(prunable) "
              f"{r['sparsity_prunable']:.4f} zero-entropy {len(r['zero_entropy_sites'])}/{len(r['entropy'])} "
              f"all-zero layers {len(r['all_zero_layers'])} zero out-channels {r['zero_output_channels']}/{r['output_channels']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
