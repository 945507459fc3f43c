"""egp-build: ONNX -> TensorRT engine (+ sidecar and layer list)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from egp_deploy.cli._common import Precision, console, new_app, run_app, stdout

app = new_app(
    "Build a TensorRT engine from an ONNX model (TensorRT 10 or 11). Writes MODEL.engine, "
    "MODEL.engine.json (TensorRT version, GPU, precision, source ONNX sha256: engines only run "
    "where they were built) and MODEL.engine.layers.json (the engine inspector's layer list). "
    "Build on the device that will run the engine (on a Jetson: on the Jetson)."
)


@app.command()
def build(
    onnx_model: Path = typer.Argument(..., help="The .onnx model to build.", show_default=False),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Engine path (default: MODEL.engine beside the ONNX)."),
    precision: Precision = typer.Option("fp32", "--precision", help="fp32 or fp16. TensorRT 11 is strongly typed: fp16 needs an fp16 ONNX."),
    workspace_mib: int = typer.Option(1024, "--workspace", help="Builder workspace limit in MiB (0: TensorRT's default)."),
    shapes: Optional[str] = typer.Option(None, "--shapes", help="Optimisation profile: NAME:MIN/OPT/MAX, e.g. input:1x3x32x32/8x3x32x32/32x3x32x32; one shape = static. Dynamic batch alone defaults to 1."),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="Timing cache file: read if present, updated after the build (faster rebuilds)."),
    layers: bool = typer.Option(True, "--layers/--no-layers", help="Write the engine's layer list (JSON) beside it."),
) -> None:
    precision = str(precision)
    from egp_deploy.build import build_engine
    from egp_deploy.runners import parse_shapes

    with console.status(f"building {onnx_model.name} with TensorRT ({precision}) ..."):
        result = build_engine(
            onnx_model, output, precision=precision, workspace_mib=workspace_mib or None,
            shapes=parse_shapes(shapes), timing_cache=timing_cache, write_layers=layers,
        )
    sc = result.sidecar
    stdout.print(f"engine:  {result.engine_path}  (TensorRT {sc['tensorrt_version']}, {sc['gpu_name']} "
                 f"sm {sc['compute_capability']}, {sc['precision']})")
    stdout.print(f"sidecar: {result.sidecar_path}")
    if result.layers_path:
        stdout.print(f"layers:  {result.layers_path}  ({len(result.layers)} engine layers)")


def main() -> None:
    run_app(app, "egp-build")


if __name__ == "__main__":
    main()
