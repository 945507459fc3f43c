"""egp-bench: latency of one or more models side by side (interleaved), trtexec conventions."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from egp_deploy.cli._common import Backend, Precision, console, new_app, run_app, stdout

app = new_app(
    "Latency of one or more models on one backend, interleaved A B A B ... so they see the same "
    "machine state. Warm-up by time, then at least --iterations AND at least --duration seconds; "
    "prints min/median/mean/p90/p95/p99/max, throughput and each model's ratio to the FIRST "
    "(median over rounds, with min-max). Inputs are random (never zeros), drawn once."
)

BACKEND_HELP = (
    "auto (ort-cpu for .onnx, trt for .engine/.plan, torch-cpu for .pt), ort-cpu, ort-cuda, ort-trt, "
    "trt, torch-cpu, torch-cuda"
)


@app.command()
def bench(
    models: list[Path] = typer.Argument(..., help="Models to compare (.onnx, .engine, model.pt); the first is the reference of the ratio.", show_default=False),
    backend: Backend = typer.Option("auto", "--backend", "-b", help=BACKEND_HELP),
    batch: Optional[int] = typer.Option(None, "--batch", help="Batch size for a dynamic batch dimension (default: the model's static batch, else 1)."),
    shapes: Optional[str] = typer.Option(None, "--shapes", help="Input shapes, trtexec style: NAME:1x3x32x32, several separated by commas; overrides --batch for those inputs."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU intra-op threads (default: all usable cores); reported in the JSON."),
    precision: Precision = typer.Option("fp32", "--precision", help="fp32 or fp16 (ort-trt: fp16 kernels; torch-cuda: .half(); ONNX/engines: their own types)."),
    include_copies: bool = typer.Option(False, "--include-copies/--exclude-copies", help="GPU backends: time host<->device copies too (default excludes them, like trtexec)."),
    warmup_ms: float = typer.Option(200.0, "--warmup-ms", help="Warm-up time per model in ms."),
    min_iterations: int = typer.Option(10, "--iterations", help="At least this many timed iterations per model."),
    min_duration_s: float = typer.Option(3.0, "--duration", help="At least this many seconds of timed rounds."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random inputs."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full report (environment, stats, samples) here."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of the latency distribution (and ratios) here."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
) -> None:
    from egp_deploy.api import bench as run_bench
    from egp_deploy.bench import print_table
    from egp_deploy.runners import parse_shapes

    result = run_bench(
        models, getattr(backend, "value", backend), progress=progress, json_path=json_out, plot_path=plot,
        warmup_ms=warmup_ms, min_iterations=min_iterations, min_duration_s=min_duration_s, batch=batch,
        shapes=parse_shapes(shapes), threads=threads, precision=getattr(precision, "value", precision),
        include_copies=include_copies, seed=seed,
    )
    print_table(result.data, stdout)
    if json_out:
        console.print(f"report: {json_out}")
    if plot:
        console.print(f"plot: {plot}")


def main() -> None:
    run_app(app, "egp-bench")


if __name__ == "__main__":
    main()
