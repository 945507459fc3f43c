"""Checks every command runs BEFORE any work: numeric options and output paths.

One table of ranges per library call (``RANGES``), keyed by the parameter name the call and its
command share, and one for the surgery's options (``SURGERY_OPTIONS``): the library call checks
them before any work, so the command line and the Python API refuse the same values the same way:
finite, inside the range, and the range named in the message (exit 2). NaN and infinity are refused everywhere: ``nan < 0`` is False, so a plain
comparison lets NaN through, and an infinite duration never returns.

Output paths: never equal to an input (after resolving symlinks, hard links included), never a
folder where a file goes (or the reverse), and the nearest existing parent a writable folder, so
an unwritable report fails at once instead of after the work, with the model already written.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

from egp_deploy.errors import UsageError, first_words
from egp_deploy.io_utils import is_special_file

SEED_MAX = 2**32 - 1  # numpy's and torch's seeds agree on this range (numpy refuses negatives)


@dataclass(frozen=True)
class Range:
    """low/high inclusive unless ``*_open``; ``integer`` for counts; ``optional`` allows None."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"{'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return "finite"

    def contains(self, value: float) -> bool:
        try:
            value = float(value)
        except OverflowError:  # an int beyond a float's range
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


# Messages name an option as its caller spelled it: the flag on a command line (the commands run
# inside :func:`flag_names`), the parameter or field name in the Python API.
_FLAG_NAMES: contextvars.ContextVar[bool] = contextvars.ContextVar("egp_flag_names", default=False)


@contextlib.contextmanager
def flag_names() -> Iterator[None]:
    """Within this block, range errors name command-line flags (``--lr``) instead of parameters (``lr``)."""
    token = _FLAG_NAMES.set(True)
    try:
        yield
    finally:
        _FLAG_NAMES.reset(token)


def option_name(name: str, flag: str | None) -> str:
    """How a message names option ``name`` (whose command-line flag is ``flag``, None if it has none)."""
    return flag if flag and _FLAG_NAMES.get() else name


def check_number(option: str, value: Any, rng: Range) -> None:
    """UsageError (exit 2) naming the option, the range and the value unless ``value`` is in ``rng``."""
    if value is None:
        if rng.optional:
            return
        raise UsageError(f"{option} needs a value in {rng.describe()}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(f"{option} must be a number in {rng.describe()}, got {value!r}")
    if not rng.contains(value):
        finite = isinstance(value, numbers.Integral) or math.isfinite(value)
        raise UsageError(f"{option} must be {'' if finite else 'finite and '}in {rng.describe()}, got {_shown(value)}")
    if rng.integer and not (isinstance(value, numbers.Integral) or float(value).is_integer()):
        raise UsageError(f"{option} must be a whole number in {rng.describe()}, got {value!r}")


def _shown(value: Any) -> str:
    if isinstance(value, numbers.Integral):
        text = str(value)
        return text if len(text) <= 24 else f"an integer of {len(text)} digits"
    return format(value, "g")


POSITIVE = Range(0, None, low_open=True)
COUNT = Range(1, 10**8, integer=True)
SAMPLES = Range(1, 10**6, integer=True)
BATCH = Range(1, 65_536, integer=True)
THREADS = Range(1, 4096, integer=True)
SEED = Range(0, SEED_MAX, integer=True)
TOLERANCE = Range(0, 1, low_open=True)  # relative error: 0 would refuse fp32 round-off, > 1 accepts anything
FRACTION = Range(0, 1)

Option = tuple[Optional[str], Range]  # (the command-line flag, None where there is none; the range)

_TIMING: dict[str, Option] = {  # BenchSettings fields
    "warmup_ms": ("--warmup-ms", Range(0, 3_600_000)),  # an hour of warm-up at most
    "min_iterations": ("--iterations", COUNT),
    "min_duration_s": ("--duration", Range(0, 86_400)),  # a day: a finite bound, so every run ends
    "batch": ("--batch", Range(1, 65_536, integer=True, optional=True)),
    "threads": ("--threads", Range(1, 4096, integer=True, optional=True)),
}

# SurgeryOptions fields; the flag is egp-surgery's (egp-export sets them all with --set KEY=VALUE)
SURGERY_OPTIONS: dict[str, Option] = {
    "tolerance": ("--tolerance", TOLERANCE), "inexact_tolerance": (None, TOLERANCE),
    "held_out_tolerance": (None, TOLERANCE), "max_mac_growth": ("--max-mac-growth", Range(0, 1e6, low_open=True)),
    "min_held_out_agreement": ("--min-agreement", FRACTION), "batch_size": ("--batch-size", BATCH),
    "threads": ("--threads", Range(0, 4096, integer=True)),
    "channel_multiple": ("--channel-multiple", Range(1, 4096, integer=True)),
    "max_rounds": (None, Range(0, 1000, integer=True)),
    "max_data_dependent_error": ("--max-data-dependent-error", Range(0, 1, optional=True)),
    "min_calibration_samples": (None, Range(0, 10**6, integer=True)),
    "latency_margin": ("--latency-margin", Range(0, 1, high_open=True)),
    "latency_threads": (None, Range(1, 4096, integer=True)), "latency_rounds": (None, Range(1, 10**5, integer=True)),
}

# Per library call (egp_deploy.api), keyed by its parameter names; the commands' parameters carry the same
# names, so the command line and the API are checked by the same entries, in the library call.
RANGES: dict[str, dict[str, Option]] = {
    "bench": {**_TIMING, "seed": ("--seed", SEED)},
    "check": {**_TIMING, "budget_ms": ("--budget-ms", Range(0, 3_600_000, low_open=True)),
              "percentile": ("--percentile", Range(0, 100, low_open=True))},
    "build": {"workspace_mib": ("--workspace", Range(0, 1 << 20, integer=True))},
    "export": {"batch_size": ("--batch-size", BATCH), "samples": ("--samples", SAMPLES),
               "export_tolerance": ("--export-tolerance", TOLERANCE), "threads": ("--threads", THREADS),
               "seed": ("--seed", SEED)},
    # surgery_file / optimize; their SurgeryOptions fields are checked with SURGERY_OPTIONS
    "surgery": {"samples": ("--samples", SAMPLES), "held_out_samples": ("--held-out-samples", SAMPLES),
                "seed": (None, SEED)},
    "prune": {"iterations": ("--iterations", Range(0, 1000, integer=True)),
              "rate": ("--rate", Range(0, 1, low_open=True, high_open=True)),
              "min_keep_cut": ("--min-keep-cut", Range(0, 1, high_open=True)),  # 1 would keep cut layers whole
              "temperature": ("--temperature", Range(0, 1e6, low_open=True)),
              "tolerance": ("--tolerance", Range(0, 100, optional=True)),  # accuracy points
              "patience": ("--patience", Range(1, 1000, integer=True)),
              "epochs": ("--epochs", Range(0, 100_000, integer=True)),
              "lr": ("--lr", POSITIVE),  # no upper bound: a diverging rate is caught as a NaN loss (exit 6)
              "dense_epochs": ("--dense-epochs", Range(0, 100_000, integer=True, optional=True)),
              "dense_lr": ("--dense-lr", POSITIVE),
              "batch_size": ("--batch-size", Range(1, 10**6, integer=True)),
              "momentum": ("--momentum", Range(0, 1, high_open=True)),
              "weight_decay": ("--weight-decay", FRACTION),
              "calibration_batches": ("--calibration-batches", Range(1, 10**6, integer=True, optional=True)),
              "seed": ("--seed", SEED)},
}


def validate_options(command: str, values: Mapping[str, Any]) -> None:
    """Check every numeric option of ``command`` present in ``values`` (e.g. a library call's locals())."""
    validate_against(RANGES[command], values)


def validate_against(table: Mapping[str, Option], values: Mapping[str, Any]) -> None:
    """Each entry of ``table`` present in ``values``: in range, or UsageError (exit 2) naming it."""
    for name, (flag, rng) in table.items():
        if name in values:
            check_number(option_name(name, flag), values[name], rng)

# SurgeryOptions fields that name one of a few choices (egp-surgery's --cost / --backend offer these)
SURGERY_CHOICES: dict[str, tuple[str, ...]] = {"cost": ("macs", "latency"),
                                               "latency_backend": ("ort-cpu", "ort-cuda", "ort-trt")}


def validate_surgery_options(values: Mapping[str, Any]) -> None:
    """SurgeryOptions fields (a mapping): numbers in range and choices among the valid ones, so that a
    bad value is refused before an export or a measurement starts, not when its pass runs."""
    validate_against(SURGERY_OPTIONS, values)
    for name, valid in SURGERY_CHOICES.items():
        if name in values and values[name] not in valid:
            raise UsageError(f"surgery option {name} must be {' or '.join(valid)}, got {values[name]!r}")


def validate_surgery_settings(settings: Iterable[str]) -> None:
    """Numeric ``--set KEY=VALUE`` items, checked as egp-surgery checks its flags (others are left to
    the option parser, which names the valid keys)."""
    for item in settings:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in SURGERY_OPTIONS:
            continue
        if raw.strip().lower() == "none" and SURGERY_OPTIONS[key][1].optional:
            continue
        try:
            value = float(raw.strip())
        except ValueError:
            raise UsageError(f"--set {key}={raw.strip()}: not a number") from None
        check_number(f"--set {key}", value, SURGERY_OPTIONS[key][1])


# ---------------------------------------------------------------- paths


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _nearest_existing(path: Path) -> Path:
    p = path.resolve().parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable_parent(path: Path, what: str) -> None:
    parent = _nearest_existing(path)
    if not parent.is_dir():
        raise UsageError(f"cannot write {what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {what} {path}: folder {parent} is not writable")


def check_outputs(inputs: Iterable[str | os.PathLike | None], outputs: Mapping[str, str | os.PathLike | None],
                  folders: Iterable[str] = ()) -> None:
    """Before any work: each output (``{what: path}``, None skipped) differs from every input and
    from the other outputs, is not a folder (or, for the names in ``folders``, not a file), and can be
    created (its nearest existing parent is a writable folder). UsageError (exit 2) otherwise."""
    ins = [Path(p) for p in inputs if p is not None]
    outs = {what: Path(p) for what, p in outputs.items() if p is not None}
    folder_names = set(folders)
    for what, out in outs.items():
        for src in ins:
            if _same_file(src, out):
                raise UsageError(f"{what} {out} is the input {src}; choose another path")
        if what in folder_names:
            if out.exists() and not out.is_dir():
                raise UsageError(f"{what} {out} is a file, not a folder")
            if out.is_dir():
                if not os.access(out, os.W_OK | os.X_OK):
                    raise UsageError(f"cannot write into {what} {out}: the folder is not writable")
                continue
        elif out.is_dir():
            raise UsageError(f"{what} {out} is a folder; give a file path")
        if is_special_file(out):  # a device or FIFO is written into, not replaced: it must take writes
            if stat.S_ISSOCK(os.stat(out).st_mode):
                raise UsageError(f"{what} {out} is a socket; give a file path")
            if not os.access(out, os.W_OK):
                raise UsageError(f"cannot write {what} {out}: it is not writable")
            continue
        check_writable_parent(out, what)
    items = list(outs.items())
    for i, (what_a, a) in enumerate(items):
        for what_b, b in items[i + 1:]:
            if _same_file(a, b):
                raise UsageError(f"{what_a} and {what_b} are the same path ({a}); give them different paths")


def check_not_inside_run(source: str | os.PathLike, out_dir: str | os.PathLike, run_file: str) -> None:
    """A command that writes files matching the regex ``run_file`` into ``out_dir`` must not overwrite
    its own input there (``egp-prune out/best.pt -o out``)."""
    src = Path(source)
    if not src.is_file():
        return
    real = src.resolve()
    if real.parent == Path(out_dir).resolve() and re.fullmatch(run_file, real.name):
        raise UsageError(f"{src} is a file of the run in {out_dir}, which this run would overwrite; "
                         "copy it elsewhere or choose another --out")


PRUNE_RUN_FILES = r"iter_\d+\.pt|best\.pt|dense\.pt|log\.json|entropy\.png"  # what egp-prune writes into OUT


def check_prune_paths(source: Any, out: str | os.PathLike, weights: str | os.PathLike | None = None) -> None:
    """egp-prune's outputs: OUT a folder that can be written, and not the folder SOURCE (a checkpoint
    file, or a model reference / instance) or WEIGHTS is a file of."""
    files = [Path(p) for p in (source, weights) if isinstance(p, (str, os.PathLike)) and Path(p).exists()]
    check_outputs(files or [None], {"--out": out}, folders=("--out",))
    # dense.pt is written only when SOURCE is a model reference: from it, a run may go on in place
    for src in files:
        check_not_inside_run(src, out, r"iter_\d+\.pt|best\.pt|log\.json|entropy\.png")


def check_build_paths(onnx_model: str | os.PathLike, engine: str | os.PathLike | None,
                      timing_cache: str | os.PathLike | None, write_layers: bool) -> None:
    """egp-build's outputs (engine, its sidecar, layer list, timing cache) against its input."""
    from egp_deploy.build import layers_path, sidecar_path

    onnx_model = Path(onnx_model)
    engine = Path(engine) if engine else onnx_model.with_suffix(".engine")
    check_outputs([onnx_model], {"the engine": engine, "the sidecar": sidecar_path(engine),
                                 "the layer list": layers_path(engine) if write_layers else None,
                                 "--timing-cache": timing_cache})


def output_is_safe(inputs: Iterable[str | os.PathLike | None], output: str | os.PathLike) -> bool:
    """Whether ``output`` passes :func:`check_outputs` (for reports written on error paths)."""
    try:
        check_outputs(inputs, {"output": output})
    except UsageError:
        return False
    return True


# ---------------------------------------------------------------- inputs

SAMPLE_FILE_SUFFIXES = (".npy", ".npz")
MAX_SAMPLE_BYTES = 8 << 30  # calibration + held-out arrays beyond this are a typo, not a plan


def check_sample_file(option: str, spec: str | None) -> None:
    """A --calibration / --held-out that names an array file: present and a readable array, the
    message naming the option it came from (DataError, exit 4). Data set specs are left alone."""
    from egp_deploy.errors import DataError

    if not spec or not spec.endswith(SAMPLE_FILE_SUFFIXES):
        return
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"{option} file not found: {path}")
    import numpy as np

    try:
        data = np.load(path, allow_pickle=False, mmap_mode="r" if spec.endswith(".npy") else None)
        if isinstance(data, np.lib.npyio.NpzFile):
            data.close()
    except Exception as e:  # noqa: BLE001 - numpy raises ValueError, OSError, EOFError, zipfile errors ...
        if "pickled" in str(e):  # numpy's guess for any file without its magic number
            raise DataError(f"{option} {path} is not a {path.suffix} array (not numpy's file format)") from None
        raise DataError(f"{option} {path} is not a readable {path.suffix} array ({type(e).__name__}: "
                        f"{first_words(str(e), 120)})") from None


_FLOAT_TYPES = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}


