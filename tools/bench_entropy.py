"""Cost of entropy measurement vs a plain no-grad forward pass over the same data (goal <= 1.3x).

    python tools/bench_entropy.py [--checkpoint models/resnet18_digits_egp.pt] [--rounds 15] [--threads 1]

Both run over the same calibration loader (digits val split, batch 256), interleaved A B A B per
round on one process, so they see the same machine state; the figure of merit is the per-round
ratio (median, min, max). Writes docs/results/bench_entropy.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from egp_deploy.bench import cpu_model

ROOT = Path(__file__).resolve().parents[1]



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "resnet18_digits_dense.pt")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (1: stable on a shared machine; 2 threads on 2 busy cores time the contention)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "bench_entropy.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from egp_deploy.checkpoint import load_checkpoint
    from egp_deploy.data import load_data, make_loader
    from egp_deploy.io_utils import write_json_atomic
    from egp_deploy.prune.entropy import measure_entropy
    from egp_deploy.prune.sites import find_sites

    ckpt = load_checkpoint(args.checkpoint)
    model = ckpt.build_model()
    bundle = load_data(ckpt.metadata.get("data", "digits"))
    batches = list(make_loader(bundle.val, args.batch_size))  # decoded once: time the model, not the loader
    sites = find_sites(model)

    @torch.no_grad()
    def plain() -> None:
        for x, _ in batches:
            model(x)

    def entropy() -> None:
        measure_entropy(model, batches, sites=sites)

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # a busy shared machine is noisy
    plain(), entropy()  # warm-up
    t_plain, t_entropy, ratios = [], [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        plain()
        t1 = time.perf_counter()
        entropy()
        t2 = time.perf_counter()
        t_plain.append(t1 - t0)
        t_entropy.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
    med = statistics.median(ratios)
    result = {
        "what": "entropy measurement time / plain no-grad forward time, same data, interleaved per round",
        "checkpoint": str(args.checkpoint.relative_to(ROOT) if args.checkpoint.is_relative_to(ROOT) else args.checkpoint),
        "samples": sum(len(x) for x, _ in batches), "batch_size": args.batch_size, "sites": len(sites),
        "rounds": args.rounds, "ratio": {"median": med, "min": min(ratios), "max": max(ratios)},
        "plain_s_median": statistics.median(t_plain), "entropy_s_median": statistics.median(t_entropy),
        "goal": 1.3, "met": med <= 1.3,
        "environment": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "threads": args.threads,
                        "load_average_1min_before": load_before,
                        "torch": torch.__version__, "python": platform.python_version(),
                        "date": time.strftime("%Y-%m-%d")},
    }
    write_json_atomic(args.out, result)
    print(f"entropy measurement / plain forward: median {med:.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}) "
          f"over {args.rounds} interleaved rounds; plain {result['plain_s_median'] * 1e3:.1f} ms, "
          f"entropy {result['entropy_s_median'] * 1e3:.1f} ms for {result['samples']} samples, {len(sites)} sites; "
          f"goal <= 1.3: {'met' if result['met'] else 'NOT met'}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
