"""The Python API: every stage of egp-deploy as one typed call (the console commands call these).

    import egp_deploy as egp
    run = egp.prune("resnet18", "runs/r18", arch_kwargs={"width": 16})      # EGP, fine-tuned, best.pt
    job = egp.deploy(run.best_path, "runs/r18.egp.onnx")                     # export -> verify -> surgery -> write
    print(job.gained(), job.paths.surgered)
    result = egp.check(job.paths.surgered, budget_ms=5.0)                   # the latency gate

``optimize`` works on any single-input ONNX model (an in-memory ModelProto or a path) and makes
the result's metadata describe the surgered graph. Errors are the classes of
:mod:`egp_deploy.errors` (each with the exit code the commands use); nothing is written unless
the stage it belongs to succeeded, and every file is written atomically.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import os
import platform
import time
import types
import typing
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence, Union

from egp_deploy.errors import BackendUnavailableError, UnsupportedError, UsageError

if TYPE_CHECKING:  # heavy imports stay out of `import egp_deploy`
    import numpy as np
    import onnx
    import torch.nn as nn

    from egp_deploy.bench import BenchSettings
    from egp_deploy.calibration import CalibrationSet
    from egp_deploy.checkpoint import Checkpoint
    from egp_deploy.data import DataBundle
    from egp_deploy.distributed import DistContext
    from egp_deploy.export import ExportResult
    from egp_deploy.prune.loop import RunResult
    from egp_deploy.prune.train import TrainConfig
    from egp_deploy.surgery import SurgeryOptions, SurgeryResult

PathLike = Union[str, "os.PathLike[str]"]
Log = Callable[[str], None]
Stage = Callable[[str], AbstractContextManager]

# How many calibration (and as many held-out) samples the surgery measures on by default.
DEFAULT_SAMPLES = 256


def _quiet(_: str) -> None:
    pass


def _no_stage(_: str) -> AbstractContextManager:
    return nullcontext()


# ------------------------------------------------------------------------------------- prune


def parse_arch_kwargs(text: str | None) -> dict[str, Any]:
    """'width=16,stem=imagenet' -> {'width': 16, 'stem': 'imagenet'} (values parsed as Python literals)."""
    out: dict[str, Any] = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--arch-kwargs wants key=value pairs separated by commas, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def train_dense(arch: str, bundle: DataBundle, recipe: TrainConfig, arch_kwargs: Mapping[str, Any] | None = None,
                seed: int = 0, ctx: DistContext | None = None, progress: bool = False,
                metadata: Mapping[str, Any] | None = None, *, weights: PathLike | None = None) -> Checkpoint:
    """THE dense-training recipe: seeded init, SGD ``recipe`` on the train split, accuracy on val and test.

    ``arch`` is a model reference (a zoo name, ``torchvision:NAME``, ``timm:NAME`` or
    ``package.module:factory``); its classes and input channels follow the data where its
    constructor has them. ``weights``: a state_dict file to start from (loaded weights-only).
    Returns an (unsaved) checkpoint whose metadata records the data, the recipe and the accuracies."""
    import torch

    from egp_deploy.archs.references import trusting

    torch.manual_seed(seed)
    with trusting(arch):  # the caller named it
        model, kwargs = _build_for_data(arch, arch_kwargs or {}, bundle, weights)
    return _dense_checkpoint(model, arch, kwargs, bundle, recipe, seed, ctx, progress,
                             {**({"weights": str(weights)} if weights is not None else {}), **(metadata or {})})


def _build_for_data(ref: str, given: Mapping[str, Any], bundle: DataBundle,
                    weights: PathLike | None = None) -> tuple[Any, dict[str, Any]]:
    """The model ``ref`` names, its classes and input channels set from the data where its
    constructor takes them (``given`` wins), with ``weights`` loaded; and the kwargs it was built with."""
    from egp_deploy.archs.references import build_model, data_kwargs
    from egp_deploy.checkpoint import load_weights

    kwargs = {**data_kwargs(ref, bundle.num_classes, bundle.input_shape[0]), **given}
    model = build_model(ref, kwargs, origin="the command line")
    if weights is not None:
        load_weights(model, weights, f"{ref} {kwargs}")
    return model, kwargs


def _dense_checkpoint(model: Any, arch: str, kwargs: Mapping[str, Any], bundle: DataBundle, recipe: TrainConfig,
                      seed: int, ctx: DistContext | None, progress: bool, metadata: Mapping[str, Any]) -> Checkpoint:
    from egp_deploy.checkpoint import checkpoint_from_model
    from egp_deploy.distributed import DistContext
    from egp_deploy.prune.loop import PruneConfig, accuracy, finetune

    ctx = ctx or DistContext()
    model = model.to(ctx.device)
    t0 = time.perf_counter()
    finetune(model, bundle, recipe, None, ctx, seed, f"{arch} dense", progress)
    seconds = time.perf_counter() - t0
    evaluation = PruneConfig()
    meta = {"data": bundle.spec, "method": "dense", "recipe": recipe.to_json(), "seed": seed,
            "test_acc": accuracy(model, bundle.test, evaluation, ctx), "val_acc": accuracy(model, bundle.val, evaluation, ctx),
            "train_seconds": seconds, **metadata}
    return checkpoint_from_model(model, arch, dict(kwargs), bundle.input_shape, bundle.num_classes, meta)


def _fit_data(model: Any, ref: str, bundle: DataBundle, spec: str) -> DataBundle:
    """The data as ``model`` takes it: digits and image folders are given the input channels of the
    model's first convolution (a torchvision CNN wants 3, digits are grey); then one forward pass
    must give class scores (N, classes). A model that does not fit is one line, before any training."""
    import torch
    import torch.nn as nn

    from egp_deploy.data import calibration_batch, load_data
    from egp_deploy.errors import first_words

    channels = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if channels and channels != bundle.input_shape[0] and spec.partition(":")[0] in ("digits", "folder"):
        bundle = load_data(spec, channels=channels)
    x = calibration_batch(bundle, 2)
    was = model.training
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as e:  # the model's own forward refuses the samples
        raise UnsupportedError(f"model {ref} does not run on {bundle.spec} samples of shape {tuple(x.shape[1:])}: "
                               f"{type(e).__name__}: {first_words(e, 160)}") from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(x), bundle.num_classes):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UnsupportedError(f"model {ref} outputs {got} on {bundle.spec}; the built-in loop trains classifiers "
                               f"with outputs [N, {bundle.num_classes}]: set num_classes in --arch-kwargs, or prune "
                               "inside your own training loop with egp_deploy.Pruner")
    return bundle


def _instance_reference(model: nn.Module, kwargs: Mapping[str, Any]) -> str:
    """``module:Class`` of a model the loop can rebuild from its checkpoints: the class imports
    again and ``Class(**kwargs)`` has the very same weights (names and shapes)."""
    from egp_deploy.archs.references import build_model, reference_of, trusting
    from egp_deploy.checkpoint import describe_mismatch

    cls = type(model).__qualname__
    ref = reference_of(model)
    if ref is None:
        raise UnsupportedError(
            f"the built-in loop rebuilds the model from its checkpoint files, and class {cls} cannot be imported again "
            "(defined in __main__ or inside a function): move it into an importable module, or prune it in your own "
            "loop with egp_deploy.Pruner and export it with torch.export + egp-export")
    with trusting(ref):
        rebuilt = build_model(ref, kwargs, origin="the model given")
    expected, got = rebuilt.state_dict(), model.state_dict()
    if {k: tuple(v.shape) for k, v in expected.items()} != {k: tuple(v.shape) for k, v in got.items()}:
        raise UnsupportedError(f"{ref}(**{dict(kwargs)}) builds other weights than the model given "
                               f"({describe_mismatch(expected, got)}): pass its constructor's arguments as arch_kwargs")
    return ref


def _is_checkpoint_path(source: Any) -> bool:
    src = Path(source)
    return src.suffix in (".pt", ".pth", ".ckpt") or src.exists()


def _source_reference(source: str) -> Any:
    """The model reference SOURCE names (not a file): exit 8 with the forms and close names otherwise."""
    from egp_deploy.archs import list_archs
    from egp_deploy.archs.references import ZOO, check_reference, forms, parse_reference, trusting
    from egp_deploy.archs.registry import close_matches
    from egp_deploy.errors import EgpError

    try:
        ref = parse_reference(source)
    except EgpError:
        ref = None
    if ref is None or ref.kind == ZOO and ref.name not in list_archs():
        # exit 8 like an unknown architecture anywhere else (a checkpoint's, a tool's --arch)
        raise UnsupportedError(f"{source!r} is neither a checkpoint file nor a model reference"
                               f"{close_matches(source, list_archs())}: use {forms()}")
    with trusting(ref):  # the user named it
        return check_reference(ref, origin="the command line")


def prune(
    source: PathLike | nn.Module,
    out_dir: PathLike = "runs/prune",
    *,
    method: str = "egp",
    data: str | None = None,
    iterations: int = 9,
    rate: float = 0.5,
    tolerance: float | None = None,
    patience: int = 1,
    epochs: int = 8,
    lr: float = 0.05,
    dense_epochs: int | None = None,
    dense_lr: float = 0.05,
    batch_size: int = 64,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    schedule: str = "cosine",
    entropy_mode: str = "dataset",
    calibration_batches: int | None = None,
    min_keep_cut: float = 0.01,
    temperature: float = 1.0,
    arch_kwargs: Mapping[str, Any] | str | None = None,
    weights: PathLike | None = None,
    trust_module: bool = False,
    seed: int = 0,
    resume: bool = False,
    force: bool = False,
    dist_backend: str = "auto",
    progress: bool = True,
    log: Log = _quiet,
) -> RunResult:
    """EGP (or ``method="imp"``) iterative pruning of a model reference, a model or a checkpoint.

    ``source``: an egp-deploy checkpoint file; a model reference (a zoo name, ``torchvision:NAME``,
    ``timm:NAME``, ``package.module:factory``) built with ``arch_kwargs`` and trained dense first
    (``dense_epochs``, default 30), or started from ``weights`` (a state_dict file: no dense
    training unless ``dense_epochs`` asks for it); or an ``nn.Module`` whose class can be imported
    again (``module:Class``, rebuilt with ``arch_kwargs``; its weights are the dense model).
    ``trust_module``: a checkpoint naming a ``package.module:factory`` may import it (that runs
    its code; a reference given as ``source`` is trusted as it is).
    Writes ``out_dir``/iter_NN.pt, best.pt, log.json and entropy.png; returns the run's log, best
    iteration and best checkpoint path. Under torchrun it runs data-parallel (only rank 0 writes).
    ``out_dir`` is locked for the run; a previous run in it is continued with ``resume``, replaced
    with ``force`` and refused otherwise, and ``source`` may not be a file that run would overwrite."""
    from egp_deploy.io_utils import is_main_process, run_folder
    from egp_deploy.validation import PRUNE_RUN_FILES, check_prune_paths, validate_options

    validate_options("prune", locals())
    if method not in ("egp", "imp"):
        raise UsageError(f"--method must be egp or imp, got {method!r}")
    if schedule not in ("cosine", "step", "constant"):
        raise UsageError(f"--schedule must be cosine, step or constant, got {schedule!r}")
    if entropy_mode not in ("dataset", "batch"):
        raise UsageError(f"--entropy-mode must be dataset or batch, got {entropy_mode!r}")
    if dist_backend not in ("auto", "nccl", "gloo"):
        raise UsageError(f"--dist-backend must be auto, nccl or gloo, got {dist_backend!r}")
    kwargs = parse_arch_kwargs(arch_kwargs) if isinstance(arch_kwargs, str) or arch_kwargs is None else dict(arch_kwargs)
    check_prune_paths(source, out_dir, weights)
    import torch
    import torch.nn as nn

    from egp_deploy.archs.references import trusting
    from egp_deploy.checkpoint import load_checkpoint, save_checkpoint
    from egp_deploy.data import load_data, recorded_data_spec
    from egp_deploy.distributed import init_distributed, shutdown
    from egp_deploy.errors import EgpError
    from egp_deploy.prune.loop import PruneConfig, run_pruning
    from egp_deploy.prune.train import TrainConfig

    instance = source if isinstance(source, nn.Module) else None
    from_file = instance is None and _is_checkpoint_path(source)
    if weights is not None and (from_file or instance is not None):
        raise UsageError("--weights applies to a model reference, not to a checkpoint or a model instance")
    out = Path(out_dir)
    # the folder is rank 0's (it writes every file of the run); the run's own inputs are never deleted
    keep = [p for p in (source, weights) if isinstance(p, (str, os.PathLike)) and Path(p).is_file()]
    lock = run_folder(out, resume=resume, force=force, command="egp-prune", run_files=PRUNE_RUN_FILES,
                      keep=keep) if is_main_process() else nullcontext()
    with lock:
        ctx = init_distributed(dist_backend)
        try:
            torch.manual_seed(seed)
            recipe = lambda n, rate_: TrainConfig(epochs=n, lr=rate_, momentum=momentum, weight_decay=weight_decay,  # noqa: E731
                                                  batch_size=batch_size, schedule=schedule)
            cfg = PruneConfig(method=method, iterations=iterations, rate=rate, tolerance=tolerance, patience=patience,
                              finetune=recipe(epochs, lr), entropy_mode=entropy_mode, calibration_batches=calibration_batches,
                              seed=seed, min_keep_cut=min_keep_cut, temperature=temperature)
            cfg.validate()
            if from_file:
                if kwargs:
                    raise UsageError("--arch-kwargs applies to a model reference, not to a checkpoint")
                with trusting(everything=trust_module):
                    start = load_checkpoint(Path(source))
                    # fail early (before loading data): an unknown model, an untrusted module, weights that do not fit
                    start.build_model()
                trusted = start.arch if trust_module else ()
                bundle = load_data(data or recorded_data_spec(start.metadata.get("data"), Path(source), "--data") or "digits")
                if tuple(bundle.input_shape) != tuple(start.input_shape):
                    raise UsageError(f"data {bundle.spec} has samples of shape {bundle.input_shape}, "
                                     f"the checkpoint expects {tuple(start.input_shape)}")
            else:
                if instance is not None:  # a copy: the caller's model stays as it is
                    ref, model = _instance_reference(instance, kwargs), copy.deepcopy(instance)
                else:
                    ref, model = str(_source_reference(str(source))), None
                trusted = ref
                spec = data or "digits"
                bundle = load_data(spec)
                with trusting(ref):
                    if model is None:
                        torch.manual_seed(seed)  # the initialisation train_dense gives
                        model, kwargs = _build_for_data(ref, kwargs, bundle, weights)
                    bundle = _fit_data(model, ref, bundle, spec)
                dense_path = out / "dense.pt"
                if resume and dense_path.is_file():
                    with trusting(ref):
                        start = load_checkpoint(dense_path, expected_arch=ref)
                else:
                    given_weights = instance is not None or weights is not None  # they are the dense model by default
                    n_dense = dense_epochs if dense_epochs is not None else (0 if given_weights else 30)
                    meta = ({"weights": str(weights)} if weights is not None else {}) | \
                        ({"source": "model instance"} if instance is not None else {})
                    start = _dense_checkpoint(model, ref, kwargs, bundle, recipe(n_dense, dense_lr), seed, ctx, progress, meta)
                    if ctx.is_main:
                        save_checkpoint(dense_path, start)
                        log(f"dense {ref}: test accuracy {start.metadata['test_acc']:.2f} % -> {dense_path}")
            with trusting(trusted):  # the loop rebuilds the model from its checkpoints (and on --resume)
                return run_pruning(start, bundle, cfg, out, ctx, resume=resume, progress=progress)
        except EgpError as e:
            if ctx.enabled and not ctx.is_main:
                raise type(e)(f"(rank {ctx.rank}) {e}") from None
            raise
        finally:
            shutdown(ctx)


# ------------------------------------------------------------------------------------ export


def export(
    model: PathLike,
    output: PathLike | None = None,
    *,
    input_shape: Sequence[int] | str | None = None,
    dynamic_batch: bool = False,
    batch_size: int = 1,
    exporter: str = "auto",
    tolerance: float = 1e-4,
    seed: int = 0,
    unsafe_pickle: bool = False,
    trust_module: bool = False,
) -> ExportResult:
    """PyTorch model file -> verified ONNX ModelProto with provenance metadata (``.model``);
    written atomically to ``output`` when given (nothing is written if the check fails).
    ``trust_module``: a checkpoint naming a ``package.module:factory`` may import it (runs its code)."""
    from egp_deploy.export import export_file, export_model, load_source, parse_input_shape
    from egp_deploy.validation import validate_options

    validate_options("export", {"batch_size": batch_size, "export_tolerance": tolerance, "seed": seed})
    shape = parse_input_shape(input_shape)
    options = dict(batch_size=batch_size, exporter=exporter, rtol=tolerance, seed=seed)
    if output is not None:
        return export_file(model, output, input_shape=shape, dynamic_batch=dynamic_batch,
                           unsafe_pickle=unsafe_pickle, trust_module=trust_module, **options)
    return export_model(load_source(model, unsafe_pickle=unsafe_pickle, trust_module=trust_module), input_shape=shape,
                        dynamic_batch=dynamic_batch, **options)


# ---------------------------------------------------------------------------------- optimize


def surgery_options(options: SurgeryOptions | Mapping[str, Any] | None = None, **overrides: Any) -> SurgeryOptions:
    """SurgeryOptions from an instance or a mapping, with keyword overrides; unknown keys are refused."""
    from egp_deploy.surgery import SurgeryOptions

    if isinstance(options, SurgeryOptions):
        values = dataclasses.asdict(options)
    else:
        values = dict(options or {})
    values.update(overrides)
    names = {f.name for f in dataclasses.fields(SurgeryOptions)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UsageError(f"unknown surgery option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    from egp_deploy.surgery.passes import check_pass_names
    from egp_deploy.validation import validate_surgery_options

    # bad numbers, choices and pass names fail here, before any model or data is loaded
    validate_surgery_options(values)
    values["skip"], values["only"] = check_pass_names(values.get("skip", []), values.get("only"))
    return SurgeryOptions(**values)


def parse_surgery_settings(settings: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE strings (``--set``) -> {field: value}, each value converted to the field's declared type."""
    from egp_deploy.surgery import SurgeryOptions

    hints = typing.get_type_hints(SurgeryOptions)
    names = {f.name for f in dataclasses.fields(SurgeryOptions)}
    values: dict[str, Any] = {}
    for item in settings:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in names:
            raise UsageError(f"--set expects KEY=VALUE with KEY one of {', '.join(sorted(names))}; got {item!r}")
        values[key] = _convert(raw.strip(), hints.get(key, str), key)
    return values


