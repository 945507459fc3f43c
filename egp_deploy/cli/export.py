"""egp-export: PyTorch model -> verified ONNX -> surgered (shallower) ONNX [-> TensorRT engine]."""

from __future__ import annotations

import dataclasses
import os
import platform
import time
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer

from egp_deploy.cli._common import Precision, console, hold, new_app, run_app, stdout
from egp_deploy.errors import BackendUnavailableError, DataError, NonFiniteError, UsageError, first_words

app = new_app(
    "Export a PyTorch model (egp-deploy checkpoint, TorchScript, torch.export .pt2, or with --unsafe-pickle a "
    "pickled nn.Module) to one self-contained ONNX file, verify it against PyTorch, then strip the layers EGP "
    "collapsed (graph surgery, verified on calibration and held-out data) and report what was removed and gained."
)


class Exporter(str, Enum):
    auto = "auto"
    legacy = "legacy"
    dynamo = "dynamo"


def output_paths(model_path: Path, output: Optional[Path], surgery: bool) -> dict[str, Path]:
    """Where each artifact goes: -o names the final model; the exported graph and report sit beside it."""
    final = output or model_path.with_name(model_path.name.split(".")[0] + (".egp.onnx" if surgery else ".onnx"))
    name = final.name
    base = name[: -len(".egp.onnx")] if name.endswith(".egp.onnx") else (name[:-5] if name.endswith(".onnx") else name)
    stem = final.with_name(base)
    if not surgery:
        return {"exported": final, "report": stem.with_name(base + ".export.json")}
    exported = stem.with_name(base + ".onnx")
    if exported.resolve() == final.resolve():
        exported = stem.with_name(base + ".exported.onnx")
    report_base = final.with_name(name[:-5] if name.endswith(".onnx") else name)
    return {
        "exported": exported,
        "surgered": final,
        "report": report_base.with_name(report_base.name + ".json"),
        "plot": report_base.with_name(report_base.name + ".png"),
    }


