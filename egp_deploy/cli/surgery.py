"""egp-surgery: strip collapsed layers from an ONNX graph, verified against the input graph."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from egp_deploy.cli._common import choices, console, new_app, run_app, stdout
from egp_deploy.errors import DataError, InputFileError, UsageError, first_words

Cost = choices("Cost", ("macs", "latency"))
LatencyBackend = choices("LatencyBackend", ("ort-cpu", "ort-cuda", "ort-trt"))

app = new_app(
    "Graph surgery on an ONNX model: fold BN/constants/identities, measure the graph's own activation "
    "states on calibration data, strip always-linear activations, eliminate dead channels and constant "
    "layers, merge linear chains where exact; verify against the input and write only if it matches."
)


def _load_model(path: Path):
    import onnx
    from google.protobuf.message import DecodeError

    if not path.is_file():
        raise InputFileError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path))
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise InputFileError(f"{path} is not a readable ONNX model ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else 'truncated or not protobuf'})") from None
    except Exception as e:  # protobuf's C++ parser and onnx's checker raise their own types
        reason = f": {first_words(e)}" if str(e).strip() else ""
        raise InputFileError(f"{path} is not a readable ONNX model ({type(e).__name__}{reason})") from None
    if not model.graph.node:
        raise InputFileError(f"{path} is not an ONNX model (no graph nodes)")
    return model


def _input_shape(model) -> tuple[list[int | None], str]:
    init = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    if len(inputs) != 1:
        raise DataError(f"the model has {len(inputs)} inputs; egp-surgery supports exactly one")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    return dims, inputs[0].name


def load_samples(spec: str, model, n: int, split: str, seed: int) -> np.ndarray:
    """Samples from a data spec (digits | cifar10:DIR | folder:DIR | plugin:mod:func), a .npy file,
    or 'random' (standard normal in the model's input shape)."""
    dims, name = _input_shape(model)
    if spec == "random":
        if any(d is None for d in dims[1:]):
            raise DataError(f"random calibration needs a static input shape; {name!r} is {dims}: "
                            "pass --calibration with real data")
        rng = np.random.default_rng(seed)
        return rng.standard_normal([n] + [int(d) for d in dims[1:]]).astype(np.float32)
    if spec.endswith(".npy"):
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"calibration file not found: {path}")
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:
            raise DataError(f"cannot read {path} as a .npy array: {type(e).__name__}: {e}") from None
        return arr[:n]
    from egp_deploy.data import calibration_batch, load_data

    size = dims[2] if len(dims) == 4 and isinstance(dims[2], int) else None
    chans = dims[1] if len(dims) == 4 and isinstance(dims[1], int) else None
    bundle = load_data(spec, image_size=size, channels=chans)
    return calibration_batch(bundle, n, split).numpy()


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
    samples: int = typer.Option(256, "--samples", "-n", min=1, help="Calibration samples."),
    held_out_samples: int = typer.Option(256, "--held-out-samples", min=1, help="Held-out samples."),
    tolerance: float = typer.Option(1e-5, help="Max relative error max|y'-y|/max|y| of exact rewrites."),
    max_mac_growth: float = typer.Option(
        1.0, help="With --cost macs: a merged segment may cost at most this factor x the MACs of the layers it replaces."),
    allow_inexact_merge: bool = typer.Option(
        False, help="Also merge k x k + k x k convs (wrong near the border; the error is reported)."),
    channel_multiple: int = typer.Option(
        8, min=1, help="Keep narrowed channel counts at multiples of this (runtimes block channels by 8/16; "
                       "1 narrows fully)."),
    simplify_layout_chains: bool = typer.Option(
        False, help="Also collapse Reshape/Transpose chains (fewer nodes; can defeat onnxruntime's MatMul "
                    "fusion and run slower: benchmark it)."),
    strip: bool = typer.Option(True, help="Strip activations found always linear on calibration data (data-dependent)."),
    min_agreement: float = typer.Option(
        0.99, help="Held-out top-1 agreement the data-dependent strips must keep, else they are reverted."),
    linearize_smooth: bool = typer.Option(
        False, help="Replace GELU/SiLU/HardSwish/Mish whose channels each stayed ON or OFF on calibration data by "
                    "x / 0 (NOT exact: the error is reported and held to the inexact tolerance)."),
    max_data_dependent_error: Optional[float] = typer.Option(
        None, min=0.0, help="Bound on the held-out rel. error the data-dependent strips may add; above it they "
                            "are reverted."),
    batch_size: int = typer.Option(32, min=1, help="Inference batch size for measurement and verification."),
    threads: int = typer.Option(0, min=0, help="onnxruntime intra-op threads (0: onnxruntime's default)."),
    cost: Cost = typer.Option(
        "macs", "--cost", help="What the chain merge planner minimises: macs (deterministic) or latency (each "
                               "candidate merge timed as a small graph on --backend)."),
    backend: LatencyBackend = typer.Option("ort-cpu", "--backend", help="With --cost latency: the backend merges are timed on."),
    latency_table: Optional[Path] = typer.Option(
        None, "--latency-table", help="With --cost latency: JSON table of timings to reuse and extend "
                                      "(default: a per-device cache under ~/.cache/egp-deploy/latency)."),
    latency_margin: float = typer.Option(
        0.05, "--latency-margin", min=0.0, help="With --cost latency: a merge must be this fraction faster."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the JSON report here."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a before/after PNG here."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No table, no progress bar."),
) -> None:
    """Rewrite INPUT into a shallower, narrower graph and write it to OUTPUT after verification."""
    from egp_deploy import validation as check

    check.validate_options("surgery", locals())
    files = [input] + [Path(p) for p in (calibration, held_out) if p and Path(p).is_file()]
    check.check_outputs(files, {"OUTPUT": output, "--report": report, "--plot": plot,
                                "--latency-table": latency_table})
    check.check_sample_file("--calibration", calibration)
    check.check_sample_file("--held-out", held_out)
    from egp_deploy.io_utils import atomic_files
    from egp_deploy.surgery import SurgeryOptions, optimize
    from egp_deploy.surgery.report import print_report, save_report_plot

    model = _load_model(input)
    check.check_onnx_model_inputs(model, "egp-surgery", samples + held_out_samples, float32_only=True)
    check.check_finite_weights(model)
    if cost == "macs" and (latency_table is not None or backend != "ort-cpu"):
        raise UsageError("--backend and --latency-table choose how merges are timed: they need --cost latency")
    latency = dict(cost=str(cost), latency_backend=str(backend), latency_margin=latency_margin,
                   latency_table=None if latency_table is None else os.fspath(latency_table))
    if cost == "latency":  # a missing backend or a bad table fails now, before any work
        from egp_deploy.surgery.latency import make_cost_model

        make_cost_model(SurgeryOptions(**latency))
    if calibration is None:
        console.print("[yellow]warning:[/] no --calibration given: using random normal inputs. Activation "
                      "statistics of random inputs say little about real data; only exact rewrites can be trusted.")
        calibration = "random"
    cal = load_samples(calibration, model, samples + (held_out_samples if calibration.endswith(".npy") else 0),
                       "val", seed=0)
    held = None
    if held_out is None and calibration.endswith(".npy"):
        # one array given: keep a quarter of it (at least 2 samples) unseen by the measurement
        if cal.shape[0] >= 8:
            n_held = min(held_out_samples, max(2, cal.shape[0] // 4))
            cal, held = cal[:-n_held], cal[-n_held:]
        held_spec = f"{calibration} (last {0 if held is None else held.shape[0]} samples)"
    else:
        held_spec = held_out or ("random" if calibration == "random" else calibration)
        if not (held_spec == "random" and any(d is None for d in _input_shape(model)[0][1:])):
            held = load_samples(held_spec, model, held_out_samples, "test", seed=1)
    options = SurgeryOptions(
        tolerance=tolerance, max_mac_growth=max_mac_growth, allow_inexact_merge=allow_inexact_merge,
        channel_multiple=channel_multiple, simplify_layout_chains=simplify_layout_chains, strip_activations=strip, min_held_out_agreement=min_agreement, batch_size=batch_size,
        threads=threads, progress=not quiet, **latency,
        linearize_smooth=linearize_smooth, max_data_dependent_error=max_data_dependent_error,
    )
    result = optimize(model, cal, held, options)
    if quiet:  # print_report shows them otherwise
        for w in result.report.get("warnings") or []:
            console.print(f"[yellow]warning:[/] {w}")
    result.report["files"] = {"input": os.fspath(input), "output": os.fspath(output),
                              "calibration": calibration, "held_out": held_spec if held is not None else None}
    with atomic_files() as outputs:  # model, report and plot appear together or not at all
        outputs.write_bytes(output, result.model.SerializeToString())
        if report is not None:
            outputs.write_json(report, result.report)
        if plot is not None:
            save_report_plot(result.report, outputs.path(plot))
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
