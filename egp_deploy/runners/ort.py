"""onnxruntime runners: CPU (explicit thread counts), CUDA and TensorRT execution providers.

The one place that opens onnxruntime sessions: ``open_session`` (used by OrtRunner, export's
verification, the surgery's activation statistics and verification) and the batch helpers built
on it (``run_model``, ``fp32_noise_floor``), so every stage runs a graph with the same options.

GPU providers are detected by creating a session and reading ``session.get_providers()``:
``get_available_providers()`` lists CUDA even when its libraries cannot load.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from egp_deploy.errors import (
    BackendUnavailableError, DataError, InputFileError, UnsupportedError, UsageError, first_words,
)
from egp_deploy.numeric import relative_error
from egp_deploy.runners.base import Runner, TensorSpec

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}

# provider wanted by each backend, and the extra that installs it
_PROVIDERS = {
    "ort-cpu": ("CPUExecutionProvider", "cpu"),
    "ort-cuda": ("CUDAExecutionProvider", "gpu"),
    "ort-trt": ("TensorrtExecutionProvider", "gpu"),
}


def import_onnxruntime(extra: str = "cpu"):
    """onnxruntime, its own logging set to :func:`ort_log_severity` (BackendUnavailableError when it
    is not installed)."""
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError(
            f"onnxruntime is not installed: pip install 'egp-deploy[{extra}]'"
        ) from None
    onnxruntime.set_default_logger_severity(ort_log_severity())
    return onnxruntime


def ort_log_severity() -> int:
    """What onnxruntime may print itself (its C++ logger writes to stderr, past Python's logging):
    errors (3) by default, nothing below fatal (4) when the ``onnxruntime`` logger is silenced, as
    the commands do without --verbose. A failing kernel's "[E:onnxruntime ...]" line would otherwise
    come before our own one-line error, with raw colour codes when stderr is not a terminal."""
    return 3 if logging.getLogger("onnxruntime").isEnabledFor(logging.ERROR) else 4


def default_threads() -> int:
    """Cores this process may use (affinity-aware), the intra-op default we report."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def open_session(
    model: Any,
    providers: list | tuple = ("CPUExecutionProvider",),
    *,
    threads: int = 0,
    inter_op_threads: int = 0,
    optimized: bool = True,
):
    """An onnxruntime session on ``model`` (a path, serialized bytes or an onnx.ModelProto).

    threads / inter_op_threads: 0 leaves onnxruntime's default; ``optimized=False`` turns the graph
    optimisations off (other kernels: how ``fp32_noise_floor`` measures round-off). Sequential
    execution, errors-only logging. onnxruntime's own exceptions propagate: callers say what failed.
    """
    ort = import_onnxruntime()
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    if inter_op_threads:
        so.inter_op_num_threads = int(inter_op_threads)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = ort_log_severity()  # fallbacks and kernel errors become our own one-line messages
    if isinstance(model, (bytes, str)):
        source = model
    elif isinstance(model, Path):
        source = str(model)
    else:
        source = model.SerializeToString()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Specified provider ... is not in available provider names"
        return ort.InferenceSession(source, so, providers=list(providers))


def open_cpu_session(model: Any, threads: int = 0, optimized: bool = True):
    """``open_session`` on the CPU provider; a model onnxruntime cannot run is an UnsupportedError."""
    try:
        return open_session(model, threads=threads, optimized=optimized)
    except BackendUnavailableError:
        raise
    except Exception as e:  # unknown custom ops, unsupported opsets: nothing to measure or verify with
        lines = str(e).strip().splitlines()
        raise UnsupportedError("onnxruntime cannot run this model, so it cannot be measured or verified: "
                               f"{lines[0] if lines else type(e).__name__}") from None


def _fmt_dims(dims: list[int | None]) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in dims) + ")"