def load_calibration(spec: Optional[str], checkpoint_data: Optional[str], sample_shape: tuple[int, ...],
                     samples: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(calibration, held-out, description): a data spec, a .npy/.npz file, or random normal inputs."""
    chosen = spec or checkpoint_data
    if chosen is None or chosen == "random":
        if chosen is None:
            console.print("[yellow]warning:[/] no calibration data known (no data spec in the checkpoint, no "
                          "--calibration): using random normal inputs; data-dependent strips are then unreliable")
        rng = np.random.default_rng(seed)
        draw = lambda: rng.standard_normal((samples, *sample_shape)).astype(np.float32)  # noqa: E731
        return draw(), draw(), "random normal"
    path = Path(chosen)
    if chosen.endswith((".npy", ".npz")):
        calib = _read_array_file(path)
        # a file is split in two halves: the first calibrates, the second verifies the data-dependent strips
        if len(calib) < 2:
            raise DataError(f"{path} holds {len(calib)} sample(s); need at least 2 (calibration + held-out)")
        half = len(calib) // 2
        calib, held = calib[:half][:samples], calib[half:][:samples]
        desc = f"file {path.name} ({len(calib)} calibration + {len(held)} held-out)"
    else:
        from egp_deploy.data import calibration_batch, load_data

        channels = sample_shape[0] if len(sample_shape) == 3 else None
        size = sample_shape[-1] if len(sample_shape) == 3 and sample_shape[-1] == sample_shape[-2] else None
        bundle = load_data(chosen, image_size=size, channels=channels)
        calib = calibration_batch(bundle, samples, "val").numpy().astype(np.float32)
        held = calibration_batch(bundle, samples, "test").numpy().astype(np.float32)
        desc = f"{bundle.spec}: {len(calib)} val + {len(held)} test samples"
    for name, arr in (("calibration", calib), ("held-out", held)):
        if tuple(arr.shape[1:]) != tuple(sample_shape):
            raise DataError(
                f"{name} data from {chosen} has sample shape {tuple(arr.shape[1:])}, the model takes {tuple(sample_shape)}"
            )
        if not np.isfinite(arr).all():
            raise NonFiniteError(f"{name} data from {chosen} contains NaN or Inf values")
    return calib, held, desc


def _read_array_file(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"calibration file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            keys = list(data.keys())
            if not keys:
                raise DataError(f"{path} holds no arrays")
            data = data["input"] if "input" in keys else data[keys[0]]
        arr = np.asarray(data, dtype=np.float32)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path} is not a readable .npy/.npz array ({type(e).__name__}: {first_words(e, 120)})") from None
    if arr.ndim < 2:
        raise DataError(f"{path} must hold a batch of samples (N, ...), got shape {arr.shape}")
    return arr


def _surgery_options(cls: type, settings: list[str]) -> Any:
    """SurgeryOptions from KEY=VALUE strings, each value converted to the field's declared type."""
    if not dataclasses.is_dataclass(cls):
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for item in settings:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise UsageError(f"--set expects KEY=VALUE with KEY one of {', '.join(sorted(fields))}; got {item!r}")
        values[key] = _convert(raw.strip(), hints.get(key, str), key)
    return cls(**values)


def _convert(raw: str, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    options = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    if raw.lower() == "none" and type(None) in options:
        return None
    for t in options:
        try:
            if t is bool:
                if raw.lower() in ("1", "true", "yes", "on"):
                    return True
                if raw.lower() in ("0", "false", "no", "off"):
                    return False
                continue
            if t in (int, float, str):
                return t(raw)
        except ValueError:
            continue
    if all(t in (int, float, str, bool, type(None)) for t in options):
        raise UsageError(f"--set {key}={raw}: not a valid {' or '.join(getattr(t, '__name__', str(t)) for t in options)}")
    return raw


def _summary_rows(before: dict[str, Any], after: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    keys = [
        ("nodes", "nodes"), ("conv/gemm layers", "conv_gemm_layers"), ("activations", "activations"),
        ("longest path (layers)", "longest_path_layers"), ("parameters", "params"),
        ("parameters (nonzero)", "params_nonzero"), ("MACs (dense)", "macs_dense"),
        ("MACs (nonzero weights)", "macs_nonzero"), ("file size (bytes)", "file_size_bytes"),
    ]
    rows = []
    for label, k in keys:
        b = before[k]
        if after is None:
            rows.append((label, f"{b:,}", "", ""))
            continue
        a = after[k]
        ratio = f"{a / b:.3f}x" if b else ""
        rows.append((label, f"{b:,}", f"{a:,}", ratio))
    return rows


def _print_table(title: str, rows: list[tuple[str, str, str, str]], surgery: bool) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("exported", justify="right")
    if surgery:
        table.add_column("surgered", justify="right")
        table.add_column("after/before", justify="right")
    for r in rows:
        table.add_row(*(r if surgery else r[:2]))
    stdout.print(table)


def _environment(threads: int) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torch

    return {
        "python": platform.python_version(), "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "threads": threads, "torch": torch.__version__, "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _try_build(onnx_path: Path, precision: str, console_note: list[str]) -> dict[str, Any]:
    """Build a TensorRT engine when TensorRT and a GPU are present; otherwise say why, never fail the export."""
    try:
        import tensorrt  # noqa: F401  (probe only: egp_deploy.build does the work)
    except Exception as e:
        msg = f"TensorRT is not importable here ({type(e).__name__}); skipped the engine build"
        console_note.append(msg)
        return {"built": False, "reason": msg}
    from egp_deploy.build import build_engine

    engine_path = onnx_path.with_suffix(".engine")
    try:
        built = build_engine(onnx_path, engine_path, precision=precision)
    except BackendUnavailableError as e:  # no GPU, driver mismatch: the export itself still succeeded
        console_note.append(f"engine build skipped: {e}")
        return {"built": False, "reason": str(e)}
    info = dataclasses.asdict(built) if dataclasses.is_dataclass(built) else None
    return {"built": True, "engine": str(engine_path), "info": info}


@app.command()
def export(
    model: Path = typer.Argument(..., help="egp-deploy checkpoint, TorchScript archive, .pt2, or pickled module (see --unsafe-pickle)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Final model path (default: MODEL.egp.onnx beside the input; MODEL.onnx with --no-surgery). The exported graph is written as OUT.onnx beside it."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="One sample's shape C,H,W (no batch) (default: from the checkpoint or .pt2)."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Symbolic batch dimension instead of a static one."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Static batch size of the exported graph."),
    calibration: Optional[str] = typer.Option(None, "--calibration", help="Calibration data: a data spec (digits, cifar10:DIR, folder:DIR, plugin:mod:fn), a .npy/.npz file (first half calibrates, second half is held out), or 'random' (default: the checkpoint's data set)."),
    samples: int = typer.Option(256, "--samples", min=1, help="Calibration samples (and as many held-out samples)."),
    no_surgery: bool = typer.Option(False, "--no-surgery", help="Only export and verify; skip the graph surgery."),
    unsafe_pickle: bool = typer.Option(False, "--unsafe-pickle", help="Allow a fully pickled nn.Module: loading it RUNS ARBITRARY CODE from the file."),
    build: bool = typer.Option(False, "--build", help="Also build a TensorRT engine (OUT.egp.engine) when TensorRT and a GPU are present."),
    precision: Precision = typer.Option("fp32", "--precision", help="Engine precision for --build: fp32 or fp16."),
    report: Optional[Path] = typer.Option(None, "--report", help="JSON report path (default: OUT.egp.json; OUT.export.json with --no-surgery)."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Write a before/after PNG beside the report."),
    exporter: Exporter = typer.Option(Exporter.auto, "--exporter", help="auto: legacy TorchScript exporter for modules (fast, module-path node names), dynamo for .pt2."),
    tolerance: float = typer.Option(1e-4, "--export-tolerance", help="Max relative error of the exported graph against PyTorch."),
    settings: list[str] = typer.Option([], "--set", help="Surgery option KEY=VALUE (repeatable), e.g. --set tolerance=1e-5."),
    threads: int = typer.Option(2, "--threads", min=1, help="CPU threads for PyTorch and onnxruntime."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random verification/calibration inputs."),
) -> None:
    """Export a PyTorch model to one verified, self-contained ONNX file, then strip what EGP collapsed.

    Writes OUT.onnx (exported, checked against PyTorch with onnxruntime), OUT.egp.onnx (surgered,
    checked against OUT.onnx on calibration and held-out data), OUT.egp.json and OUT.egp.png.
    """
    precision = str(precision)
    from egp_deploy.validation import validate_options, validate_surgery_settings

    validate_options("export", locals())
    validate_surgery_settings(settings)
    import torch

    from egp_deploy.export import (
        check_output_path, detect_kind, export_model, load_source, parse_input_shape, read_metadata,
    )
    from egp_deploy.io_utils import staged_files
    from egp_deploy.onnx_metrics import graph_metrics

    outputs = hold(staged_files())  # every output is committed at the end together, or none

    torch.set_num_threads(threads)
    surgery = not no_surgery
    detect_kind(model)  # a missing / non-PyTorch input is reported before anything about outputs
    paths = output_paths(model, output, surgery)
    if report is not None:
        paths["report"] = report
        if "plot" in paths:
            paths["plot"] = report.with_suffix(".png")
    for p in paths.values():
        check_output_path(model, p)
        if calibration and Path(calibration).is_file():
            check_output_path(calibration, p)
    if len({p.resolve() for p in paths.values()}) != len(paths):
        raise UsageError(f"output paths collide: {', '.join(str(p) for p in paths.values())}")
    shape = parse_input_shape(input_shape)
    if precision not in ("fp32", "fp16"):
        raise UsageError(f"--precision must be fp32 or fp16, got {precision!r}")
    if surgery:
        try:
            from egp_deploy.surgery import SurgeryOptions, optimize
        except ImportError as e:
            raise BackendUnavailableError(f"the graph surgery package is not available ({e}); rerun with --no-surgery") from None
        options = _surgery_options(SurgeryOptions, settings)
        given = {item.partition("=")[0].strip().replace("-", "_") for item in settings}
        if hasattr(options, "threads") and "threads" not in given:
            options.threads = threads
        if hasattr(options, "progress") and "progress" not in given:
            options.progress = console.is_terminal
    elif settings:
        raise UsageError("--set configures the surgery; it has no effect with --no-surgery")

    seconds: dict[str, float] = {}
    notes: list[str] = []
    t_all = time.perf_counter()
    with console.status("loading the model"):
        t0 = time.perf_counter()
        source = load_source(model, unsafe_pickle=unsafe_pickle)
        seconds["load"] = time.perf_counter() - t0
    sample_shape = shape or source.input_shape
    if surgery and sample_shape is not None:  # bad calibration data fails before any export work
        data_spec = (source.metadata or {}).get("data")
        calib, held, desc = load_calibration(calibration, data_spec if isinstance(data_spec, str) else None,
                                             tuple(sample_shape), samples, seed)
        console.print(f"calibration: {desc}", soft_wrap=True)
    with console.status(f"exporting {source.kind} to ONNX and verifying with onnxruntime"):
        res = export_model(source, input_shape=shape, dynamic_batch=dynamic_batch, batch_size=batch_size,
                           exporter=exporter.value, rtol=tolerance, seed=seed)
    seconds.update({f"export.{k}": v for k, v in res.seconds.items()})
    exported_bytes = res.model.SerializeToString()
    before = graph_metrics(res.model)
    console.print(f"exported {source.kind} {model.name} with the {res.exporter} exporter (opset {res.opset}), "
                  f"relative error vs PyTorch {res.max_rel_error:.2e} on batch {res.checked_batches}", soft_wrap=True)
    if res.fp32_noise_floor is not None:
        console.print(f"[yellow]note:[/] the error exceeds --export-tolerance {tolerance:g}, but the graph disagrees with "
                      f"itself by {res.fp32_noise_floor:.2e} between two onnxruntime kernel choices (an "
                      f"ill-conditioned model); accepted up to twice that", soft_wrap=True)

    out: dict[str, Any] = {
        "tool": "egp-export",
        "source": {"path": str(model), "kind": source.kind, "sha256": source.sha256, "arch": source.arch,
                   "arch_kwargs": source.arch_kwargs, "input_shape": list(res.input_shape[1:])},
        "export": {"path": str(paths["exported"]), "exporter": res.exporter, "opset": res.opset,
                   "dynamic_batch": res.dynamic_batch, "batch": res.input_shape[0],
                   "max_rel_error_vs_torch": res.max_rel_error, "checked_batches": res.checked_batches,
                   "tolerance": tolerance, "fp32_noise_floor": res.fp32_noise_floor},
        "metrics_exported": before,
        "metadata": {k: v for k, v in read_metadata(res.model).items() if k != "node_modules"},
        "environment": _environment(threads),
    }

    after = None
    printed_table = False  # the surgery report prints its own before/after table
    if surgery:
        if sample_shape is None:  # a .pt2 without a readable input spec: known only after export
            calib, held, desc = load_calibration(calibration, None, tuple(res.input_shape[1:]), samples, seed)
        outputs.write_bytes(paths["exported"], exported_bytes)
        t0 = time.perf_counter()
        result = optimize(res.model, calib, held, options)
        seconds["surgery"] = time.perf_counter() - t0
        after = graph_metrics(result.model)
        out["surgery"] = result.report
        out["calibration"] = desc
        out["metrics_surgered"] = after
        out["surgered"] = str(paths["surgered"])
        outputs.write_bytes(paths["surgered"], result.model.SerializeToString())
        try:
            from egp_deploy.surgery.report import print_report, save_report_plot
        except ImportError:
            print_report = save_report_plot = None
        if print_report is not None:
            print_report(result.report)
            printed_table = True
        if plot and save_report_plot is not None:
            save_report_plot(result.report, outputs.path(paths["plot"]))
            out["plot"] = str(paths["plot"])
    else:
        outputs.write_bytes(paths["exported"], exported_bytes)

    if build:
        outputs.commit()  # the engine is built from the file
        target = paths["surgered"] if surgery else paths["exported"]
        out["build"] = _try_build(target, precision, notes)
    seconds["total"] = time.perf_counter() - t_all
    out["seconds"] = seconds
    outputs.write_json(paths["report"], out)
    outputs.commit()

    if not printed_table:
        title = f"{model.name}: exported vs surgered" if surgery else f"{model.name}: exported graph"
        _print_table(title, _summary_rows(before, after), surgery)
    if after is not None:
        gained = []
        for label, k in (("conv/gemm layers", "conv_gemm_layers"), ("activations", "activations"),
                         ("longest path", "longest_path_layers")):
            if after[k] != before[k]:
                gained.append(f"{label} {before[k]} -> {after[k]}")
        if before["macs_dense"]:
            gained.append(f"dense MACs x{after['macs_dense'] / before['macs_dense']:.3f}")
        stdout.print("gained: " + (", ".join(gained) if gained else "nothing to strip (graph was already minimal)"))
    for note in notes:
        console.print(f"[yellow]note:[/] {note}")
    for key in ("exported", "surgered", "report", "plot"):
        if key in paths and (key != "plot" or "plot" in out):
            stdout.print(f"wrote {key}: {paths[key]}")


def main() -> None:
    run_app(app, "egp-export")


if __name__ == "__main__":
    main()
