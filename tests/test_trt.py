"""TensorRT: what can be tested without it for real (shapes, profiles, typing rules per version,
sidecar validation, the builder's call sequence against a recording double of the TensorRT API),
plus real engine tests that skip cleanly where `import tensorrt` fails or no GPU is present."""

import importlib.util
import json
import sys
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from egp_deploy import build
from egp_deploy.build import (
    layers_path, make_sidecar, network_typing, onnx_inputs, plan_profiles, read_sidecar, sidecar_path,
    validate_sidecar,
)
from egp_deploy.errors import BackendUnavailableError, DataError, InputFileError, UnsupportedError, UsageError
from egp_deploy.io_utils import write_json_atomic
from egp_deploy.runners import parse_shapes

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def gemm_onnx(path, dtype=np.float32, batch="N"):
    rng = np.random.default_rng(0)
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["y"])], "g",
        [helper.make_tensor_value_info("x", elem, [batch, 4])],
        [helper.make_tensor_value_info("y", elem, [batch, 3])],
        [numpy_helper.from_array(rng.standard_normal((4, 3)).astype(dtype), "W"),
         numpy_helper.from_array(rng.standard_normal(3).astype(dtype), "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------------------- --shapes
def test_parse_shapes_single_and_triple():
    assert parse_shapes("x:1x3x32x32") == {"x": ((1, 3, 32, 32),) * 3}
    got = parse_shapes("images:1x3x8x8/4x3x8x8/16x3x8x8, mask:1x5")
    assert got["images"] == ((1, 3, 8, 8), (4, 3, 8, 8), (16, 3, 8, 8))
    assert got["mask"] == ((1, 5),) * 3
    assert parse_shapes("input:0:2x2") == {"input:0": ((2, 2),) * 3}  # split at the last colon
    assert parse_shapes(["a:1", "b:2"]) == {"a": ((1,),) * 3, "b": ((2,),) * 3}
    assert parse_shapes(None) == {}


@pytest.mark.parametrize("bad", ["x", "x:", ":1x2", "x:1x0", "x:1xa", "x:1/2", "x:4/2/8", "x:1x2/1x2x3/1x2",
                                 "x:1,x:2"])
def test_parse_shapes_rejects(bad):
    with pytest.raises(UsageError):
        parse_shapes(bad)


# ---------------------------------------------------------------------------- profiles
def test_plan_profiles():
    inputs = [("x", (None, 3, 8, 8))]
    assert plan_profiles(inputs, None) == {"x": ((1, 3, 8, 8),) * 3}  # dynamic batch alone -> 1
    tri = parse_shapes("x:1x3x8x8/4x3x8x8/8x3x8x8")
    assert plan_profiles(inputs, tri) == tri
    assert plan_profiles([("x", (2, 3))], None) == {}  # static: no profile needed
    with pytest.raises(UsageError, match="wrong shape"):
        plan_profiles(inputs, parse_shapes("x:1x1x8x8"))
    with pytest.raises(UsageError, match="inputs are"):
        plan_profiles(inputs, parse_shapes("z:1x3x8x8"))
    with pytest.raises(UsageError, match="--shapes t:MIN/OPT/MAX"):
        plan_profiles([("t", (None, None))], None)


def test_onnx_inputs_reads_dynamic_dims_and_fp16(tmp_path):
    assert onnx_inputs(gemm_onnx(tmp_path / "a.onnx")) == ([("x", (None, 4))], False)
    assert onnx_inputs(gemm_onnx(tmp_path / "h.onnx", np.float16, batch=2)) == ([("x", (2, 4))], True)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\xfe not onnx")
    with pytest.raises(InputFileError):
        onnx_inputs(junk)
    with pytest.raises(InputFileError, match="not found"):
        onnx_inputs(tmp_path / "missing.onnx")


# ---------------------------------------------------------------------------- typing per version
@pytest.mark.parametrize(
    "version, precision, fp16_onnx, expected",
    [
        ("10.3.0", "fp32", False, (False, False)),
        ("10.3.0", "fp16", False, (False, True)),   # weakly typed + FP16 builder flag
        ("10.3.0", "fp16", True, (True, False)),    # the ONNX's own fp16 types
        ("11.0.0", "fp32", False, (True, False)),   # always strongly typed
        ("11.0.0", "fp16", True, (True, False)),
    ],
)
def test_network_typing(version, precision, fp16_onnx, expected):
    assert network_typing(version, precision, fp16_onnx) == expected


def test_network_typing_refusals():
    with pytest.raises(UnsupportedError, match="fp16 ONNX"):
        network_typing("11.1.0", "fp16", False)
    with pytest.raises(UnsupportedError, match="too old"):
        network_typing("8.6.1", "fp32", False)
    with pytest.raises(UsageError):
        network_typing("10.3.0", "int8", False)
    with pytest.raises(UsageError, match="--precision fp16"):
        network_typing("10.3.0", "fp32", True)


# ---------------------------------------------------------------------------- sidecar
def sidecar(**over):
    sc = make_sidecar(
        trt_version="10.3.0", gpu={"name": "Orin", "compute_capability": "8.7", "driver": None},
        precision="fp16", onnx_path="m.onnx", onnx_sha256="a" * 64, engine_sha256="b" * 64,
        profiles={"x": ((1, 4), (2, 4), (8, 4))}, strongly_typed=False, workspace_mib=256,
    )
    sc.update(over)
    return sc


def test_sidecar_accepts_same_machine():
    validate_sidecar(sidecar(), trt_version="10.3.0", gpu_name="Orin", compute_capability="8.7",
                     engine_sha256="b" * 64)
    # fields this machine cannot determine are not held against the engine
    validate_sidecar(sidecar(), trt_version="10.3.0", gpu_name=None, compute_capability=None)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(trt_version="10.4.0", gpu_name="Orin", compute_capability="8.7"), "TensorRT 10.3.0.*TensorRT 10.4.0"),
        (dict(trt_version="10.3.0", gpu_name="NVIDIA H100", compute_capability="9.0"), "compute capability 8.7"),
        (dict(trt_version="10.3.0", gpu_name="Other", compute_capability="8.7"), "built for GPU 'Orin'"),
        (dict(trt_version="10.3.0", gpu_name="Orin", compute_capability="8.7", engine_sha256="c" * 64), "sha256"),
    ],
)
def test_sidecar_refuses_other_version_or_gpu(kwargs, match):
    with pytest.raises(InputFileError, match=match) as info:
        validate_sidecar(sidecar(), engine_path="m.engine", **kwargs)
    assert "\n" not in str(info.value) and "egp-build" in str(info.value)