def single_input_plan(model, data: np.ndarray) -> tuple[str, int | None]:
    """(name, static batch or None) of the one graph input ``data`` feeds; DataError when it cannot."""
    graph = model.graph
    init_names = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init_names]
    if len(inputs) != 1:
        raise DataError(f"the model has {len(inputs)} inputs; calibration supports exactly one")
    inp = inputs[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    if len(dims) != data.ndim:
        raise DataError(f"calibration data has shape {tuple(data.shape)}, the model input "
                        f"{inp.name!r} has rank {len(dims)} ({_fmt_dims(dims)})")
    for i, (d, s) in enumerate(zip(dims, data.shape)):
        if i > 0 and d is not None and d != s:
            raise DataError(f"calibration data has shape {tuple(data.shape)}, the model input "
                            f"{inp.name!r} expects {_fmt_dims(dims)}")
    return inp.name, dims[0] if dims else None


def run_batched(session, input_name: str, data: np.ndarray, static_batch: int | None, batch_size: int,
                output_names: list[str] | None, consume: Callable[[list[np.ndarray]], None]) -> None:
    """Feed ``data`` in batches (the model's static batch when it has one; the tail is padded)."""
    bs = static_batch if static_batch else batch_size
    for start in range(0, data.shape[0], bs):
        chunk = data[start:start + bs]
        n = chunk.shape[0]
        if static_batch and n < bs:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - n, axis=0)])
        outs = session.run(output_names, {input_name: chunk})
        consume([o[:n] if (o.ndim and static_batch) else o for o in outs])


def run_model(model, data: np.ndarray, batch_size: int = 32, threads: int = 0,
              optimized: bool = True) -> list[np.ndarray]:
    """Every output of a one-input ONNX model on ``data`` (onnxruntime CPU, batched)."""
    session = open_cpu_session(model, threads, optimized)
    input_name, static_batch = single_input_plan(model, data)
    parts: list[list[np.ndarray]] = []

    def consume(outs: list[np.ndarray]) -> None:
        if not parts:
            parts.extend([] for _ in outs)
        for i, o in enumerate(outs):
            parts[i].append(o)

    run_batched(session, input_name, data, static_batch, batch_size, None, consume)
    return [np.concatenate(p) if p[0].ndim else p[0] for p in parts]


def fp32_noise_floor(model, data: np.ndarray, reference: list[np.ndarray],
                     batch_size: int = 32, threads: int = 0) -> float:
    """Relative difference between ``reference`` (``model`` on ``data``, optimised session) and the same
    model run with onnxruntime's graph optimisations off: the round-off of the graph itself (MEASURE.md).
    inf when the two runs disagree in outputs or shapes, or either is not finite."""
    other = run_model(model, data, batch_size, threads, optimized=False)
    if len(other) != len(reference) or any(a.shape != b.shape for a, b in zip(other, reference)):
        return float("inf")
    return max((relative_error(y2, y)[2] for y, y2 in zip(reference, other)), default=0.0)


