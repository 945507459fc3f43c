"""TensorRT engine builder (``egp-build``) and the engine sidecar.

Written directly against the TensorRT Python API (10.x for JetPack 6, 11.x strongly typed) rather
than Polygraphy's loaders because we need the builder objects themselves for atomic writes of
engine + timing cache, the inspector's layer list and the version/GPU sidecar.

Beside ``model.engine`` we write ``model.engine.json`` (the sidecar: TensorRT version, GPU name,
compute capability, precision, shapes, source ONNX sha256) and ``model.engine.layers.json``
(the engine inspector's layer list). The runner refuses an engine whose sidecar names another
TensorRT version or another GPU, because a TensorRT engine only runs where it was built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from egp_deploy.errors import BackendUnavailableError, InputFileError, UnsupportedError, UsageError, first_words
from egp_deploy.engine_files import (  # noqa: F401 - re-exported: build's public API
    PRECISIONS, SIDECAR_FORMAT, SIDECAR_VERSION, gpu_identity, import_tensorrt, layers_path, make_sidecar,
    read_sidecar, sidecar_path, trt_major, validate_sidecar,
)
from egp_deploy.io_utils import atomic_files, sha256_file
from egp_deploy.runners.base import ShapeTriple


# ------------------------------------------------------------------------------------------
# ONNX facts the builder needs
# ------------------------------------------------------------------------------------------
def onnx_inputs(onnx_path: str | Path) -> tuple[list[tuple[str, tuple[int | None, ...]]], bool]:
    """([(input name, shape with None for dynamic dims)], whether the graph computes in fp16)."""
    import onnx

    from egp_deploy.onnx_file import read_onnx

    path = Path(onnx_path)
    model = read_onnx(path, load_external_data=False)  # sizes checked before TensorRT parses it
    if not model.graph.node:
        raise InputFileError(f"{path} is not an ONNX model with a graph (no nodes)")
    inits = {i.name for i in model.graph.initializer}
    inputs = []
    for i in model.graph.input:
        if i.name in inits:
            continue
        dims = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in i.type.tensor_type.shape.dim
        )
        inputs.append((i.name, dims))
    fp16 = any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer) or any(
        i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in model.graph.input
    )
    return inputs, fp16


def plan_profiles(
    inputs: list[tuple[str, tuple[int | None, ...]]], shapes: Mapping[str, ShapeTriple] | None
) -> dict[str, ShapeTriple]:
    """One optimisation profile: --shapes where given; a dynamic batch alone defaults to 1/1/1.

    Returns only the inputs that need a profile (those with a dynamic dimension); raises
    UsageError on unknown names, wrong rank, contradicted static dims, or unset dynamic dims.
    """
    shapes = dict(shapes or {})
    names = [n for n, _ in inputs]
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise UsageError(f"--shapes names {unknown}, the model's inputs are {names}")
    out: dict[str, ShapeTriple] = {}
    for name, dims in inputs:
        if name in shapes:
            for s in shapes[name]:
                if len(s) != len(dims) or any(d is not None and d != v for d, v in zip(dims, s)):
                    raise UsageError(
                        f"wrong shape {list(s)} for input {name!r}: the model expects "
                        f"{[d if d is not None else '?' for d in dims]}"
                    )
            if any(d is None for d in dims):
                out[name] = shapes[name]
            continue
        if any(d is None for d in dims[1:]):
            raise UsageError(
                f"input {name!r} has dynamic dimensions {[d if d is not None else '?' for d in dims]}: "
                f"give them with --shapes {name}:MIN/OPT/MAX"
            )
        if dims and dims[0] is None:
            one = (1, *dims[1:])
            out[name] = (one, one, one)
    return out


def network_typing(trt_version: str, precision: str, onnx_is_fp16: bool) -> tuple[bool, bool]:
    """(strongly_typed network, set the FP16 builder flag) for this TensorRT and precision.

    TensorRT 11 only builds strongly typed networks (the FP16/INT8 builder flags are gone): the
    ONNX's own types decide, so fp16 needs an fp16 ONNX. TensorRT 10 also accepts a weakly
    typed fp32 ONNX with the FP16 flag (TensorRT then picks fp16 kernels where it likes).
    """
    if precision not in PRECISIONS:
        raise UsageError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    major = trt_major(trt_version)
    if major < 10:
        raise UnsupportedError(f"TensorRT {trt_version} is too old: egp-build supports TensorRT 10 and 11")
    if precision == "fp32" and onnx_is_fp16:
        raise UsageError("this ONNX computes in fp16: build it with --precision fp16")
    if major >= 11:
        if precision == "fp16" and not onnx_is_fp16:
            raise UnsupportedError(
                f"TensorRT {trt_version} builds strongly typed networks, so fp16 needs an fp16 ONNX: convert it first "
                "(e.g. `polygraphy convert --fp-to-fp16 model.onnx -o model.fp16.onnx`) or build fp32"
            )
        return True, False
    if precision == "fp16":
        return (True, False) if onnx_is_fp16 else (False, True)
    return False, False


# ------------------------------------------------------------------------------------------
# Build
# ------------------------------------------------------------------------------------------
@dataclass
class BuildResult:
    engine_path: Path
    sidecar_path: Path
    layers_path: Path | None
    sidecar: dict[str, Any]
    layers: list[Any] = field(default_factory=list)


def _trt_logger(trt):
    cls = trt.ILogger

    class _Collect(cls):  # keeps errors for our one-line message instead of spamming the console
        def __init__(self) -> None:
            cls.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):  # noqa: D401 - TensorRT callback
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg))

    return _Collect()


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path | None = None,
    *,
    precision: str = "fp32",
    workspace_mib: int | None = 1024,
    shapes: Mapping[str, ShapeTriple] | None = None,
    timing_cache: str | Path | None = None,
    write_layers: bool = True,
) -> BuildResult:
    """Build ``onnx_path`` into a TensorRT engine; write engine, sidecar and layer list atomically."""
    from egp_deploy.validation import check_build_paths, validate_options

    validate_options("build", {"workspace_mib": workspace_mib} if workspace_mib is not None else {})
    check_build_paths(onnx_path, engine_path, timing_cache, write_layers)
    onnx_path = Path(onnx_path)
    engine_path = Path(engine_path) if engine_path else onnx_path.with_suffix(".engine")
    inputs, is_fp16 = onnx_inputs(onnx_path)
    profiles = plan_profiles(inputs, shapes)
    trt = import_tensorrt()
    strongly_typed, fp16_flag = network_typing(trt.__version__, precision, is_fp16)
    gpu = gpu_identity()

    logger = _trt_logger(trt)
    builder = trt.Builder(logger)
    if builder is None:
        raise BackendUnavailableError("TensorRT could not create a builder: no usable NVIDIA GPU / driver here")
    # TensorRT 11 types every network strongly (the flag is accepted and ignored there); 10.x needs it
    typed_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    flags = 1 << int(typed_flag) if strongly_typed and typed_flag is not None else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors
        first = errs[0].strip().splitlines()[0] if errs else "unknown parser error"
        raise UnsupportedError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {first_words(first)}")

    config = builder.create_builder_config()
    if workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    if fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 math is on by default on Ampere+
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # full layer info for the inspector
    if profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profiles.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        first = logger.errors[0].splitlines()[0] if logger.errors else "see TensorRT's log"
        raise UnsupportedError(f"TensorRT could not build {onnx_path.name}: {first_words(first)}")
    engine_bytes = bytes(serialized)

    layers: list[Any] = []
    lpath = layers_path(engine_path) if write_layers else None
    if lpath:
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(engine_bytes)
        info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
        layers = info.get("Layers", []) if isinstance(info, dict) else info

    import hashlib

    sidecar = make_sidecar(
        trt_version=trt.__version__, gpu=gpu, precision=precision, onnx_path=onnx_path,
        onnx_sha256=sha256_file(onnx_path), engine_sha256=hashlib.sha256(engine_bytes).hexdigest(),
        profiles=profiles, strongly_typed=strongly_typed, workspace_mib=workspace_mib,
    )
    spath = sidecar_path(engine_path)
    with atomic_files() as outputs:  # engine, sidecar, layer list and cache appear together or not at all
        outputs.write_bytes(engine_path, engine_bytes)
        if cache_path:
            outputs.write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
        if lpath:
            outputs.write_json(lpath, {"engine": engine_path.name, "num_layers": len(layers), "layers": layers})
        outputs.write_json(spath, sidecar)
    return BuildResult(engine_path, spath, lpath, sidecar, layers)
