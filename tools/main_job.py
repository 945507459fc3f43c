"""The main job, end to end on the bundled default (digits, CPU, no download), in ~5 minutes:

    dense ResNet-18 (models/, or trained now) -> egp-prune (EGP, accuracy tolerance)
      -> egp-export (ONNX + graph surgery + verification) -> egp-bench (dense vs pruned+surgered,
      onnxruntime CPU, interleaved) -> egp-check (latency budget) -> egp-build (only with TensorRT + GPU)
      -> one summary table, summary.json and the path of every artefact.

Every stage runs through its console command, exactly as a user would type it; each command is
printed before it runs. Usage: python tools/main_job.py [--out runs/main_job] [--quick]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
DENSE = ROOT / "models" / "resnet18_digits_dense.pt"
console = Console(highlight=False)


def run(stage: str, *args: str, ok_codes: tuple[int, ...] = (0,)) -> tuple[int, float]:
    cmd = [sys.executable, "-m", "egp_deploy.cli", stage, *args]
    shown = " ".join(shlex.quote(a) for a in [f"egp-{stage}", *args])
    console.rule(f"[bold]{stage}")
    console.print(f"$ {shown}")
    t0 = time.perf_counter()
    code = subprocess.run(cmd, cwd=ROOT).returncode
    if code not in ok_codes:
        console.print(f"[bold red]main job stopped:[/] egp-{stage} exited with {code}")
        sys.exit(code)
    return code, time.perf_counter() - t0


def tensorrt_status() -> str | None:
    """None when an engine can be built here, else the reason why not."""
    try:
        import tensorrt  # noqa: F401
    except Exception as e:
        return f"TensorRT is not installed ({type(e).__name__}); install egp-deploy[tensorrt-cu12] or [tensorrt-cu13] on a GPU machine"
    import torch

    return None if torch.cuda.is_available() else "TensorRT imports but no CUDA GPU is visible"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "main_job")
    ap.add_argument("--quick", action="store_true", help="Fewer iterations/epochs (a smoke run, ~2 min).")
    ap.add_argument("--budget-ms", type=float, default=20.0, help="Latency budget of the egp-check step (p99, batch 1).")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    dense = DENSE
    if not dense.is_file():  # no shipped model: train a dense one quickly
        _, times["train dense"] = run("prune", "resnet18", "--arch-kwargs", "width=16", "--dense-epochs", "15",
                                      "--iterations", "0", "-o", str(out / "dense"))
        dense = out / "dense" / "dense.pt"

    iters, epochs = ("2", "2") if args.quick else ("7", "8")
    # --force: the job owns its folder, so running it again replaces the previous run
    _, times["prune"] = run("prune", str(dense), "--method", "egp", "--iterations", iters, "--epochs", epochs,
                            "--tolerance", "1.0", "--patience", "2", "--force", "-o", str(out / "prune"))
    _, times["export dense"] = run("export", str(dense), "--no-surgery", "-o", str(out / "dense.onnx"))
    _, times["export + surgery"] = run("export", str(out / "prune" / "best.pt"), "-o", str(out / "pruned.egp.onnx"))
    duration = "2" if args.quick else "4"
    _, times["bench"] = run("bench", str(out / "dense.onnx"), str(out / "pruned.onnx"), str(out / "pruned.egp.onnx"),
                            "--backend", "ort-cpu", "--threads", "1", "--duration", duration, "--no-progress",
                            "--json", str(out / "bench.json"), "--plot", str(out / "bench.png"))
    check_code, times["check"] = run("check", str(out / "pruned.egp.onnx"), "--budget-ms", str(args.budget_ms),
                                     "--percentile", "99", "--backend", "ort-cpu", "--threads", "1",
                                     "--duration", "2", "--json", str(out / "check.json"), ok_codes=(0, 1))
    trt_reason = tensorrt_status()
    if trt_reason is None:
        _, times["build"] = run("build", str(out / "pruned.egp.onnx"), "-o", str(out / "pruned.egp.engine"))
    else:
        console.rule("[bold]build")
        console.print(f"skipped the TensorRT engine: {escape(trt_reason)}")

    log = json.loads((out / "prune" / "log.json").read_text())
    start, best = log["iterations"][0], log["iterations"][log["best_iteration"]]
    report = json.loads((out / "pruned.egp.json").read_text())
    bench = json.loads((out / "bench.json").read_text())
    check = json.loads((out / "check.json").read_text())
    summary = summarize(start, best, report, bench, check, trt_reason, times, out)
    from egp_deploy.io_utils import write_json_atomic

    write_json_atomic(out / "summary.json", summary)
    print_summary(summary)
    return 0


def summarize(start, best, report, bench, check, trt_reason, times, out: Path) -> dict:
    models = bench.get("models", [])
    ratio = {Path(m["path"]).name: m["ratio_to_first"] for m in models[1:]}
    before, after = report["metrics_exported"], report["metrics_surgered"]
    sites = len(start["entropy"])
    return {
        "dense_test_acc": start["test_acc"],
        "pruned_test_acc": best["test_acc"],
        "pruned_iteration": best["iteration"],
        "sparsity_prunable": best["sparsity_prunable"],
        "zero_entropy_activations": f"{len(best['zero_entropy_sites'])}/{sites}",
        "all_zero_layers": len(best["all_zero_layers"]),
        "conv_gemm_layers": [before.get("conv_gemm_layers"), after.get("conv_gemm_layers")],
        "activations": [before.get("activations"), after.get("activations")],
        "longest_path": [before.get("longest_path_layers"), after.get("longest_path_layers")],
        "macs_dense": [before.get("macs_dense"), after.get("macs_dense")],
        "verification": {k: report["surgery"]["verification"].get(k) for k in ("calibration", "held_out")},
        "layers_removed": report["surgery"].get("layers_removed"),
        "latency_ratio_vs_dense": ratio,
        "check": {"verdict": check.get("verdict"), "budget_ms": check.get("budget_ms"),
                  "measured_ms": check.get("measured_ms"), "percentile": check.get("percentile")},
        "tensorrt": "built" if trt_reason is None else f"skipped: {trt_reason}",
        "seconds": times,
        "artefacts": {p.name: str(p) for p in sorted(out.rglob("*")) if p.is_file() and p.suffix in
                      (".pt", ".onnx", ".json", ".png", ".engine") and "iter_" not in p.name},
    }


def print_summary(s: dict) -> None:
    t = Table(title="egp-deploy main job: digits ResNet-18, onnxruntime CPU")
    t.add_column("what")
    t.add_column("result", justify="right")
    t.add_row("test accuracy dense -> pruned", f"{s['dense_test_acc']:.2f} % -> {s['pruned_test_acc']:.2f} %")
    t.add_row("sparsity of prunable weights", f"{100 * s['sparsity_prunable']:.1f} % (iteration {s['pruned_iteration']})")
    t.add_row("zero-entropy activations / all-zero layers", f"{s['zero_entropy_activations']} / {s['all_zero_layers']}")
    for key, label in (("conv_gemm_layers", "conv/gemm layers"), ("activations", "activations"),
                       ("longest_path", "longest path (conv/gemm)"), ("macs_dense", "MACs")):
        a, b = s[key]
        t.add_row(f"{label}: exported -> surgered", f"{a:,} -> {b:,}")
    for part in ("calibration", "held_out"):
        v = s["verification"].get(part) or {}
        t.add_row(f"verification ({part.replace('_', '-')})",
                  f"rel. err {v.get('rel_error', float('nan')):.1e}, top-1 agree {v.get('top1_agreement', float('nan')):.1%}")
    for name, r in s["latency_ratio_vs_dense"].items():
        t.add_row(f"latency {name} / dense.onnx (ORT CPU, b=1)", f"{r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f})")
    c = s["check"]
    t.add_row("egp-check", f"{c['verdict']}: p{c['percentile']:g} {c['measured_ms']:.3f} ms vs budget {c['budget_ms']:g} ms")
    t.add_row("TensorRT engine", escape(s["tensorrt"]))
    console.print(t)
    console.print("artefacts:")
    for name, path in s["artefacts"].items():
        console.print(f"  {path}")


if __name__ == "__main__":
    sys.exit(main())