class OrtRunner(Runner):
    """onnxruntime on CPU, CUDA or TensorRT EP.

    threads: intra-op threads (default: usable cores); inter_op_threads (default 1);
    include_copies: GPU providers time host<->device copies too; precision: "fp16" turns on the
    TensorRT EP's fp16 mode (for CPU/CUDA fp16 means an fp16 ONNX); device_id; trt_cache_dir: the
    TensorRT EP's engine cache (default: .ort_trt_cache beside the model).
    """

    def __init__(
        self,
        model_path: str | Path,
        backend: str = "ort-cpu",
        *,
        threads: int | None = None,
        inter_op_threads: int | None = None,
        include_copies: bool = False,
        precision: str | None = None,
        device_id: int = 0,
        trt_cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__(model_path)
        if backend not in _PROVIDERS:
            raise UsageError(f"unknown onnxruntime backend {backend!r}; choose one of {sorted(_PROVIDERS)}")
        self.backend = backend
        self.threads = int(threads or default_threads())
        self.inter_op_threads = int(inter_op_threads or 1)
        self.include_copies = bool(include_copies)
        self.precision = precision or "fp32"
        self.device_id = int(device_id or 0)
        self.trt_cache_dir = Path(trt_cache_dir) if trt_cache_dir else self.model_path.parent / ".ort_trt_cache"
        self.session = None
        self._binding = None
        self._feeds: dict[str, np.ndarray] | None = None
        if backend != "ort-cpu":
            self.timing_note = (
                "host wall clock around run(); includes host<->device copies"
                if self.include_copies
                else "host wall clock around run_with_iobinding() on device-resident inputs/outputs"
            )
        else:
            self.timing_note = "host wall clock around session.run()"

    def _provider_list(self) -> list:
        if self.backend == "ort-cpu":
            return ["CPUExecutionProvider"]
        cuda = ("CUDAExecutionProvider", {"device_id": self.device_id})
        if self.backend == "ort-cuda":
            return [cuda, "CPUExecutionProvider"]
        trt_opts = {
            "device_id": self.device_id,
            "trt_fp16_enable": self.precision == "fp16",
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(self.trt_cache_dir),
        }
        return [("TensorrtExecutionProvider", trt_opts), cuda, "CPUExecutionProvider"]

    def _load_impl(self) -> None:
        wanted, extra = _PROVIDERS[self.backend]
        ort = import_onnxruntime(extra)
        if not self.model_path.is_file():
            raise InputFileError(f"model not found: {self.model_path}")
        from egp_deploy.onnx_file import read_onnx

        read_onnx(self.model_path, load_external_data=False)  # onnxruntime folds constants when it loads
        if self.backend != "ort-cpu" and hasattr(ort, "preload_dlls"):
            try:  # CUDA/cuDNN from torch's nvidia-* wheels, when present (onnxruntime-gpu >= 1.21)
                ort.preload_dlls()
            except Exception:  # noqa: BLE001 - best effort; the provider check below decides
                pass
        try:
            self.session = self._session(self._provider_list())
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types for bad files
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if self.backend != "ort-cpu":
                try:  # the model loads on CPU: it is the GPU provider that failed, not the file
                    self._session(["CPUExecutionProvider"])
                except Exception:  # noqa: BLE001
                    pass
                else:
                    raise BackendUnavailableError(
                        f"backend {self.backend}: {wanted} failed to start ({first_words(msg, 160)}); it needs onnxruntime-gpu "
                        f"and a working CUDA GPU: pip install 'egp-deploy[{extra}]'"
                    ) from None
            raise InputFileError(f"onnxruntime cannot load {self.model_path}: {first_words(msg)}") from None
        got = self.session.get_providers()
        if wanted not in got:
            gpu = "onnxruntime-gpu with a working CUDA GPU"
            raise BackendUnavailableError(
                f"backend {self.backend}: onnxruntime did not give {wanted} (session got {got}); it needs "
                f"{gpu}: pip install 'egp-deploy[{extra}]' (uninstall the plain onnxruntime first)"
            )

    def _session(self, providers: list):
        return open_session(self.model_path, providers, threads=self.threads, inter_op_threads=self.inter_op_threads)

    def _close_impl(self) -> None:
        self.session = None
        self._binding = None
        self._feeds = None

    def input_specs(self) -> list[TensorSpec]:
        self.load()
        specs = []
        for i in self.session.get_inputs():
            dtype = _ORT_TYPES.get(i.type)
            if dtype is None:
                raise UsageError(f"input {i.name!r} has type {i.type}, not supported for benchmarking")
            shape = tuple(d if isinstance(d, int) and d > 0 else None for d in i.shape)
            specs.append(TensorSpec(i.name, shape, np.dtype(dtype)))
        return specs

    def output_names(self) -> list[str]:
        self.load()
        return [o.name for o in self.session.get_outputs()]

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        ort = import_onnxruntime()
        d.update(
            onnxruntime=ort.__version__,
            providers=self.session.get_providers() if self.session else None,
            intra_op_threads=self.threads,
            inter_op_threads=self.inter_op_threads,
            precision=self.precision,
        )
        if self.backend != "ort-cpu":
            d["include_copies"] = self.include_copies
        return d

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.load()
        self._check_feeds(feeds)
        try:
            outs = self.session.run(None, dict(feeds))
        except Exception as e:  # noqa: BLE001
            raise DataError(f"onnxruntime failed on {self.model_path.name}: {first_words(e)}") from None
        return dict(zip(self.output_names(), outs))

    def prepare(self, feeds: Mapping[str, np.ndarray]) -> None:
        self.infer(feeds)  # validates shapes once, with a clear error, outside the timed loop
        self._feeds = dict(feeds)
        if self.backend != "ort-cpu" and not self.include_copies:
            ort = import_onnxruntime("gpu")
            binding = self.session.io_binding()
            for name, arr in feeds.items():
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr, "cuda", self.device_id))
            for name in self.output_names():
                binding.bind_output(name, "cuda", self.device_id)
            self._binding = binding

    def time_once(self) -> float:
        if self._feeds is None:
            raise UsageError("prepare() must be called before time_once()")
        if self._binding is not None:
            t0 = time.perf_counter()
            self.session.run_with_iobinding(self._binding)
            self._binding.synchronize_outputs()
            return (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        self.session.run(None, self._feeds)
        return (time.perf_counter() - t0) * 1e3
