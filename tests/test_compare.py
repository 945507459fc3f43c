"""Accuracy comparison against onnxruntime CPU: verdicts, minimum passing tolerance, NaN."""

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from egp_deploy.archs import create_model
from egp_deploy.checkpoint import checkpoint_from_model, save_checkpoint
from egp_deploy.compare import DEFAULT_TOLERANCES, compare_models, compare_outputs, relative_error
from egp_deploy.errors import UsageError


def gemm_onnx(path, w, b, out_name="y"):
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], [out_name])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[0]])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", w.shape[1]])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


@pytest.fixture
def weights():
    rng = np.random.default_rng(0)
    return rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)


def test_same_model_passes_exact(tmp_path, weights):
    ref = gemm_onnx(tmp_path / "ref.onnx", *weights)
    r = compare_models(ref, ref, precision="exact", batches=2, batch=3)
    assert r.passed and r.min_passing_tolerance == 0.0 and r.tolerance == DEFAULT_TOLERANCES["exact"]
    assert r.outputs[0].shape == [6, 4] and r.outputs[0].top1_agreement == 1.0


def test_perturbed_model_min_passing_tolerance(tmp_path, weights):
    w, b = weights
    ref = gemm_onnx(tmp_path / "ref.onnx", w, b)
    w2 = w.copy()
    w2[0, 0] += 0.05
    other = gemm_onnx(tmp_path / "other.onnx", w2, b)
    r = compare_models(other, ref, precision="fp32", batches=1, batch=5, seed=7)
    # the same random batch, by hand
    x = np.random.default_rng(7).standard_normal((5, 6), dtype=np.float32)
    y_ref, y = x @ w + b, x @ w2 + b
    expected = np.max(np.abs(y - y_ref)) / np.max(np.abs(y_ref))
    assert r.min_passing_tolerance == pytest.approx(expected, rel=1e-4)
    assert r.passed == bool(expected <= DEFAULT_TOLERANCES["fp32"])
    assert not compare_models(other, ref, tolerance=expected * 0.9, batches=1, batch=5, seed=7).passed
    assert compare_models(other, ref, tolerance=expected * 1.1, batches=1, batch=5, seed=7).passed


def test_nan_never_passes():
    ref = [{"y": np.ones((2, 3), np.float32)}]
    out = [{"y": np.array([[1, np.nan, 1], [1, 1, 1]], np.float32)}]
    r = compare_outputs(out, ref, tolerance=1e30)
    assert not r.passed and math.isinf(r.min_passing_tolerance) and "non-finite" in r.message
    assert not r.outputs[0].finite


def test_relative_error_cases():
    assert relative_error(np.array([1.0, 2.0]), np.array([1.0, 4.0]))[2] == pytest.approx(0.5)
    # all-zero reference: absolute error is used, so any output other than zero is an error
    assert relative_error(np.array([0.0, 0.25]), np.zeros(2))[2] == 0.25
    with pytest.raises(UsageError, match="shapes differ"):
        relative_error(np.zeros(2), np.zeros(3))


def test_top1_agreement_and_renamed_outputs():
    ref = [{"logits": np.array([[0.0, 1.0], [1.0, 0.0], [0.2, 0.1]])}]
    out = [{"output_0": np.array([[0.0, 1.0], [0.0, 1.0], [0.2, 0.1]])}]  # paired by position
    r = compare_outputs(out, ref, tolerance=10)
    assert r.outputs[0].top1_agreement == pytest.approx(2 / 3)


def test_tolerance_validation():
    ref = [{"y": np.ones(2)}]
    with pytest.raises(UsageError):
        compare_outputs(ref, ref, precision="int3")
    with pytest.raises(UsageError):
        compare_outputs(ref, ref, tolerance=-1.0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter is the fast one for a test
def test_torch_checkpoint_against_its_onnx(tmp_path):
    torch.manual_seed(0)
    kwargs = {"num_classes": 4, "in_channels": 1, "width": 4}
    model = create_model("resnet18", **kwargs).eval()
    ckpt = save_checkpoint(tmp_path / "m.pt", checkpoint_from_model(model, "resnet18", kwargs, (1, 8, 8), 4))
    onnx_path = tmp_path / "m.onnx"
    torch.onnx.export(model, torch.randn(1, 1, 8, 8), str(onnx_path), input_names=["images"],
                      output_names=["out"], dynamic_axes={"images": {0: "n"}, "out": {0: "n"}}, dynamo=False)
    r = compare_models(ckpt, onnx_path, precision="exact", batches=2, batch=2)
    assert r.passed, r.message
    assert r.backend == "torch-cpu" and r.outputs[0].shape == [4, 4]