def check_onnx_model_inputs(model: Any, command: str, samples: int = 0, float32_only: bool = False) -> None:
    """The model a command that feeds data can run: exactly one graph input (UnsupportedError, exit 8,
    for every command alike), a floating-point one (float32 with ``float32_only``), and ``samples``
    of it fit in memory."""
    from egp_deploy.errors import UnsupportedError
    from onnx import TensorProto

    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise UnsupportedError(f"the model has {len(inputs)} inputs ({names}); {command} supports exactly one")
    tensor = inputs[0].type.tensor_type
    if tensor.elem_type not in _FLOAT_TYPES:
        kind = TensorProto.DataType.Name(tensor.elem_type).lower() if tensor.elem_type else "non-tensor"
        raise UnsupportedError(f"input {inputs[0].name!r} is {kind}; {command} feeds floating-point samples "
                               "(token ids, masks and other integer inputs are not supported)")
    if float32_only and tensor.elem_type != TensorProto.FLOAT:
        raise UnsupportedError(f"input {inputs[0].name!r} is {_FLOAT_TYPES[tensor.elem_type]}: {command} rewrites "
                               "float32 graphs (it measures and verifies in float32); run it on the float32 model "
                               "and convert the result to reduced precision afterwards")
    dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor.shape.dim[1:]]
    need = samples * math.prod(dims) * 4
    if need > MAX_SAMPLE_BYTES:
        raise UnsupportedError(f"{samples} samples of input {inputs[0].name!r} {dims} need {need / 2**30:.0f} GiB "
                               f"(limit {MAX_SAMPLE_BYTES >> 30} GiB): lower --samples/--held-out-samples")


