#!/usr/bin/env python
"""GPU verification for the machine in ../shared/DEVICE.md (python 3.12, torch CUDA, onnxruntime
CPU build, no network): install the wheels that travelled, then time on the GPU

  * torch-cuda: dense vs EGP-pruned reference checkpoints (models/resnet18_digits_{dense,egp}.pt),
    CUDA events, CUDA graphs where capture works;
  * ort-cuda (only when onnxruntime-gpu travelled): exported vs surgered graph
    (models/resnet18_digits_egp.onnx vs .egp.onnx), after checking both against ORT CPU;

interleaved per pair, at several batch sizes, and print a table (device, date, versions) last.
Writes JSON to docs/results/gpu_verify.json (change with --out).

Run on the GPU machine from the repository root, e.g.
    python3 tools/gpu_verify.py --wheels .whl                 # torch CUDA only
    python3 tools/gpu_verify.py --wheels .whl --ort-gpu-parts '/tmp/onnxruntime_gpu*.part*'
Wheels: `pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl NAME` for
typer, rich, tqdm, click, shellingham, typing_extensions, markdown_it_py, mdurl, pygments (the
CLI stack is optional: this script only needs numpy, torch, onnx and onnxruntime). onnxruntime-gpu
is 255 MB: split it (`split -b 60M`), send one part per command into /tmp, join here.
`--cpu` smoke-tests the script on a machine without a GPU (torch-cpu / ort-cpu).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
STAGE_ENV = "EGP_GPU_VERIFY_STAGE"


# ---------------------------------------------------------------------------- stage 1: install
def install_wheels(wheels: list[Path], site: Path) -> list[str]:
    """pip --no-index --no-deps --target SITE; plain unzip when pip is missing (a bare machine)."""
    site.mkdir(parents=True, exist_ok=True)
    if not wheels:
        return []
    pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True)
    if pip.returncode == 0:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--upgrade",
               "--target", str(site), *map(str, wheels)]
        subprocess.run(cmd, check=True)
    else:
        for whl in wheels:  # a wheel is a zip laid out as site-packages expects
            with zipfile.ZipFile(whl) as z:
                z.extractall(site)
    return [w.name for w in wheels]


def join_parts(pattern: str, dest_dir: Path) -> Path | None:
    """Concatenate NAME.whl.partaa, .partab, ... (split -b 60M) back into NAME.whl."""
    parts = sorted(glob.glob(pattern))
    if not parts:
        return None
    name = Path(parts[0]).name
    whl_name = name[: name.rindex(".part")] if ".part" in name else name + ".whl"
    dest = dest_dir / whl_name
    tmp = dest.with_suffix(".joining")
    with open(tmp, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
    os.replace(tmp, dest)
    if not zipfile.is_zipfile(dest):
        raise SystemExit(f"error: joined {len(parts)} parts into {dest}, but it is not a wheel (a part missing?)")
    return dest


# ---------------------------------------------------------------------------- stage 2: measure
def fmt_row(cells, widths):
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def measure(args) -> int:
    import torch

    from egp_deploy.bench import BenchSettings, benchmark_models, collect_environment
    from egp_deploy.compare import compare_models
    from egp_deploy.errors import EgpError
    from egp_deploy.io_utils import write_json_atomic

    cpu = args.cpu
    if not cpu and not torch.cuda.is_available():
        print(f"error: torch {torch.__version__} sees no CUDA GPU (use --cpu for a smoke test)", file=sys.stderr)
        return 2
    torch_backend, ort_backend = ("torch-cpu", "ort-cpu") if cpu else ("torch-cuda", "ort-cuda")
    batches = [int(b) for b in args.batches.split(",")]
    results: dict = {"tool": "tools/gpu_verify.py", "installed": json.loads(os.environ.get("EGP_GPU_VERIFY_INSTALLED", "[]")),
                     "pairs": [], "checks": [], "skipped": []}

    def settings(batch):
        return BenchSettings(warmup_ms=args.warmup_ms, min_iterations=args.iterations, min_duration_s=args.duration,
                             batch=batch, threads=args.threads, include_copies=args.include_copies)

    pairs = [("torch", torch_backend, args.dense, args.egp), ("onnxruntime", ort_backend, args.exported, args.surgered)]
    for label, backend, a, b in pairs:
        missing = [str(p) for p in (a, b) if not Path(p).is_file()]
        if missing:
            results["skipped"].append(f"{label}: missing {', '.join(missing)}")
            continue
        try:
            if label == "onnxruntime":  # both graphs against ORT CPU on the exported graph first
                for model in (a, b):
                    r = compare_models(model, a, backend=backend, precision="fp32", batches=4)
                    results["checks"].append({"model": str(model), "backend": backend, "passed": r.passed,
                                              "max_rel_error": r.min_passing_tolerance, "message": r.message})
            else:
                onnx_ref = Path(args.exported)
                if onnx_ref.is_file():
                    r = compare_models(b, onnx_ref, backend=backend, precision="fp32", batches=4)
                    results["checks"].append({"model": str(b), "backend": backend, "reference": str(onnx_ref),
                                              "passed": r.passed, "max_rel_error": r.min_passing_tolerance,
                                              "message": r.message})
        except EgpError as e:
            results["skipped"].append(f"{label} on {backend}: {e}")
            continue
        for batch in batches:
            try:
                rep = benchmark_models([a, b], backend, settings(batch), progress=False, keep_samples=False)
            except EgpError as e:  # e.g. a static-batch ONNX at batch 32 (export with --dynamic-batch)
                results["skipped"].append(f"{label} on {backend}, batch {batch}: {e}")
                continue
            ma, mb = rep["models"]
            results["pairs"].append({
                "what": label, "backend": backend, "batch": batch,
                "a": ma["name"], "b": mb["name"],
                "a_median_ms": ma["latency_ms"]["median"], "b_median_ms": mb["latency_ms"]["median"],
                "a_p99_ms": ma["latency_ms"]["p99"], "b_p99_ms": mb["latency_ms"]["p99"],
                "ratio_b_to_a": mb["ratio_to_first"], "cv": [ma["cv"], mb["cv"]],
                "details": [ma["backend_details"], mb["backend_details"]], "rounds": rep["rounds"],
            })

    env = collect_environment()
    results["environment"] = env
    out = write_json_atomic(args.out, results)

    print()
    print(f"device: {env['gpu_name'] or 'no GPU (--cpu smoke test)'}  sm {env['gpu_compute_capability']}  "
          f"driver {env['gpu_driver']}  CUDA {env['cuda']}  date {env['date_utc']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    for c in results["checks"]:
        print(f"check {Path(c['model']).name} on {c['backend']}: {c['message']}")
    widths = [12, 10, 5, 26, 26, 10, 10, 22]
    print(fmt_row(["what", "backend", "batch", "A", "B", "A med ms", "B med ms", "B/A median (min-max)"], widths))
    for p in results["pairs"]:
        r = p["ratio_b_to_a"]
        print(fmt_row([p["what"], p["backend"], p["batch"], p["a"], p["b"], f"{p['a_median_ms']:.4f}",
                       f"{p['b_median_ms']:.4f}", f"{r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f})"], widths))
    for s in results["skipped"]:
        print(f"skipped: {s}")
    print(f"wrote {out}")
    return 0 if results["pairs"] else 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="folder of wheels that travelled (default .whl/)")
    ap.add_argument("--ort-gpu-parts", default="/tmp/onnxruntime_gpu*.part*",
                    help="glob of the split onnxruntime-gpu wheel parts (joined and installed when present)")
    ap.add_argument("--site", type=Path, default=Path("/tmp/site"), help="install target (default /tmp/site)")
    ap.add_argument("--dense", type=Path, default=MODELS / "resnet18_digits_dense.pt")
    ap.add_argument("--egp", type=Path, default=MODELS / "resnet18_digits_egp.pt")
    ap.add_argument("--exported", type=Path, default=MODELS / "resnet18_digits_egp.onnx")
    ap.add_argument("--surgered", type=Path, default=MODELS / "resnet18_digits_egp.egp.onnx")
    ap.add_argument("--batches", default="1,32", help="comma-separated batch sizes (default 1,32)")
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--warmup-ms", type=float, default=200.0)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (ort-cpu/torch-cpu in --cpu mode)")
    ap.add_argument("--include-copies", action="store_true", help="time host<->device copies too")
    ap.add_argument("--cpu", action="store_true", help="smoke test without a GPU (torch-cpu / ort-cpu)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "gpu_verify.json")
    args = ap.parse_args(argv)

    if os.environ.get(STAGE_ENV) != "measure":
        wheels = sorted(args.wheels.glob("*.whl")) if args.wheels.is_dir() else []
        ort_gpu = join_parts(args.ort_gpu_parts, Path("/tmp"))
        if ort_gpu:
            wheels.append(ort_gpu)
        installed = install_wheels(wheels, args.site)
        env = dict(os.environ)
        env[STAGE_ENV] = "measure"
        env["EGP_GPU_VERIFY_INSTALLED"] = json.dumps(installed)
        # our site first (onnxruntime-gpu shadows the CPU build: same module name), then the repo
        env["PYTHONPATH"] = os.pathsep.join([str(args.site), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        print(f"installed {len(installed)} wheel(s) into {args.site}: {', '.join(installed) or '-'}")
        return subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env=env).returncode
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())
