"""Runner interface: ORT CPU on a tiny ONNX, torch on a tiny checkpoint, clear errors for missing backends."""

import importlib.util

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from egp_deploy.archs import create_model
from egp_deploy.checkpoint import checkpoint_from_model, save_checkpoint
from egp_deploy.errors import BackendUnavailableError, DataError, InputFileError, UnsupportedError, UsageError
from egp_deploy.runners import (
    applicable_options, get_runner, parse_shapes, random_inputs, resolve_backend, resolve_input_shapes, runner_options,
)
from egp_deploy.runners.base import TensorSpec

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def tiny_onnx(path, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path, w, b


@pytest.fixture
def onnx_model(tmp_path):
    return tiny_onnx(tmp_path / "tiny.onnx")


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    kwargs = {"num_classes": 5, "in_channels": 1, "width": 4}
    model = create_model("resnet18", **kwargs).eval()
    path = save_checkpoint(tmp_path / "tiny.pt", checkpoint_from_model(model, "resnet18", kwargs, (1, 8, 8), 5))
    return path, model


# ---------------------------------------------------------------------------- onnxruntime CPU
def test_ort_cpu_infer_matches_numpy(onnx_model):
    path, w, b = onnx_model
    x = np.random.default_rng(1).standard_normal((6, 4)).astype(np.float32)
    with get_runner("ort-cpu", path, threads=1) as r:
        assert [s.name for s in r.input_specs()] == ["x"]
        assert r.input_specs()[0].shape == (None, 4)
        assert r.output_names() == ["y"]
        y = r.infer({"x": x})["y"]
        d = r.describe()
    np.testing.assert_allclose(y, np.maximum(x @ w + b, 0), rtol=1e-5, atol=1e-6)
    assert d["intra_op_threads"] == 1 and d["providers"] == ["CPUExecutionProvider"]


def test_ort_timed_iteration(onnx_model):
    r = get_runner(None, onnx_model[0], threads=1).load()  # auto -> ort-cpu for .onnx
    assert r.backend == "ort-cpu"
    specs = r.input_specs()
    r.prepare(random_inputs(specs, resolve_input_shapes(specs, batch=2)))
    times = [r.time_once() for _ in range(5)]
    assert all(t > 0 for t in times)
    r.close()


def test_time_once_requires_prepare(onnx_model):
    r = get_runner("ort-cpu", onnx_model[0]).load()
    with pytest.raises(UsageError):
        r.time_once()


def test_ort_bad_feeds(onnx_model):
    with get_runner("ort-cpu", onnx_model[0]) as r:
        with pytest.raises(DataError, match="shape"):
            r.infer({"x": np.ones((2, 5), np.float32)})
        with pytest.raises(DataError, match="inputs"):
            r.infer({"z": np.ones((2, 4), np.float32)})


def test_ort_bad_files(tmp_path):
    with pytest.raises(InputFileError, match="not found"):
        get_runner("ort-cpu", tmp_path / "missing.onnx").load()
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf")
    with pytest.raises(InputFileError, match="not a readable ONNX model"):
        get_runner("ort-cpu", junk).load()


@pytest.mark.parametrize("backend", ["ort-cuda", "ort-trt"])
def test_ort_gpu_provider_missing_is_clear(onnx_model, backend):
    try:
        r = get_runner(backend, onnx_model[0]).load()
    except BackendUnavailableError as e:
        assert "egp-deploy[gpu]" in str(e) and backend in str(e)
    else:  # a real GPU machine: the provider really is in the session
        assert r.session.get_providers()[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")


# ---------------------------------------------------------------------------- torch
def test_torch_runner_matches_eager(checkpoint):
    path, model = checkpoint
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    with get_runner(None, path) as r:  # auto -> torch-cpu for .pt
        assert r.backend == "torch-cpu"
        spec = r.input_specs()[0]
        assert spec.shape == (None, 1, 8, 8)
        y = r.infer({spec.name: x})[r.output_names()[0]]
        r.prepare({spec.name: x})
        assert r.time_once() > 0
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_torch_runner_errors(checkpoint, tmp_path):
    path, _ = checkpoint
    with pytest.raises(UsageError, match="fp16"):
        get_runner("torch-cpu", path, precision="fp16")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"nope")
    with pytest.raises(InputFileError):
        get_runner("torch-cpu", bad).load()
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="CUDA"):
            get_runner("torch-cuda", path).load()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_cuda_graph_runner(checkpoint):
    path, model = checkpoint
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    with get_runner("torch-cuda", path) as r:
        y = r.infer({"input": x})["logits"]
        r.prepare({"input": x})
        assert r.time_once() > 0
        assert r.describe()["cuda_graph"].startswith(("captured", "eager"))
    with torch.no_grad():
        np.testing.assert_allclose(y, model(torch.from_numpy(x)).numpy(), rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------- TensorRT missing
@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_trt_missing_names_the_extra(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"\0" * 64)
    with pytest.raises(BackendUnavailableError, match=r"egp-deploy\[tensorrt-cu12\]"):
        get_runner(None, engine).load()


# ---------------------------------------------------------------------------- backend / shape resolution
def test_resolve_backend():
    assert resolve_backend("auto", "m.onnx") == "ort-cpu"
    assert resolve_backend(None, "m.engine") == "trt"
    assert resolve_backend(None, "m.plan") == "trt"
    assert resolve_backend("auto", "m.pt") == "torch-cpu"
    assert resolve_backend("ort-cuda", "m.onnx") == "ort-cuda"
    for backend, path in [("trt", "m.onnx"), ("torch-cpu", "m.onnx"), ("ort-cpu", "m.engine"), ("tvm", "m.onnx")]:
        with pytest.raises(UsageError):
            resolve_backend(backend, path)


def test_resolve_input_shapes():
    specs = [TensorSpec("x", (None, 3, 8, 8), np.dtype(np.float32))]
    assert resolve_input_shapes(specs) == {"x": (1, 3, 8, 8)}
    assert resolve_input_shapes(specs, batch=4) == {"x": (4, 3, 8, 8)}
    assert resolve_input_shapes(specs, shapes=parse_shapes("x:2x3x8x8")) == {"x": (2, 3, 8, 8)}
    with pytest.raises(UsageError, match="wrong shape"):
        resolve_input_shapes(specs, shapes=parse_shapes("x:2x1x8x8"))
    with pytest.raises(UsageError, match="inputs"):
        resolve_input_shapes(specs, shapes=parse_shapes("y:2x3x8x8"))
    static = [TensorSpec("x", (1, 3), np.dtype(np.float32))]
    with pytest.raises(UsageError, match="static batch"):
        resolve_input_shapes(static, batch=8)
    dyn = [TensorSpec("t", (None, None), np.dtype(np.int64))]
    with pytest.raises(UsageError, match="--shapes t:"):
        resolve_input_shapes(dyn)


def test_runner_reloads_after_close(onnx_model):
    r = get_runner("ort-cpu", onnx_model[0]).load()
    r.close()
    assert r.input_specs()[0].name == "x"  # loads again on demand
    r.close()


# ---------------------------------------------------------------------------- typed options
@pytest.mark.parametrize("backend, suffix", [("ort-cpu", ".onnx"), ("torch-cpu", ".pt"), ("trt", ".engine")])
def test_unknown_runner_option_is_refused(tmp_path, backend, suffix):
    path = tmp_path / f"m{suffix}"  # never opened: the option check comes before any work
    with pytest.raises(UsageError) as err:
        get_runner(backend, path, thread=2)  # a typo of "threads" (or an option this backend lacks)
    line = str(err.value)
    assert "\n" not in line and "'thread'" in line and backend in line
    assert all(name in line for name in runner_options(backend))
    assert not path.exists()


def test_trt_runner_refuses_cpu_options_but_shared_settings_filter(tmp_path):
    engine = tmp_path / "m.engine"
    with pytest.raises(UsageError, match="no option 'threads'"):
        get_runner("trt", engine, threads=2)
    # bench/compare settings shared by every backend: only what the backend takes is passed on
    assert applicable_options("trt", engine, threads=2, precision="fp16", include_copies=True) == {"include_copies": True}
    assert applicable_options(None, tmp_path / "m.onnx", threads=2, precision="fp16") == {"threads": 2, "precision": "fp16"}


def test_runner_options_are_typed_and_none_means_default(onnx_model):
    assert set(runner_options("ort-cpu")) >= {"threads", "inter_op_threads", "include_copies", "precision"}
    assert "threads" not in runner_options("trt")
    r = get_runner("ort-cpu", onnx_model[0], threads=None, inter_op_threads=None)
    assert r.threads >= 1 and r.inter_op_threads == 1
    assert not r.is_loaded
    r.close()  # closing a runner that never loaded is a no-op
    with r:
        assert r.is_loaded
    assert not r.is_loaded


def test_failed_load_leaves_runner_unloaded(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx")
    r = get_runner("ort-cpu", junk)
    with pytest.raises(InputFileError):
        r.load()
    assert not r.is_loaded and r.session is None


# ---------------------------------------------------------------------------- layering
def _imported_modules(path):
    import ast

    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):  # function-level imports count too
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_dependencies_point_one_way():
    from pathlib import Path

    import egp_deploy

    pkg = Path(egp_deploy.__file__).parent
    export_imports = _imported_modules(pkg / "export.py")
    assert not any(m.startswith("egp_deploy.surgery") for m in export_imports), export_imports
    for f in (pkg / "runners").glob("*.py"):
        bad = {m for m in _imported_modules(f) if m.startswith(("egp_deploy.build", "egp_deploy.surgery"))}
        assert not bad, (f.name, bad)


def test_one_place_opens_onnxruntime_sessions():
    from pathlib import Path

    import egp_deploy

    pkg = Path(egp_deploy.__file__).parent
    openers = sorted(str(f.relative_to(pkg)) for f in pkg.rglob("*.py") if "InferenceSession(" in f.read_text())
    assert openers == ["runners/ort.py"], openers


def test_cpu_session_options_and_noise_floor(onnx_model):
    from egp_deploy.runners.ort import fp32_noise_floor, open_cpu_session, run_model

    path, w, b = onnx_model
    model = onnx.load(str(path))
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    for source in (model, model.SerializeToString(), path):
        assert open_cpu_session(source, threads=1).get_inputs()[0].name == "x"
    (y,) = run_model(model, x, batch_size=2, threads=1)
    np.testing.assert_allclose(y, np.maximum(x @ w + b, 0), rtol=1e-5, atol=1e-6)
    assert fp32_noise_floor(model, x, [y], batch_size=2, threads=1) < 1e-6
    assert fp32_noise_floor(model, x, [y[:3]], batch_size=2) == float("inf")  # shape changed
    with pytest.raises(UnsupportedError, match="onnxruntime cannot run this model"):
        open_cpu_session(b"not onnx")