def check_finite_weights(model: Any) -> None:
    """NaN or Inf in any initializer or Constant node: NonFiniteError (exit 6) naming it, before any
    measurement (verification would otherwise compare NaN with NaN and report 'rel. error inf > inf')."""
    import numpy as np
    from onnx import AttributeProto, numpy_helper

    from egp_deploy.errors import NonFiniteError

    def tensors() -> Iterator[tuple[str, Any]]:
        for init in model.graph.initializer:
            if init.data_type in _FLOAT_TYPES and init.data_location != 1:  # external data: checked on load
                yield f"weight {init.name!r}", init
        for node in model.graph.node:
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
                continue
            for attr in node.attribute:
                what = f"constant {node.name or (node.output[0] if node.output else '?')!r}"
                if attr.type == AttributeProto.TENSOR and attr.t.data_type in _FLOAT_TYPES:
                    yield what, attr.t
                elif attr.type in (AttributeProto.FLOAT, AttributeProto.FLOATS):
                    yield what, np.asarray(attr.f if attr.type == AttributeProto.FLOAT else attr.floats, np.float32)

    for what, tensor in tensors():
        arr = tensor if isinstance(tensor, np.ndarray) else numpy_helper.to_array(tensor)
        if arr.size and not np.isfinite(arr.astype(np.float32, copy=False)).all():
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise NonFiniteError(f"{what} holds {bad} NaN/Inf value(s) of {arr.size}: the model "
                                 "cannot be measured or verified")
