"""egp-surgery: strip collapsed layers from an ONNX graph, verified against the input graph.

Parses arguments, calls :func:`egp_deploy.api.surgery_file` and prints."""

from __future__ import annotations

import os

from pathlib import Path
from typing import Optional

import typer

from egp_deploy.cli._common import choices, console, new_app, pass_selection, run_app, stdout
from egp_deploy.validation import SURGERY_CHOICES
from egp_deploy.numeric import DATA_DEPENDENT_ERROR_BOUND

Cost = choices("Cost", SURGERY_CHOICES["cost"])
LatencyBackend = choices("LatencyBackend", SURGERY_CHOICES["latency_backend"])

app = new_app(
    "Graph surgery on an ONNX model: fold BN/constants/identities, measure the graph's own activation "
    "states on calibration data, strip always-linear activations, eliminate dead channels and constant "
    "layers, merge linear chains where exact; verify against the input and write only if it matches."
)


@app.command()
def surgery(
    input: Path = typer.Argument(..., help="ONNX model to rewrite."),
    output: Path = typer.Argument(..., help="Where to write the rewritten model (never the input)."),
    calibration: Optional[str] = typer.Option(
        None, "--calibration", "-c",
        help="Calibration inputs: digits | cifar10:DIR | folder:DIR | plugin:mod:func (its val split) | "
             "file.npy (N, C, H, W) | random. Default: random normal, with a warning."),
    held_out: Optional[str] = typer.Option(
        None, "--held-out",
        help="Held-out inputs for verification (same forms). Default: the test split of a data set "
             "given as --calibration, otherwise fresh random normal inputs."),
    samples: int = typer.Option(256, "--samples", "-n", help="Calibration samples."),
    held_out_samples: int = typer.Option(256, "--held-out-samples", help="Held-out samples."),
    tolerance: float = typer.Option(1e-5, help="Max relative error max|y'-y|/max|y| of exact rewrites."),
    max_mac_growth: float = typer.Option(
        1.0, help="With --cost macs: a merged segment may cost at most this factor x the MACs of the layers it replaces."),
    allow_inexact_merge: bool = typer.Option(
        False, help="Also merge k x k + k x k convs (wrong near the border; the error is reported)."),
    channel_multiple: int = typer.Option(
        8, help="Keep narrowed channel counts at multiples of this (runtimes block channels by 8/16; "
                       "1 narrows fully)."),
    simplify_layout_chains: bool = typer.Option(
        False, help="Also collapse Reshape/Transpose chains (fewer nodes; can defeat onnxruntime's MatMul "
                    "fusion and run slower: benchmark it)."),
    strip: bool = typer.Option(True, help="Strip activations found always linear on calibration data (data-dependent)."),
    min_held_out_agreement: float = typer.Option(
        0.99, "--min-agreement", help="Held-out top-1 agreement the data-dependent strips must keep, else they are reverted."),
    linearize_smooth: bool = typer.Option(
        False, help="Replace GELU/SiLU/HardSwish/Mish whose channels each stayed ON or OFF on calibration data by "
                    "x / 0 (NOT exact: the error is reported and held to the inexact tolerance)."),
    max_data_dependent_error: float = typer.Option(
        DATA_DEPENDENT_ERROR_BOUND,
        help="Bound on the held-out rel. error a data-dependent strip may add, at its site and in the result; "
             "above it the strip is reverted, site by site (1: no bound)."),
    batch_size: int = typer.Option(32, help="Inference batch size for measurement and verification."),
    threads: int = typer.Option(0, help="onnxruntime intra-op threads (0: onnxruntime's default)."),
    cost: Cost = typer.Option(
        "macs", "--cost", help="What the chain merge planner minimises: macs (deterministic) or latency (each "
                               "candidate merge timed as a small graph on --backend)."),
    backend: LatencyBackend = typer.Option("ort-cpu", "--backend", help="With --cost latency: the backend merges are timed on."),
    latency_table: Optional[Path] = typer.Option(
        None, "--latency-table", help="With --cost latency: JSON table of timings to reuse and extend "
                                      "(default: a per-device cache under ~/.cache/egp-deploy/latency)."),
    latency_margin: float = typer.Option(
        0.05, "--latency-margin", help="With --cost latency: a merge must be this fraction faster."),
    skip: list[str] = typer.Option([], "--skip", help="Surgery passes not to run (repeatable or comma-separated; an unknown name lists the valid ones)."),
    only: list[str] = typer.Option([], "--only", help="Run only these surgery passes (repeatable or comma-separated); the result is still verified."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the JSON report here."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a before/after PNG here."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No table, no progress bar."),
) -> None:
    """Rewrite INPUT into a shallower, narrower graph and write it to OUTPUT after verification."""
    from egp_deploy.api import surgery_file
    from egp_deploy.cli.export import say
    from egp_deploy.surgery.report import print_report

    options = dict(
        tolerance=tolerance, max_mac_growth=max_mac_growth, allow_inexact_merge=allow_inexact_merge,
        channel_multiple=channel_multiple, simplify_layout_chains=simplify_layout_chains, strip_activations=strip,
        min_held_out_agreement=min_held_out_agreement, batch_size=batch_size, threads=threads, progress=not quiet,
        linearize_smooth=linearize_smooth, max_data_dependent_error=max_data_dependent_error,
        cost=str(cost), latency_backend=str(backend), latency_margin=latency_margin,
        latency_table=None if latency_table is None else os.fspath(latency_table), **pass_selection(skip, only),
    )
    warn = lambda line: say(line) if (not quiet or line.startswith("warning:")) else None  # noqa: E731
    result = surgery_file(input, output, calibration=calibration, held_out=held_out, samples=samples,
                          held_out_samples=held_out_samples, options=options, report=report, plot=plot, log=warn)
    if quiet:  # print_report shows them otherwise
        for w in result.report.get("warnings") or []:
            console.print(f"[yellow]warning:[/] {w}")
    if not quiet:
        print_report(result.report, stdout)
        _print_planner(result.report.get("merge_planner") or {})
        stdout.print(f"wrote {output}" + (f", {report}" if report else "") + (f", {plot}" if plot else ""))


def _print_planner(planner: dict) -> None:
    if planner.get("cost") != "latency":
        return
    table = planner["table"]
    stdout.print(f"merge planner: latency on {planner['backend']} ({table['device']}): {planner['measured_graphs']} "
                 f"graphs measured in {planner['measure_s']:.1f} s, {planner['graphs_from_table']} from the table"
                 + (f"; table {table['path']} written" if planner.get("table_written") else ""))
    for c in planner.get("candidates", []):
        if "ms_merged" in c:
            stdout.print(f"  {' + '.join(c['layers'])}: {c['ms_merged']:.4f} ms merged vs {c['ms_span']:.4f} ms "
                         f"({c['macs_merged']:,} vs {c['macs_span']:,} MACs): {c['decision']}, {c['why']}", soft_wrap=True)


def main() -> None:
    run_app(app, "egp-surgery")


if __name__ == "__main__":
    main()
