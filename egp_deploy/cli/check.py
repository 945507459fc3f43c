"""egp-check: the latency gate. Exit 0 within budget, 1 over budget, 2 could not measure."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from egp_deploy.cli._common import Backend, Precision, console, new_app, run_app, stdout

from egp_deploy.api import CHECK_SCHEMA as SCHEMA, EXIT_INTERRUPTED, EXIT_OVER, EXIT_PASS, EXIT_UNMEASURED  # noqa: F401

app = new_app(
    "Latency gate for CI and edge devices: measure MODEL (trtexec conventions, see egp-bench) and "
    "compare the --percentile latency with --budget-ms. --json gets the verdict on every exit path.",
    epilog="Exit codes: 0 within budget, 1 over budget, 2 could not measure (bad command line, bad input, "
           "missing backend, no GPU, ...), saying which, 130 interrupted. --json is written in every case.",
)


@app.command()
def check(
    model: Path = typer.Argument(..., help="Model to gate (.onnx, .engine/.plan, model.pt).", show_default=False),
    budget_ms: float = typer.Option(..., "--budget-ms", help="Latency budget in milliseconds.", show_default=False),
    percentile: float = typer.Option(99.0, "--percentile", help="Which latency percentile must fit the budget (50 = median)."),
    backend: Backend = typer.Option("auto", "--backend", "-b", help="auto (ort-cpu for .onnx, trt for engines, torch-cpu for .pt), ort-cpu, ort-cuda, ort-trt, trt, torch-cpu, torch-cuda."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Batch size for a dynamic batch dimension (default: static batch, else 1)."),
    shapes: Optional[str] = typer.Option(None, "--shapes", help="Input shapes NAME:1x3x32x32, several separated by commas."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU intra-op threads (default: all usable cores)."),
    precision: Precision = typer.Option("fp32", "--precision", help="fp32 or fp16 (see egp-bench)."),
    include_copies: bool = typer.Option(False, "--include-copies/--exclude-copies", help="GPU: include host<->device copies in the timing."),
    warmup_ms: float = typer.Option(200.0, "--warmup-ms", help="Warm-up time in ms."),
    min_iterations: int = typer.Option(10, "--iterations", help="At least this many timed iterations."),
    min_duration_s: float = typer.Option(3.0, "--duration", help="At least this many seconds of timing."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the verdict, measurement and environment here (also when it could not measure)."),
) -> None:
    from rich.markup import escape

    from egp_deploy.api import check as run_check

    try:
        from egp_deploy.runners import parse_shapes
        parsed = parse_shapes(shapes)
    except Exception as e:  # noqa: BLE001 - a bad --shapes is "could not measure" too
        parsed, shape_error = None, e
    else:
        shape_error = None
    settings = dict(warmup_ms=warmup_ms, min_iterations=min_iterations, min_duration_s=min_duration_s, batch=batch,
                    shapes=parsed, threads=threads, precision=_value(precision), include_copies=include_copies)
    try:
        result = run_check(model, budget_ms, percentile=percentile, backend=_value(backend), json_path=json_out,
                           _error=shape_error, **settings)
    except OSError as e:
        console.print(f"[bold red]error:[/] cannot write {json_out}: {e}")
        raise typer.Exit(EXIT_UNMEASURED) from None
    if result.exit_code in (EXIT_UNMEASURED, EXIT_INTERRUPTED):
        console.print(f"[bold red]error:[/] {escape(result.message)}", soft_wrap=True)
    else:
        stdout.print(escape(result.message), soft_wrap=True)
        for w in result.report.get("warnings", []):
            console.print(f"[yellow]warning:[/] {escape(w)}", soft_wrap=True)
    raise typer.Exit(result.exit_code)


def _value(choice):
    """An Enum choice's value (the option may be declared as an Enum or as plain text)."""
    return getattr(choice, "value", choice)


def _json_path_from(argv: list[str]) -> tuple[Optional[Path], list[str]]:
    """--json PATH / --json=PATH from a command line click could not parse, and the other arguments."""
    for i, arg in enumerate(argv):
        if arg == "--json" and i + 1 < len(argv):
            return Path(argv[i + 1]), argv[:i] + argv[i + 2:]
        if arg.startswith("--json="):
            return Path(arg.split("=", 1)[1]), argv[:i] + argv[i + 1:]
    return None, argv


def _report_argument_error(argv: list[str], message: str) -> None:
    """The documented promise: --json is written on every exit path, a bad command line included."""
    from egp_deploy.api import _environment_or_error
    from egp_deploy.io_utils import write_json_atomic
    from egp_deploy.validation import output_is_safe

    json_out, others = _json_path_from(argv)
    # never over a file the command line names (the model): any existing path among the others counts
    if json_out is None or not output_is_safe([a for a in others if Path(a).exists()], json_out):
        return
    report = {"schema": SCHEMA, "argv": argv, "verdict": "could_not_measure", "exit_code": EXIT_UNMEASURED,
              "error": "UsageError", "message": f"could not measure (UsageError): {message}",
              "environment": _environment_or_error()}
    try:
        write_json_atomic(json_out, report)
    except OSError as e:
        console.print(f"[bold red]error:[/] cannot write {json_out}: {e}")


def main() -> None:
    # anything that escapes the command (e.g. an unexpected error outside it) is "could not measure"
    run_app(app, "egp-check", error_exit=lambda e: EXIT_UNMEASURED, on_argument_error=_report_argument_error)


if __name__ == "__main__":
    main()
