"""PyTorch eager runner for a ``model.pt`` checkpoint: the "before export" reference, CPU or CUDA.

On CUDA the timed iteration replays a CUDA graph when capture works (falls back to eager when
it does not) and is timed with CUDA events; host<->device copies are excluded unless asked for.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from egp_deploy.errors import BackendUnavailableError, DataError, UsageError, first_words
from egp_deploy.runners.base import Runner, TensorSpec

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def require_cuda(backend: str):
    """torch with a usable CUDA device, or BackendUnavailableError saying what is missing."""
    import torch

    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise BackendUnavailableError(f"backend {backend} needs a CUDA GPU: {why} (torch {torch.__version__})")
    return torch


class TorchRunner(Runner):
    """threads: CPU intra-op threads; precision: "fp16" only on CUDA; include_copies: CUDA timing
    covers host<->device copies too; cuda_graph: replay a captured CUDA graph (default True)."""

    def __init__(
        self,
        model_path: str | Path,
        backend: str = "torch-cpu",
        *,
        threads: int | None = None,
        precision: str | None = None,
        include_copies: bool = False,
        cuda_graph: bool = True,
    ) -> None:
        super().__init__(model_path)
        if backend not in ("torch-cpu", "torch-cuda"):
            raise UsageError(f"unknown torch backend {backend!r}")
        self.backend = backend
        self.device = "cuda" if backend == "torch-cuda" else "cpu"
        self.threads = threads
        self.precision = precision or "fp32"
        self.include_copies = bool(include_copies)
        self.use_cuda_graph = bool(cuda_graph) and self.device == "cuda"
        if self.precision not in ("fp32", "fp16"):
            raise UsageError(f"precision {self.precision!r}: torch runner supports fp32 and fp16")
        if self.precision == "fp16" and self.device == "cpu":
            raise UsageError("precision fp16 needs --backend torch-cuda (CPU eager runs fp32)")
        self.model = None
        self.ckpt = None
        self.graph_status = "not used"
        self._prepared = None
        if self.device == "cuda":
            self.timing_note = "CUDA events around one forward" + (
                " including host<->device copies" if self.include_copies else " (device-resident input/output)"
            )
        else:
            self.timing_note = "host wall clock around one forward (torch.inference_mode)"

    def _load_impl(self) -> None:
        import torch

        from egp_deploy.archs.references import IMPORT, is_trusted, parse_reference
        from egp_deploy.checkpoint import load_checkpoint
        from egp_deploy.errors import InputFileError

        if self.device == "cuda":
            require_cuda(self.backend)
        if self.threads:
            torch.set_num_threads(int(self.threads))
        self.ckpt = load_checkpoint(self.model_path)
        ref = parse_reference(self.ckpt.arch)
        if ref.kind == IMPORT and not is_trusted(ref):  # this backend has no --trust-module: say what to do instead
            raise InputFileError(
                f"{self.model_path} names the Python factory {ref.text!r}, which the torch backend does not import "
                "(it would run the module's code): export it with egp-export --trust-module and time the ONNX")
        model = self.ckpt.build_model().to(self.device)
        if self.precision == "fp16":
            model = model.half()
        self.model = model.eval()

    def _close_impl(self) -> None:
        self.model = None
        self._prepared = None

    def input_specs(self) -> list[TensorSpec]:
        self.load()
        dtype = np.float16 if self.precision == "fp16" else np.float32
        return [TensorSpec(INPUT_NAME, (None, *self.ckpt.input_shape), np.dtype(dtype))]

    def output_names(self) -> list[str]:
        return [OUTPUT_NAME]

    def describe(self) -> dict[str, Any]:
        import torch

        d = super().describe()
        d.update(torch=torch.__version__, device=self.device, precision=self.precision,
                 intra_op_threads=torch.get_num_threads())
        if self.device == "cuda":
            d.update(cuda_graph=self.graph_status, include_copies=self.include_copies,
                     gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
        return d

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        self.load()
        self._check_feeds(feeds)
        x = torch.from_numpy(np.ascontiguousarray(feeds[INPUT_NAME])).to(self.device)
        try:
            with torch.inference_mode():
                y = self.model(x)
        except RuntimeError as e:
            raise DataError(f"torch forward failed: {first_words(e)}") from None
        return {OUTPUT_NAME: y.float().cpu().numpy()}

    def prepare(self, feeds: Mapping[str, np.ndarray]) -> None:
        import torch

        self.infer(feeds)
        host = torch.from_numpy(np.ascontiguousarray(feeds[INPUT_NAME]))
        if self.device == "cpu":
            self._prepared = {"x": host}
            return
        host = host.pin_memory()
        x = host.to(self.device)
        stream = torch.cuda.Stream()
        state = {"host": host, "x": x, "stream": stream, "graph": None,
                 "start": torch.cuda.Event(enable_timing=True), "end": torch.cuda.Event(enable_timing=True)}
        with torch.inference_mode():
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up on the side stream, as graph capture requires
                for _ in range(3):
                    state["y"] = self.model(x)
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            self.graph_status = "eager"
            if self.use_cuda_graph:
                try:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=stream):
                        state["y"] = self.model(x)
                    graph.replay()
                    torch.cuda.synchronize()
                    state["graph"] = graph
                    self.graph_status = "captured"
                except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager
                    self.graph_status = f"eager (capture failed: {type(e).__name__})"
                    torch.cuda.synchronize()
        self._prepared = state

    def time_once(self) -> float:
        import torch

        p = self._prepared
        if p is None:
            raise UsageError("prepare() must be called before time_once()")
        if self.device == "cpu":
            with torch.inference_mode():
                t0 = time.perf_counter()
                self.model(p["x"])
                return (time.perf_counter() - t0) * 1e3
        stream = p["stream"]
        with torch.inference_mode(), torch.cuda.stream(stream):
            p["start"].record(stream)
            if self.include_copies:
                p["x"].copy_(p["host"], non_blocking=True)
            if p["graph"] is not None:
                p["graph"].replay()
            else:
                p["y"] = self.model(p["x"])
            if self.include_copies:
                p["y"].to("cpu", non_blocking=False)
            p["end"].record(stream)
        p["end"].synchronize()
        return float(p["start"].elapsed_time(p["end"]))
