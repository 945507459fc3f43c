"""egp-export: PyTorch model -> verified ONNX -> surgered (shallower) ONNX [-> TensorRT engine].

Parses arguments, calls :func:`egp_deploy.api.deploy` and prints; the job itself lives there."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer

from egp_deploy.cli._common import Precision, console, new_app, pass_selection, run_app, stdout

app = new_app(
    "Export a PyTorch model (egp-deploy checkpoint, torch.export .pt2, or with --unsafe-pickle a TorchScript "
    "program or a pickled nn.Module) to one self-contained ONNX file, verify it against PyTorch, then strip the layers EGP "
    "collapsed (graph surgery, verified on calibration and held-out data) and report what was removed and gained."
)


class Exporter(str, Enum):
    auto = "auto"
    legacy = "legacy"
    dynamo = "dynamo"


METRIC_ROWS = (
    ("nodes", "nodes"), ("conv/gemm layers", "conv_gemm_layers"), ("activations", "activations"),
    ("longest path (layers)", "longest_path_layers"), ("parameters", "params"),
    ("parameters (nonzero)", "params_nonzero"), ("MACs (dense)", "macs_dense"),
    ("MACs (nonzero weights)", "macs_nonzero"), ("file size (bytes)", "file_size_bytes"),
)


def _value(choice: Any) -> Any:
    """An Enum choice's value (the option may be declared as an Enum or as plain text)."""
    return getattr(choice, "value", choice)


def print_exported_table(title: str, metrics: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("exported", justify="right")
    for label, key in METRIC_ROWS:
        table.add_row(label, f"{metrics[key]:,}")
    stdout.print(table)


@app.command()
def export(
    model: Path = typer.Argument(..., help="egp-deploy checkpoint, .pt2, or (see --unsafe-pickle) TorchScript archive or pickled module."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Final model path (default: MODEL.egp.onnx beside the input; MODEL.onnx with --no-surgery). The exported graph is written as OUT.onnx beside it."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="One sample's shape C,H,W (no batch) (default: from the checkpoint or .pt2)."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Symbolic batch dimension instead of a static one."),
    batch_size: int = typer.Option(1, "--batch-size", help="Static batch size of the exported graph."),
    calibration: Optional[str] = typer.Option(None, "--calibration", help="Calibration data: a data spec (digits, cifar10:DIR, folder:DIR, plugin:mod:fn), a .npy/.npz file (first half calibrates, second half is held out), or 'random' (default: the checkpoint's data set)."),
    samples: int = typer.Option(256, "--samples", help="Calibration samples (and as many held-out samples)."),
    no_surgery: bool = typer.Option(False, "--no-surgery", help="Only export and verify; skip the graph surgery."),
    unsafe_pickle: bool = typer.Option(False, "--unsafe-pickle", help="Load files that are code, not data: a pickled nn.Module, a TorchScript program, a .pt2 that fails its check. Loading them RUNS ARBITRARY CODE from the file."),
    trust_module: bool = typer.Option(False, "--trust-module", help="Let a checkpoint whose model is package.module:factory import and call it: that RUNS the module's code. Not needed for zoo, torchvision: or timm: models."),
    build: bool = typer.Option(False, "--build", help="Also build a TensorRT engine (OUT.egp.engine) when TensorRT and a GPU are present."),
    precision: Precision = typer.Option("fp32", "--precision", help="Engine precision for --build: fp32 or fp16."),
    report: Optional[Path] = typer.Option(None, "--report", help="JSON report path (default: OUT.egp.json; OUT.export.json with --no-surgery)."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Write a before/after PNG beside the report."),
    exporter: Exporter = typer.Option(Exporter.auto, "--exporter", help="auto: legacy TorchScript exporter for modules (fast, module-path node names), dynamo for .pt2."),
    export_tolerance: float = typer.Option(1e-4, "--export-tolerance", help="Max relative error of the exported graph against PyTorch."),
    settings: list[str] = typer.Option([], "--set", help="Surgery option KEY=VALUE (repeatable), e.g. --set tolerance=1e-5."),
    skip: list[str] = typer.Option([], "--skip", help="Surgery passes not to run (repeatable or comma-separated; an unknown name lists the valid ones)."),
    only: list[str] = typer.Option([], "--only", help="Run only these surgery passes (repeatable or comma-separated); the result is still verified."),
    threads: int = typer.Option(2, "--threads", help="CPU threads for PyTorch and onnxruntime."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random verification/calibration inputs."),
) -> None:
    """Export a PyTorch model to one verified, self-contained ONNX file, then strip what EGP collapsed.

    Writes OUT.onnx (exported, checked against PyTorch with onnxruntime), OUT.egp.onnx (surgered,
    checked against OUT.onnx on calibration and held-out data), OUT.egp.json and OUT.egp.png.
    """
    from egp_deploy.validation import validate_surgery_settings

    validate_surgery_settings(settings)  # the --set texts; deploy() checks every other option
    from rich.markup import escape

    from egp_deploy.api import deploy, parse_surgery_settings

    result = deploy(
        model, output, calibration=calibration, samples=samples, surgery=not no_surgery,
        options={**parse_surgery_settings(settings), **pass_selection(skip, only)}, input_shape=input_shape, dynamic_batch=dynamic_batch,
        batch_size=batch_size, exporter=_value(exporter), export_tolerance=export_tolerance, unsafe_pickle=unsafe_pickle, trust_module=trust_module,
        build=build, precision=_value(precision), report=report, plot=plot, threads=threads, seed=seed,
        progress=console.is_terminal, log=say,
        stage=lambda text: console.status(text) if console.is_terminal else _nothing(),
    )
    if result.surgery is not None:
        from egp_deploy.surgery.report import print_report

        print_report(result.surgery.report, stdout)
        gained = result.gained()
        stdout.print("gained: " + (", ".join(gained) if gained else "nothing to strip (graph was already minimal)"))
    else:
        print_exported_table(f"{model.name}: exported graph", result.metrics_exported)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    p = result.paths
    for key, path in (("exported", p.exported), ("surgered", p.surgered), ("report", p.report), ("plot", p.plot),
                      ("engine", p.engine)):
        if path is not None:
            stdout.print(f"wrote {key}: {path}")


def say(line: str) -> None:
    """A progress line from the library on stderr; its warning:/note: prefix in yellow."""
    from rich.markup import escape

    head, sep, rest = line.partition(": ")
    if sep and head in ("warning", "note"):
        console.print(f"[yellow]{head}:[/] {escape(rest)}", soft_wrap=True)
    else:
        console.print(escape(line), soft_wrap=True)


def _nothing():
    from contextlib import nullcontext

    return nullcontext()


def main() -> None:
    run_app(app, "egp-export")


if __name__ == "__main__":
    main()
