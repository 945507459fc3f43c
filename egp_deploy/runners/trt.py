"""Native TensorRT runner (TensorRT 10 / 11): deserialise an engine and run it.

Device buffers are torch CUDA tensors (no pycuda): ``set_tensor_address`` + ``execute_async_v3``
on a torch stream, timed with CUDA events; the enqueue is captured into a CUDA graph when the
engine allows it and falls back to plain enqueue otherwise. We do not use Polygraphy's
TrtRunner here because it allocates through its own CUDA wrapper and times on the host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from egp_deploy.engine_files import gpu_identity, import_tensorrt, read_sidecar, validate_sidecar
from egp_deploy.errors import DataError, InputFileError, UsageError
from egp_deploy.io_utils import sha256_file
from egp_deploy.runners.base import Runner, TensorSpec
from egp_deploy.runners.torch_runner import require_cuda


def _np_dtype(trt, dt) -> np.dtype:
    try:
        return np.dtype(trt.nptype(dt))
    except TypeError:
        raise UsageError(f"engine tensor dtype {dt} has no numpy equivalent") from None


class TrtRunner(Runner):
    """include_copies: time H2D/D2H copies too; cuda_graph: capture the enqueue (default True);
    check_sidecar: refuse engines from another TensorRT version or GPU (default True)."""

    backend = "trt"

    def __init__(
        self,
        model_path: str | Path,
        backend: str = "trt",
        *,
        include_copies: bool = False,
        cuda_graph: bool = True,
        check_sidecar: bool = True,
    ) -> None:
        super().__init__(model_path)
        if backend != "trt":
            raise UsageError(f"unknown TensorRT backend {backend!r}")
        self.include_copies = bool(include_copies)
        self.use_cuda_graph = bool(cuda_graph)
        self.check_sidecar = bool(check_sidecar)
        self.graph_status = "not used"
        self.sidecar: dict[str, Any] | None = None
        self._state: dict[str, Any] | None = None
        self.timing_note = "CUDA events around the enqueue" + (
            " including host<->device copies" if self.include_copies else " (copies excluded, trtexec default)"
        )

    def _load_impl(self) -> None:
        trt = import_tensorrt()
        torch = require_cuda(self.backend)
        path = self.model_path
        if not path.is_file():
            raise InputFileError(f"engine not found: {path}")
        if path.suffix.lower() == ".onnx":
            raise InputFileError(f"{path} is an ONNX model, not an engine: build one with `egp-build {path}`")
        self.sidecar = read_sidecar(path)
        if self.check_sidecar and self.sidecar is not None:
            gpu = gpu_identity()
            validate_sidecar(
                self.sidecar, trt_version=trt.__version__, gpu_name=gpu["name"],
                compute_capability=gpu["compute_capability"], engine_path=path, engine_sha256=sha256_file(path),
            )
        self._trt, self._torch = trt, torch
        self._logger = trt.Logger(trt.Logger.ERROR)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise InputFileError(
                f"{path} is not a TensorRT engine this TensorRT ({trt.__version__}) can load "
                "(another file type, another TensorRT version, or another GPU)"
            )
        self.engine = engine
        self.context = engine.create_execution_context()
        self._io = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in self._io if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in self._io if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def _close_impl(self) -> None:
        self._state = None
        for attr in ("context", "engine"):  # the context must go before its engine
            if hasattr(self, attr):
                delattr(self, attr)

    def input_specs(self) -> list[TensorSpec]:
        self.load()
        return [
            TensorSpec(n, tuple(d if d >= 0 else None for d in self.engine.get_tensor_shape(n)),
                       _np_dtype(self._trt, self.engine.get_tensor_dtype(n)))
            for n in self._inputs
        ]

    def output_names(self) -> list[str]:
        self.load()
        return list(self._outputs)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(tensorrt=self._trt.__version__ if self._loaded else None, cuda_graph=self.graph_status,
                 include_copies=self.include_copies,
                 precision=(self.sidecar or {}).get("precision", "unknown (no sidecar)"))
        return d

    # -- buffers --------------------------------------------------------------------------
    def _bind(self, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
        torch = self._torch
        self._check_feeds(feeds)
        state: dict[str, Any] = {"host_in": {}, "dev": {}, "host_out": {}}
        for name in self._inputs:
            arr = np.ascontiguousarray(feeds[name])
            if not self.context.set_input_shape(name, tuple(arr.shape)):
                raise DataError(f"engine {self.model_path.name} rejects shape {list(arr.shape)} for input {name!r} "
                                "(outside its optimisation profile?)")
            host = torch.from_numpy(arr).pin_memory()
            dev = host.to("cuda")
            state["host_in"][name], state["dev"][name] = host, dev
        for name in self._outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise DataError(f"engine output {name!r} has unresolved shape {list(shape)}")
            dtype = torch.from_numpy(np.empty(0, _np_dtype(self._trt, self.engine.get_tensor_dtype(name)))).dtype
            dev = torch.empty(shape, dtype=dtype, device="cuda")
            state["dev"][name] = dev
            state["host_out"][name] = torch.empty(shape, dtype=dtype).pin_memory()
        for name, t in state["dev"].items():
            if not self.context.set_tensor_address(name, t.data_ptr()):
                raise DataError(f"TensorRT refused the buffer for tensor {name!r}")
        state["stream"] = torch.cuda.Stream()
        state["start"] = torch.cuda.Event(enable_timing=True)
        state["end"] = torch.cuda.Event(enable_timing=True)
        state["graph"] = None
        return state

    def _enqueue(self, state: dict[str, Any]) -> None:
        if not self.context.execute_async_v3(state["stream"].cuda_stream):
            raise DataError(f"TensorRT execute_async_v3 failed on {self.model_path.name}")

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.load()
        state = self._bind(feeds)
        self._enqueue(state)
        state["stream"].synchronize()
        return {n: state["dev"][n].cpu().numpy() for n in self._outputs}

    def prepare(self, feeds: Mapping[str, np.ndarray]) -> None:
        torch = self._torch
        self.load()
        state = self._bind(feeds)
        # one plain enqueue first: TensorRT updates shape-dependent state outside graph capture
        self._enqueue(state)
        state["stream"].synchronize()
        self.graph_status = "enqueue"
        if self.use_cuda_graph:
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=state["stream"]):
                    self._enqueue(state)
                graph.replay()
                torch.cuda.synchronize()
                state["graph"] = graph
                self.graph_status = "captured"
            except Exception as e:  # noqa: BLE001 - any capture failure falls back to plain enqueue
                torch.cuda.synchronize()
                self.graph_status = f"enqueue (graph capture failed: {type(e).__name__})"
        self._state = state

    def time_once(self) -> float:
        s = self._state
        if s is None:
            raise UsageError("prepare() must be called before time_once()")
        torch, stream = self._torch, s["stream"]
        with torch.cuda.stream(stream):
            s["start"].record(stream)
            if self.include_copies:
                for n, host in s["host_in"].items():
                    s["dev"][n].copy_(host, non_blocking=True)
            if s["graph"] is not None:
                s["graph"].replay()
            else:
                self._enqueue(s)
            if self.include_copies:
                for n, host in s["host_out"].items():
                    host.copy_(s["dev"][n], non_blocking=True)
            s["end"].record(stream)
        s["end"].synchronize()
        return float(s["start"].elapsed_time(s["end"]))