def _convert(raw: str, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    choices = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    if raw.lower() == "none" and type(None) in choices:
        return None
    for t in choices:
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
    if all(t in (int, float, str, bool, type(None)) for t in choices):
        raise UsageError(f"--set {key}={raw}: not a valid {' or '.join(getattr(t, '__name__', str(t)) for t in choices)}")
    return raw


def _load_onnx(model: Any) -> onnx.ModelProto:
    import onnx

    from egp_deploy.onnx_file import check_onnx_sizes, read_onnx

    if isinstance(model, onnx.ModelProto):
        check_onnx_sizes(model)
        return model
    from egp_deploy.errors import InputFileError

    path = Path(model)
    proto = read_onnx(path)  # sizes checked before weights are decoded
    if not proto.graph.node:
        if proto.ir_version and proto.HasField("graph") and (proto.graph.input or proto.graph.output):
            raise UnsupportedError(f"{path} is an ONNX graph with no nodes (its outputs are its inputs or "
                                   "constants): nothing to run or rewrite")
        raise InputFileError(f"{path} is not an ONNX model (no graph nodes)")
    return proto


def _check_surgery_model(proto: onnx.ModelProto, samples: int) -> None:
    """What the surgery needs of a model, before any data is loaded: one float32 input whose
    ``samples`` fit in memory (exit 8 otherwise) and finite weights (exit 6)."""
    from egp_deploy.validation import check_finite_weights, check_onnx_model_inputs

    check_onnx_model_inputs(proto, "the surgery", samples, float32_only=True)
    check_finite_weights(proto)


def optimize(
    model: onnx.ModelProto | PathLike,
    calibration: np.ndarray | str | None = None,
    held_out: np.ndarray | str | None = None,
    options: SurgeryOptions | Mapping[str, Any] | None = None,
    *,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    **overrides: Any,
) -> SurgeryResult:
    """The verified graph surgery on any single-input ONNX model.

    ``calibration`` / ``held_out``: arrays ``(N, *sample)``, or sources for
    :func:`egp_deploy.calibration.load_calibration` (a data spec, a .npy/.npz file, ``"random"``;
    None: random, which only exact rewrites can rely on). ``options`` / keyword overrides:
    fields of SurgeryOptions. The result's model carries fresh provenance metadata (``egp.surgery``).
    Raises VerificationError when the rewrite does not match the input (nothing to write)."""
    import numpy as np

    from egp_deploy.calibration import load_calibration, load_samples, onnx_sample_shape
    from egp_deploy.validation import validate_options

    validate_options("surgery", {"samples": samples, "seed": seed})
    opts = surgery_options(options, **overrides)
    proto = _load_onnx(model)
    given = sum(len(a) for a in (calibration, held_out) if isinstance(a, np.ndarray))
    _check_surgery_model(proto, given or 2 * samples)
    if not isinstance(calibration, np.ndarray):
        sample_shape, _ = onnx_sample_shape(proto)
        if isinstance(held_out, np.ndarray):
            cal = load_samples(calibration or "random", sample_shape, samples, "val", seed)
        else:
            chosen = load_calibration(calibration, sample_shape, samples, held_out=held_out, seed=seed)
            cal, held_out = chosen.calibration, chosen.held_out
        calibration = cal
    elif isinstance(held_out, str):
        held_out = load_samples(held_out, onnx_sample_shape(proto)[0], samples, "test", seed + 1)
    return _surgery(proto, calibration, held_out, opts)


def _surgery(proto: onnx.ModelProto, calibration: np.ndarray, held_out: np.ndarray | None,
             opts: SurgeryOptions) -> SurgeryResult:
    """The surgery of a checked model on loaded inputs, with fresh provenance metadata."""
    from egp_deploy.provenance import record_surgery
    from egp_deploy.surgery import optimize as run_surgery

    result = run_surgery(proto, calibration, held_out, opts)
    record_surgery(result.model, result.report, proto)
    return result


def surgery_file(
    input: PathLike,
    output: PathLike,
    *,
    calibration: str | None = None,
    held_out: str | None = None,
    samples: int = DEFAULT_SAMPLES,
    held_out_samples: int = DEFAULT_SAMPLES,
    options: SurgeryOptions | Mapping[str, Any] | None = None,
    report: PathLike | None = None,
    plot: PathLike | None = None,
    log: Log = _quiet,
) -> SurgeryResult:
    """egp-surgery: read ``input``, run :func:`optimize` with inputs chosen by the calibration
    policy (:mod:`egp_deploy.calibration`), write ``output`` (+ JSON ``report``, PNG ``plot``)."""
    from egp_deploy import validation as check
    from egp_deploy.calibration import load_calibration, onnx_sample_shape
    from egp_deploy.io_utils import atomic_files
    from egp_deploy.surgery.report import save_report_plot

    check.validate_options("surgery", locals())
    opts = surgery_options(options)
    inputs = [input] + [Path(p) for p in (calibration, held_out) if p and Path(p).is_file()]
    outputs = {"OUTPUT": output, "--report": report, "--plot": plot}
    check.check_outputs(inputs, outputs)
    proto = _load_onnx(input)  # the model first: its checks are cheap, the data's are not
    _check_surgery_model(proto, samples + held_out_samples)
    check.check_sample_file("--calibration", calibration)
    check.check_sample_file("--held-out", held_out)
    from egp_deploy.surgery.latency import make_cost_model

    make_cost_model(opts, inputs, outputs)  # cost options, latency table and backend checked before any work
    chosen = load_calibration(calibration, onnx_sample_shape(proto)[0], samples, held_out_samples, held_out)
    _announce(chosen, log)
    result = _surgery(proto, chosen.calibration, chosen.held_out, opts)
    result.report["files"] = {"input": os.fspath(input), "output": os.fspath(output),
                              "calibration": chosen.description}
    with atomic_files() as staged:  # model, report and plot appear together or not at all
        staged.write_bytes(output, result.model.SerializeToString())
        if report is not None:
            staged.write_json(report, result.report)
        if plot is not None:
            save_report_plot(result.report, staged.path(plot))
    return result


# ------------------------------------------------------------------------------------ deploy


@dataclass
class DeployPaths:
    """Where deploy() writes: the exported graph, the surgered graph, the JSON report, the plot, the engine."""

    exported: Path
    report: Path
    surgered: Optional[Path] = None
    plot: Optional[Path] = None
    engine: Optional[Path] = None

    def outputs(self) -> list[Path]:
        return [p for p in (self.exported, self.surgered, self.report, self.plot) if p is not None]


@dataclass
class DeployResult:
    """Everything one deploy() produced: artefact paths, the export and surgery results, metrics, the report."""

    paths: DeployPaths
    export: ExportResult
    surgery: Optional[SurgeryResult]
    metrics_exported: dict[str, Any]
    metrics_surgered: Optional[dict[str, Any]]
    calibration: Optional[CalibrationSet]
    report: dict[str, Any]
    build: Optional[dict[str, Any]] = None
    notes: list[str] = field(default_factory=list)

    @property
    def model(self) -> onnx.ModelProto:
        """The final graph: surgered when the surgery ran, else the exported one."""
        return self.surgery.model if self.surgery is not None else self.export.model

    def gained(self) -> list[str]:
        """What the surgery changed, one phrase per figure (empty without surgery or when nothing went)."""
        before, after = self.metrics_exported, self.metrics_surgered
        if after is None:
            return []
        out = [f"{label} {before[k]} -> {after[k]}" for label, k in
               (("conv/gemm layers", "conv_gemm_layers"), ("activations", "activations"),
                ("longest path", "longest_path_layers")) if after[k] != before[k]]
        if before["macs_dense"]:
            out.append(f"dense MACs x{after['macs_dense'] / before['macs_dense']:.3f}")
        return out


def output_paths(model_path: PathLike, output: PathLike | None, surgery: bool,
                 report: PathLike | None = None) -> DeployPaths:
    """-o names the final model; the exported graph and the report sit beside it."""
    model_path = Path(model_path)
    final = Path(output) if output is not None else \
        model_path.with_name(model_path.name.split(".")[0] + (".egp.onnx" if surgery else ".onnx"))
    name = final.name
    base = name[: -len(".egp.onnx")] if name.endswith(".egp.onnx") else (name[:-5] if name.endswith(".onnx") else name)
    if not surgery:
        rep = Path(report) if report is not None else final.with_name(base + ".export.json")
        return DeployPaths(exported=final, report=rep)
    exported = final.with_name(base + ".onnx")
    if exported.resolve() == final.resolve():
        exported = final.with_name(base + ".exported.onnx")
    stem = name[:-5] if name.endswith(".onnx") else name
    rep = Path(report) if report is not None else final.with_name(stem + ".json")
    return DeployPaths(exported=exported, surgered=final, report=rep, plot=rep.with_suffix(".png"))


def _environment(threads: int) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torch

    return {
        "python": platform.python_version(), "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "threads": threads, "torch": torch.__version__, "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _try_build(onnx_path: Path, precision: str, notes: list[str]) -> dict[str, Any]:
    """Build a TensorRT engine when TensorRT and a GPU are present; otherwise say why, never fail the export."""
    try:
        import tensorrt  # noqa: F401  (probe only: egp_deploy.build does the work)
    except Exception as e:
        msg = f"TensorRT is not importable here ({type(e).__name__}); skipped the engine build"
        notes.append(msg)
        return {"built": False, "reason": msg}
    from egp_deploy.build import build_engine

    engine_path = onnx_path.with_suffix(".engine")
    try:
        built = build_engine(onnx_path, engine_path, precision=precision)
    except BackendUnavailableError as e:  # no GPU, driver mismatch: the export itself still succeeded
        notes.append(f"engine build skipped: {e}")
        return {"built": False, "reason": str(e)}
    info = dataclasses.asdict(built) if dataclasses.is_dataclass(built) else None
    return {"built": True, "engine": str(engine_path), "info": info}


def deploy(
    checkpoint: PathLike,
    output: PathLike | None = None,
    *,
    calibration: str | CalibrationSet | None = None,
    samples: int = DEFAULT_SAMPLES,
    surgery: bool = True,
    options: SurgeryOptions | Mapping[str, Any] | None = None,
    input_shape: Sequence[int] | str | None = None,
    dynamic_batch: bool = False,
    batch_size: int = 1,
    exporter: str = "auto",
    export_tolerance: float = 1e-4,
    unsafe_pickle: bool = False,
    trust_module: bool = False,
    build: bool = False,
    precision: str = "fp32",
    report: PathLike | None = None,
    plot: bool = True,
    threads: int = 2,
    seed: int = 0,
    progress: bool = False,
    log: Log = _quiet,
    stage: Stage = _no_stage,
) -> DeployResult:
    """The whole egp-export job: export -> verify against PyTorch -> surgery -> verify -> write.

    Writes the exported graph, the surgered graph, a JSON report
    and a before/after PNG (paths: :func:`output_paths`); with ``build`` also a TensorRT engine when
    TensorRT and a GPU are present. ``calibration``: a data spec, a .npy/.npz file or ``"random"``
    (default: the checkpoint's data set; random with a warning when none is recorded), or a
    CalibrationSet already loaded (the same inputs for many models). Every
    argument and output path is checked before any work, and the outputs are committed together at
    the end (a refused surgery leaves none of them; rerun with ``surgery=False`` to keep the exported
    graph). ``trust_module``: a checkpoint naming a ``package.module:factory`` may import it (that
    runs the module's code). ``log`` receives progress lines,
    ``stage(text)`` wraps each long stage (a spinner in a terminal)."""
    import torch

    from egp_deploy.calibration import CalibrationSet, load_calibration
    from egp_deploy.data import recorded_data_spec
    from egp_deploy.export import detect_kind, export_model, load_source, parse_input_shape, read_metadata
    from egp_deploy.io_utils import staged_files
    from egp_deploy.onnx_metrics import graph_metrics
    from egp_deploy.validation import check_outputs, validate_options

    validate_options("export", locals())
    model_path = Path(checkpoint)
    detect_kind(model_path)  # a missing / non-PyTorch input is reported before anything about outputs
    paths = output_paths(model_path, output, surgery, report)
    calibration_file = calibration if isinstance(calibration, (str, os.PathLike)) and Path(calibration).is_file() else None
    check_outputs([model_path, calibration_file], {"exported graph": paths.exported, "surgered graph": paths.surgered,
                                                   "report": paths.report, "plot": paths.plot})
    shape = parse_input_shape(input_shape)
    if precision not in ("fp32", "fp16"):
        raise UsageError(f"--precision must be fp32 or fp16, got {precision!r}")
    if surgery:
        given = dict(options) if isinstance(options, Mapping) else {}
        opts = surgery_options(options, **{k: v for k, v in (("threads", threads), ("progress", progress))
                                           if k not in given and not hasattr(options, "threads")})
        from egp_deploy.surgery.latency import make_cost_model

        make_cost_model(opts, [model_path, calibration_file], {"exported graph": paths.exported, "surgered graph":
                                                              paths.surgered, "report": paths.report, "plot": paths.plot})
    elif options:
        raise UsageError("--set configures the surgery; it has no effect with --no-surgery")
    torch.set_num_threads(threads)
    with staged_files() as staged:  # every output is committed at the end together, or none
        seconds: dict[str, float] = {}
        notes: list[str] = []
        t_all = time.perf_counter()
        with stage("loading the model"):
            t0 = time.perf_counter()
            source = load_source(model_path, unsafe_pickle=unsafe_pickle, trust_module=trust_module)
            seconds["load"] = time.perf_counter() - t0
        sample_shape = shape or source.input_shape
        data_spec = (source.metadata or {}).get("data")
        given = calibration if isinstance(calibration, CalibrationSet) else None
        chosen = None if given or not surgery else (
            calibration or recorded_data_spec(data_spec, model_path, "--calibration", allowed=unsafe_pickle))
        calib = given
        if surgery and sample_shape is not None and given is None:  # bad calibration data fails before any export work
            calib = load_calibration(chosen, tuple(sample_shape), samples, seed=seed)
            _announce(calib, log)
        with stage(f"exporting {source.kind} to ONNX and verifying with onnxruntime"):
            res = export_model(source, input_shape=shape, dynamic_batch=dynamic_batch, batch_size=batch_size,
                               exporter=exporter, rtol=export_tolerance, seed=seed)
        seconds.update({f"export.{k}": v for k, v in res.seconds.items()})
        before = graph_metrics(res.model)
        log(f"exported {source.kind} {model_path.name} with the {res.exporter} exporter (opset {res.opset}), "
            f"relative error vs PyTorch {res.max_rel_error:.2e} on batch {res.checked_batches}")
        if res.fp32_noise_floor is not None:
            log(f"note: the error exceeds --export-tolerance {export_tolerance:g}, but the graph disagrees with itself by "
                f"{res.fp32_noise_floor:.2e} between two onnxruntime kernel choices (an ill-conditioned model); "
                "accepted up to twice that")
        out: dict[str, Any] = {
            "tool": "egp-export",
            "source": {"path": str(model_path), "kind": source.kind, "sha256": source.sha256, "arch": source.arch,
                       "arch_kwargs": source.arch_kwargs, "input_shape": list(res.input_shape[1:])},
            "export": {"path": str(paths.exported), "exporter": res.exporter, "opset": res.opset,
                       "dynamic_batch": res.dynamic_batch, "batch": res.input_shape[0],
                       "max_rel_error_vs_torch": res.max_rel_error, "checked_batches": res.checked_batches,
                       "tolerance": export_tolerance, "fp32_noise_floor": res.fp32_noise_floor},
            "metrics_exported": before,
            "metadata": {k: v for k, v in read_metadata(res.model).items() if k != "node_modules"},
            "environment": _environment(threads),
        }
        staged.write_bytes(paths.exported, res.model.SerializeToString())
        surgered = after = None
        if surgery:
            assert paths.surgered is not None
            if calib is None:  # a .pt2 without a readable input spec: the shape is known only after export
                calib = load_calibration(chosen, tuple(res.input_shape[1:]), samples, seed=seed)
                _announce(calib, log)
            t0 = time.perf_counter()
            with stage("graph surgery") if not progress else nullcontext():
                surgered = optimize(res.model, calib.calibration, calib.held_out, opts)
            seconds["surgery"] = time.perf_counter() - t0
            after = graph_metrics(surgered.model)
            out.update(surgery=surgered.report, calibration=calib.description, metrics_surgered=after,
                       surgered=str(paths.surgered))
            staged.write_bytes(paths.surgered, surgered.model.SerializeToString())
            if plot and paths.plot is not None:
                from egp_deploy.surgery.report import save_report_plot

                save_report_plot(surgered.report, staged.path(paths.plot))
                out["plot"] = str(paths.plot)
            else:
                paths.plot = None
        built = None
        if build:
            staged.commit()  # the engine is built from the file
            built = _try_build(paths.surgered or paths.exported, precision, notes)
            out["build"] = built
            if built.get("built"):
                paths.engine = Path(built["engine"])
        seconds["total"] = time.perf_counter() - t_all
        out["seconds"] = seconds
        staged.write_json(paths.report, out)
        staged.commit()
        return DeployResult(paths=paths, export=res, surgery=surgered, metrics_exported=before, metrics_surgered=after,
                            calibration=calib, report=out, build=built, notes=notes)


def _announce(calib: CalibrationSet, log: Log) -> None:
    for w in calib.warnings:
        log(f"warning: {w}")
    log(f"calibration: {calib.description}")


# ------------------------------------------------------------------------------ bench, check


@dataclass
class BenchReport:
    """egp-bench's result: per-model latency statistics (trtexec conventions), ratios, environment.

    ``data`` is the JSON-able report (what ``egp-bench --json`` writes)."""

    data: dict[str, Any]

    @property
    def models(self) -> list[dict[str, Any]]:
        return self.data["models"]

    @property
    def warnings(self) -> list[str]:
        return self.data.get("warnings", [])

    def median_ms(self, index: int = 0) -> float:
        return float(self.models[index]["latency_ms"]["median"])

    def ratio_to_first(self, index: int) -> dict[str, float]:
        """Median (with min, max) over interleaved rounds of model ``index``'s time / the first model's."""
        return self.models[index]["ratio_to_first"]


def _settings(settings: BenchSettings | None, kw: Mapping[str, Any]) -> BenchSettings:
    from egp_deploy.bench import BenchSettings
    from egp_deploy.runners import parse_shapes

    values = dataclasses.asdict(settings) if settings is not None else {}
    values.update(kw)
    if isinstance(values.get("shapes"), str):
        values["shapes"] = parse_shapes(values["shapes"])
    names = {f.name for f in dataclasses.fields(BenchSettings)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UsageError(f"unknown bench setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    chosen = BenchSettings(**values)
    chosen.validate()  # before any model is loaded
    return chosen


def bench(
    models: Sequence[PathLike] | PathLike,
    backend: str = "auto",
    settings: BenchSettings | None = None,
    *,
    progress: bool = False,
    json_path: PathLike | None = None,
    plot_path: PathLike | None = None,
    **setting_overrides: Any,
) -> BenchReport:
    """Latency of one or more models side by side (interleaved rounds, trtexec conventions).

    Settings: a BenchSettings or keyword fields of it (``warmup_ms``, ``min_iterations``,
    ``min_duration_s``, ``batch``, ``shapes``, ``threads``, ``precision``, ``include_copies``, ``seed``)."""
    from egp_deploy.bench import benchmark_models, save_latency_plot
    from egp_deploy.io_utils import atomic_files
    from egp_deploy.validation import check_outputs

    paths = [models] if isinstance(models, (str, os.PathLike)) else list(models)
    chosen = _settings(settings, setting_overrides)
    check_outputs(paths, {"--json": json_path, "--plot": plot_path})
    data = benchmark_models(paths, backend, chosen, progress=progress)
    with atomic_files() as outputs:  # the report and the plot appear together or not at all
        if json_path is not None:
            outputs.write_json(json_path, data)
        if plot_path is not None:
            save_latency_plot(data, outputs.path(plot_path))
    return BenchReport(data)


EXIT_PASS, EXIT_OVER, EXIT_UNMEASURED, EXIT_INTERRUPTED = 0, 1, 2, 130
CHECK_SCHEMA = "egp-deploy-check/1"


@dataclass
class CheckResult:
    """egp-check's verdict: ``exit_code`` 0 within budget, 1 over budget, 2 could not measure."""

    verdict: str  # "pass" | "over_budget" | "could_not_measure"
    exit_code: int
    message: str
    measured_ms: Optional[float]
    report: dict[str, Any]

    @property
    def passed(self) -> bool:
        return self.exit_code == EXIT_PASS


def check(
    model: PathLike,
    budget_ms: float,
    *,
    percentile: float = 99.0,
    backend: str = "auto",
    settings: BenchSettings | None = None,
    json_path: PathLike | None = None,
    _error: BaseException | None = None,
    **setting_overrides: Any,
) -> CheckResult:
    """The latency gate: measure ``model`` and compare its ``percentile`` latency with ``budget_ms``.

    Never raises for a measurement problem: any failure is the verdict "could_not_measure"
    (exit code 2; 130 when interrupted) with a one-line reason, as CI gates expect. The report is
    written to ``json_path`` in every case, except where that path is the model itself (the
    reason is then the message), and OSError if writing it fails."""
    from egp_deploy.io_utils import write_json_atomic
    from egp_deploy.validation import check_outputs, output_is_safe, validate_options

    model = Path(model)
    json_arg = json_path
    if json_path is not None and not output_is_safe([model], json_path):
        json_path = None  # the JSON would replace the model (or cannot be written): the error says so
    report: dict[str, Any] = {"schema": CHECK_SCHEMA, "model": str(model), "budget_ms": budget_ms,
                              "percentile": percentile, "backend": backend}
    measured = None
    try:
        from egp_deploy.bench import benchmark_models, percentile as pct

        if _error is not None:  # the caller could not even parse what to measure
            raise _error
        validate_options("check", {"budget_ms": budget_ms, "percentile": percentile})
        chosen = _settings(settings, setting_overrides)
        check_outputs([model], {"--json": json_arg})
        data = benchmark_models([model], backend, chosen, progress=False)
        entry = data["models"][0]
        # the 50th percentile is the median as trtexec computes it (the mean of the middle two for even counts)
        measured = entry["latency_ms"]["median"] if percentile == 50 else pct(sorted(entry["samples_ms"]), percentile)
        within = measured <= budget_ms
        code = EXIT_PASS if within else EXIT_OVER
        message = (f"{'PASS' if within else 'FAIL'}: p{percentile:g} latency {measured:.4f} ms "
                   f"{'<=' if within else '>'} budget {budget_ms:g} ms ({model.name}, {entry['backend']}, "
                   f"{entry['iterations']} iterations, median {entry['latency_ms']['median']:.4f} ms)")
        report.update(verdict="pass" if within else "over_budget", exit_code=code, measured_ms=measured,
                      backend=entry["backend"], message=message, latency_ms=entry["latency_ms"],
                      iterations=entry["iterations"], cv=entry["cv"], noisy=entry["noisy"], inputs=entry["inputs"],
                      settings=data["settings"], environment=data["environment"], warnings=data["warnings"])
    except KeyboardInterrupt:  # the JSON is written on this exit path too
        code, message = EXIT_INTERRUPTED, "could not measure: interrupted"
        report.update(verdict="could_not_measure", exit_code=code, error="KeyboardInterrupt", message=message)
    except Exception as e:  # noqa: BLE001 - ANY failure means "could not measure" (exit 2), never 1
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        code, message = EXIT_UNMEASURED, f"could not measure ({type(e).__name__}): {first}"
        report.update(verdict="could_not_measure", exit_code=code, error=type(e).__name__, message=message,
                      environment=_environment_or_error())
    if json_path is not None:
        write_json_atomic(json_path, report)
    return CheckResult(verdict=report["verdict"], exit_code=code, message=message, measured_ms=measured, report=report)


def _environment_or_error() -> dict[str, Any]:
    try:
        from egp_deploy.bench import collect_environment

        return collect_environment()
    except Exception as e:  # noqa: BLE001 - the report must still be written
        return {"error": f"{type(e).__name__}: {e}"}