def test_sidecar_roundtrip_and_bad_files(tmp_path):
    engine = tmp_path / "m.engine"
    assert read_sidecar(engine) is None
    write_json_atomic(sidecar_path(engine), sidecar())
    got = read_sidecar(engine)
    assert got["tensorrt_version"] == "10.3.0" and got["profiles"]["x"]["opt"] == [2, 4]
    sidecar_path(engine).write_text("{broken")
    with pytest.raises(InputFileError, match="not readable JSON"):
        read_sidecar(engine)
    sidecar_path(engine).write_text("[" * 100_000 + "]" * 100_000)  # nesting deeper than the parser's stack
    with pytest.raises(InputFileError, match="nested too deeply"):
        read_sidecar(engine)
    sidecar_path(engine).write_bytes(b" " * (2 << 20))  # a sidecar is a few hundred bytes: never read whole
    with pytest.raises(InputFileError, match="engine sidecar"):
        read_sidecar(engine)
    sidecar_path(engine).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(InputFileError, match="not an egp-deploy engine sidecar"):
        read_sidecar(engine)


# ---------------------------------------------------------------------------- builder call sequence
def fake_tensorrt(version, calls, build_ok=True):
    """A recording double of the TensorRT Python API subset build_engine uses (names as in NVIDIA's
    docs for 10.x; 11.x drops BuilderFlag.FP16/TF32). It checks OUR version logic and file
    handling; the real API is exercised by the GPU tests below where TensorRT is installed."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    major = int(version.split(".")[0])
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", TF32="TF32") if major < 11 else types.SimpleNamespace()
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.ProfilingVerbosity = types.SimpleNamespace(DETAILED="DETAILED")
    trt.LayerInformationFormat = types.SimpleNamespace(JSON="JSON")

    class ILogger:
        Severity = types.SimpleNamespace(ERROR=1)

        def __init__(self):
            pass

    trt.ILogger = ILogger

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return self.data + b"+tuned"

    class Config:
        def __init__(self):
            self.cache = None

        def set_memory_pool_limit(self, pool, size):
            calls.append(("workspace", size))

        def set_flag(self, flag):
            calls.append(("set_flag", flag))

        def clear_flag(self, flag):
            calls.append(("clear_flag", flag))

        def add_optimization_profile(self, profile):
            calls.append(("profile", dict(profile.shapes)))

        def create_timing_cache(self, data):
            calls.append(("cache_in", bytes(data)))
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("network_flags", flags))
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"ENGINE-BYTES" if build_ok else None

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls.append(("parse", path))
            return True

    class Inspector:
        def get_engine_information(self, fmt):
            return json.dumps({"Layers": [{"Name": "gemm"}, {"Name": "bias"}]})

    class Engine:
        def create_engine_inspector(self):
            return Inspector()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            assert data == b"ENGINE-BYTES"
            return Engine()

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt


@pytest.mark.parametrize("version", ["10.3.0", "11.0.0"])
def test_build_engine_with_recording_double(tmp_path, monkeypatch, version):
    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version, calls))
    monkeypatch.setattr(build, "gpu_identity", lambda: {"name": "GPU-X", "compute_capability": "8.9", "driver": "1"})
    onnx_path = gemm_onnx(tmp_path / "m.onnx")
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    result = build.build_engine(onnx_path, tmp_path / "m.engine", precision="fp32", workspace_mib=64,
                                shapes=parse_shapes("x:1x4/2x4/8x4"), timing_cache=cache)
    assert (tmp_path / "m.engine").read_bytes() == b"ENGINE-BYTES"
    assert cache.read_bytes() == b"old+tuned" and ("cache_in", b"old") in calls
    assert ("workspace", 64 << 20) in calls
    assert ("profile", {"x": ((1, 4), (2, 4), (8, 4))}) in calls
    strongly = version.startswith("11")
    assert ("network_flags", 2 if strongly else 0) in calls  # 1 << STRONGLY_TYPED
    assert (("clear_flag", "TF32") in calls) is (not strongly)  # fp32 means fp32 where the flag exists
    assert not any(c[0] == "set_flag" for c in calls)
    sc = read_sidecar(result.engine_path)
    assert sc["tensorrt_version"] == version and sc["gpu_name"] == "GPU-X" and sc["strongly_typed"] is strongly
    assert sc["source_onnx_sha256"] == build.sha256_file(onnx_path)
    assert json.loads(layers_path(result.engine_path).read_text())["num_layers"] == 2
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_build_fp16_flag_only_on_trt10(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.3.0", calls))
    monkeypatch.setattr(build, "gpu_identity", lambda: {"name": None, "compute_capability": None, "driver": None})
    build.build_engine(gemm_onnx(tmp_path / "m.onnx"), precision="fp16", write_layers=False)
    assert ("set_flag", "FP16") in calls and ("network_flags", 0) in calls
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("11.0.0", []))
    with pytest.raises(UnsupportedError, match="strongly typed"):
        build.build_engine(gemm_onnx(tmp_path / "m2.onnx"), precision="fp16")


def test_failed_build_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.3.0", [], build_ok=False))
    monkeypatch.setattr(build, "gpu_identity", lambda: {"name": None, "compute_capability": None, "driver": None})
    with pytest.raises(UnsupportedError, match="could not build"):
        build.build_engine(gemm_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists() and not sidecar_path(tmp_path / "m.engine").exists()


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed")
def test_build_without_tensorrt_names_the_extra(tmp_path):
    with pytest.raises(BackendUnavailableError, match=r"egp-deploy\[tensorrt-cu12\]"):
        build.build_engine(gemm_onnx(tmp_path / "m.onnx"))


# ---------------------------------------------------------------------------- real TensorRT (GPU machines)
def _gpu_ready():
    if not HAS_TRT:
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


needs_trt = pytest.mark.skipif(not _gpu_ready(), reason="needs tensorrt and a CUDA GPU with torch")


@needs_trt
def test_real_engine_build_compare_and_time(tmp_path):
    from egp_deploy.compare import compare_models
    from egp_deploy.runners import get_runner

    onnx_path = gemm_onnx(tmp_path / "m.onnx")
    result = build.build_engine(onnx_path, tmp_path / "m.engine", shapes=parse_shapes("x:1x4/4x4/8x4"),
                                timing_cache=tmp_path / "t.cache")
    assert result.sidecar["precision"] == "fp32" and (tmp_path / "t.cache").stat().st_size > 0
    r = compare_models(result.engine_path, onnx_path, precision="fp32", batch=4)
    assert r.passed, r.message
    with get_runner("trt", result.engine_path) as runner:
        runner.prepare({"x": np.ones((2, 4), np.float32)})
        assert runner.time_once() > 0
        with pytest.raises(DataError, match="profile"):
            runner.prepare({"x": np.ones((16, 4), np.float32)})  # outside the profile


@needs_trt
def test_real_engine_refused_with_other_version_sidecar(tmp_path):
    from egp_deploy.runners import get_runner

    result = build.build_engine(gemm_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine", write_layers=False)
    sc = read_sidecar(result.engine_path)
    sc["tensorrt_version"] = "9.9.9"
    write_json_atomic(sidecar_path(result.engine_path), sc)
    with pytest.raises(InputFileError, match="9.9.9"):
        get_runner("trt", result.engine_path).load()
