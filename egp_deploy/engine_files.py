"""TensorRT engine files and the environment they belong to: the sidecar JSON written next to each
engine (format, TensorRT version, GPU, hashes) and the probes that fill it (TensorRT import, GPU
identity). Below both build (which writes engines) and the TRT runner (which refuses a mismatched one).
"""

from __future__ import annotations

import datetime as _dt
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from egp_deploy.errors import BackendUnavailableError, InputFileError, UnsupportedError

if TYPE_CHECKING:  # annotation only: runners import this module
    from egp_deploy.runners.base import ShapeTriple

SIDECAR_FORMAT = "egp-deploy-engine"
SIDECAR_VERSION = 1
PRECISIONS = ("fp32", "fp16")


# ------------------------------------------------------------------------------------------
# Environment probes (no TensorRT needed)
# ------------------------------------------------------------------------------------------
def import_tensorrt():
    """``tensorrt`` or BackendUnavailableError naming the extra to install."""
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError:
        raise BackendUnavailableError(
            "TensorRT is not installed: pip install 'egp-deploy[tensorrt-cu12]' (or [tensorrt-cu13], matching the CUDA major of the driver) on a machine with an NVIDIA GPU "
            "(on Jetson use the JetPack python3-libnvinfer package)"
        ) from None
    return trt


def trt_major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise UnsupportedError(f"cannot read TensorRT version {version!r}") from None


def gpu_identity() -> dict[str, Any]:
    """{"name", "compute_capability" ("8.7"), "driver"}; values are None where nothing can tell."""
    ident: dict[str, Any] = {"name": None, "compute_capability": None, "driver": None}
    try:
        import torch

        if torch.cuda.is_available():
            ident["name"] = torch.cuda.get_device_name()
            ident["compute_capability"] = "%d.%d" % torch.cuda.get_device_capability()
    except Exception:  # noqa: BLE001 - probing only
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout.strip().splitlines()
            if out:
                name, cc, driver = (p.strip() for p in (out[0].split(",") + ["", ""])[:3])
                ident["name"] = ident["name"] or name or None
                ident["compute_capability"] = ident["compute_capability"] or cc or None
                ident["driver"] = driver or None
        except (OSError, subprocess.SubprocessError):
            pass
    return ident


# ------------------------------------------------------------------------------------------
# Sidecar
# ------------------------------------------------------------------------------------------
def sidecar_path(engine_path: str | Path) -> Path:
    return Path(str(engine_path) + ".json")


def layers_path(engine_path: str | Path) -> Path:
    return Path(str(engine_path) + ".layers.json")


def make_sidecar(
    *, trt_version: str, gpu: Mapping[str, Any], precision: str, onnx_path: str | Path,
    onnx_sha256: str, engine_sha256: str, profiles: Mapping[str, ShapeTriple] | None,
    strongly_typed: bool, workspace_mib: int | None,
) -> dict[str, Any]:
    return {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "tensorrt_version": str(trt_version),
        "gpu_name": gpu.get("name"),
        "compute_capability": gpu.get("compute_capability"),
        "driver": gpu.get("driver"),
        "precision": precision,
        "strongly_typed": bool(strongly_typed),
        "workspace_mib": workspace_mib,
        "profiles": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in (profiles or {}).items()},
        "source_onnx": str(onnx_path),
        "source_onnx_sha256": onnx_sha256,
        "engine_sha256": engine_sha256,
        "built_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def read_sidecar(engine_path: str | Path) -> dict[str, Any] | None:
    """The engine's sidecar, None when there is none; InputFileError when it is unreadable."""
    path = sidecar_path(engine_path)
    if not path.is_file():
        return None
    from egp_deploy.io_utils import read_json_file

    data = read_json_file(path, "engine sidecar", max_bytes=1 << 20)  # a sidecar is a few hundred bytes
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        raise InputFileError(f"{path} is not an egp-deploy engine sidecar (no 'format': '{SIDECAR_FORMAT}')")
    return data


def validate_sidecar(
    sidecar: Mapping[str, Any], *, trt_version: str, gpu_name: str | None, compute_capability: str | None,
    engine_path: str | Path = "engine", engine_sha256: str | None = None,
) -> None:
    """Refuse (InputFileError, one line) an engine built by another TensorRT or for another GPU.

    TensorRT engines are tied to the exact TensorRT version and the GPU model they were built
    for; deserialising elsewhere fails with an obscure error or, worse, runs wrong tactics.
    A field this machine cannot determine (None) is not held against the engine.
    """
    name = Path(engine_path).name
    built_trt = str(sidecar.get("tensorrt_version"))
    if built_trt != str(trt_version):
        raise InputFileError(
            f"{name} was built with TensorRT {built_trt}, this machine has TensorRT {trt_version}: "
            "rebuild it here with egp-build"
        )
    built_cc, built_gpu = sidecar.get("compute_capability"), sidecar.get("gpu_name")
    if built_cc and compute_capability and str(built_cc) != str(compute_capability):
        raise InputFileError(
            f"{name} was built for {built_gpu} (compute capability {built_cc}), this GPU is {gpu_name} "
            f"(compute capability {compute_capability}): rebuild it on this device with egp-build"
        )
    if built_gpu and gpu_name and str(built_gpu) != str(gpu_name):
        raise InputFileError(
            f"{name} was built for GPU {built_gpu!r}, this GPU is {gpu_name!r}: rebuild it on this device with egp-build"
        )
    if engine_sha256 and sidecar.get("engine_sha256") and sidecar["engine_sha256"] != engine_sha256:
        raise InputFileError(f"{name} does not match its sidecar (engine sha256 differs): rebuild it with egp-build")
