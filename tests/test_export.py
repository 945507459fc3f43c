"""egp_deploy.export: the four source formats, dynamic batch, provenance metadata, bad input."""

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

from egp_deploy.archs import create_model
from egp_deploy.checkpoint import checkpoint_from_model, save_checkpoint
from egp_deploy.errors import InputFileError, NonFiniteError, UnsupportedError, UsageError, VerificationError
from egp_deploy.export import (
    detect_kind, export_file, export_model, load_source, node_module_map, parse_input_shape, read_metadata,
)
from egp_deploy.io_utils import sha256_file

ARCH_KW = {"num_classes": 10, "in_channels": 1, "width": 4}
SAMPLE = (1, 16, 16)


def _pruned_model() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("resnet18", **ARCH_KW).eval()
    with torch.no_grad():
        for m in model.modules():  # non-trivial BN statistics so BN folding is really exercised
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
        model.layer1[0].conv1.weight[:2] = 0.0  # dead output channels
        model.layer3[1].conv2.weight.zero_()  # an all-zero layer
        w = model.layer2[0].conv1.weight
        w[w.abs() < w.abs().median()] = 0.0  # unstructured sparsity
    return model


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("sources")
    model = _pruned_model()
    meta = {"data": "digits", "sparsity": 0.5, "entropy": {"relu": 0.7, "layer1.0.relu1": 0.0}}
    save_checkpoint(d / "ckpt.pt", checkpoint_from_model(model, "resnet18", ARCH_KW, SAMPLE, 10, meta))
    x1, x2 = torch.randn(1, *SAMPLE), torch.randn(2, *SAMPLE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, x1), d / "scripted.pt")
        torch.export.save(torch.export.export(model, (x1,)), d / "static.pt2")
        dyn = torch.export.export(model, (x2,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        torch.export.save(dyn, d / "dynamic.pt2")
    torch.save(model, d / "pickled.pt")
    torch.save(model.state_dict(), d / "state_dict.pt")
    return {"dir": d, "model": model, "meta": meta}


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def _layer_nodes(model: onnx.ModelProto):
    return [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]


def _check_node_map_is_right(model: onnx.ModelProto, torch_model: nn.Module):
    """Every Conv/Gemm maps to a module whose weight has the node's shape and zero pattern."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    modules = dict(torch_model.named_modules())
    mapping = read_metadata(model)["node_modules"]
    layers = _layer_nodes(model)
    assert len(layers) == 21
    for node in layers:
        mod = modules[mapping[node.name]]
        w_onnx = inits[node.input[1]]
        w_torch = mod.weight.detach().numpy()
        assert w_onnx.shape == w_torch.shape, node.name
        np.testing.assert_array_equal(w_onnx == 0, w_torch == 0, err_msg=node.name)
    assert len({mapping[n.name] for n in layers}) == 21


def test_checkpoint_export_metadata_and_equivalence(sources, tmp_path):
    src = sources["dir"] / "ckpt.pt"
    out = tmp_path / "m.onnx"
    res = export_file(src, out)
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert not list(tmp_path.glob("*.data")) and len(list(tmp_path.iterdir())) == 1  # one self-contained file
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, *SAMPLE]
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["logits"]

    md = read_metadata(model)
    assert md["source_sha256"] == sha256_file(src)
    assert md["source_kind"] == "checkpoint"
    assert md["arch"] == "resnet18" and md["arch_kwargs"] == ARCH_KW
    assert md["input_shape"] == list(SAMPLE) and md["num_classes"] == 10
    assert md["data"] == "digits" and md["entropy"] == sources["meta"]["entropy"]
    assert md["recorded_sparsity"] == 0.5
    torch_model = sources["model"]
    weights = [p for n, p in torch_model.named_parameters() if n.endswith("weight") and p.dim() >= 2]
    zeros = sum(int((p == 0).sum()) for p in weights)
    assert md["sparsity"] == pytest.approx(zeros / sum(p.numel() for p in weights))
    assert md["version"]
    _check_node_map_is_right(model, torch_model)

    x = np.random.default_rng(1).standard_normal((1, *SAMPLE)).astype(np.float32)
    with torch.no_grad():
        want = torch_model(torch.from_numpy(x)).numpy()
    got = _ort(model, x)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-4
    assert res.max_rel_error < 1e-4 and res.exporter == "legacy"


def test_dynamic_batch_accepts_other_batch_sizes(sources, tmp_path):
    res = export_file(sources["dir"] / "ckpt.pt", tmp_path / "dyn.onnx", dynamic_batch=True)
    dim0 = res.model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "batch" and read_metadata(res.model)["dynamic_batch"] is True
    x = np.random.default_rng(2).standard_normal((5, *SAMPLE)).astype(np.float32)
    with torch.no_grad():
        want = sources["model"](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_ort(res.model, x), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_static_batch_size(sources):
    res = export_model(load_source(sources["dir"] / "ckpt.pt"), batch_size=3)
    assert res.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3


def test_torchscript_needs_and_uses_input_shape(sources, tmp_path):
    src = sources["dir"] / "scripted.pt"
    assert detect_kind(src) == "torchscript"
    with pytest.raises(UsageError, match="--input-shape"):
        export_file(src, tmp_path / "ts.onnx", unsafe_pickle=True)
    assert not (tmp_path / "ts.onnx").exists()
    res = export_file(src, tmp_path / "ts.onnx", input_shape=SAMPLE, dynamic_batch=True, unsafe_pickle=True)
    assert read_metadata(res.model)["source_kind"] == "torchscript"
    _check_node_map_is_right(res.model, sources["model"])


def test_exported_program_static_and_dynamic(sources, tmp_path):
    static = sources["dir"] / "static.pt2"
    assert detect_kind(static) == "exported"
    src = load_source(static)
    assert src.input_shape == SAMPLE and not src.dynamic_batch
    with pytest.raises(UnsupportedError, match="static batch"):
        export_model(src, dynamic_batch=True)
    with pytest.raises(UsageError, match="differs"):
        export_model(src, input_shape=(1, 20, 20))
    res = export_file(sources["dir"] / "dynamic.pt2", tmp_path / "ep.onnx", dynamic_batch=True)
    assert res.exporter == "dynamo"
    assert res.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert res.checked_batches == [1, 3]
    _check_node_map_is_right(res.model, sources["model"])


def test_pickled_module_only_with_flag(sources, tmp_path):
    src = sources["dir"] / "pickled.pt"
    with pytest.raises(InputFileError, match="--unsafe-pickle"):
        load_source(src)
    res = export_file(src, tmp_path / "p.onnx", input_shape=SAMPLE, unsafe_pickle=True)
    assert read_metadata(res.model)["source_kind"] == "pickled"
    assert read_metadata(res.model)["arch"] == "ResNet"


def test_bad_files_one_line_errors(sources, tmp_path):
    good = (sources["dir"] / "ckpt.pt").read_bytes()
    cases = {
        "missing.pt": None,
        "empty.pt": b"",
        "truncated.pt": good[: len(good) // 2],
        "text.pt": b"hello, this is not a model\n" * 10,
    }
    for name, data in cases.items():
        p = tmp_path / name
        if data is not None:
            p.write_bytes(data)
        with pytest.raises(InputFileError) as info:
            export_file(p, tmp_path / "out.onnx")
        assert "\n" not in str(info.value) and str(p) in str(info.value)
    with pytest.raises(InputFileError, match="state_dict"):
        load_source(sources["dir"] / "state_dict.pt")
    onnx_file = tmp_path / "already.onnx"
    export_file(sources["dir"] / "ckpt.pt", onnx_file)
    with pytest.raises(InputFileError, match="egp-surgery"):
        load_source(onnx_file)
    onnx_file.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.pt", "text.pt", "truncated.pt"]


def test_wrong_input_shape_and_output_equal_to_input(sources, tmp_path):
    src = sources["dir"] / "ckpt.pt"
    with pytest.raises(UsageError, match="does not accept input of shape"):
        export_file(src, tmp_path / "o.onnx", input_shape=(3, 16, 16))
    before = src.read_bytes()
    with pytest.raises(UsageError, match="is the input"):
        export_file(src, src)
    assert src.read_bytes() == before
    for bad in ("3,a,4", "0,3", ""):
        with pytest.raises(UsageError):
            parse_input_shape(bad)
    assert parse_input_shape("3x32x32") == (3, 32, 32)
    assert list(tmp_path.iterdir()) == []


class _DriftsAfterFirstCall(nn.Module):
    """Each call scales by a Python counter: the traced graph cannot match the first call."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(x) * float(self.calls)


class _NaNModel(nn.Module):
    def forward(self, x):
        return x * float("nan")


def test_verification_refuses_a_mismatching_export(tmp_path):
    model = _DriftsAfterFirstCall()
    p = tmp_path / "drift.pt"
    torch.save(model, p)
    with pytest.raises(VerificationError, match="relative error"):
        export_file(p, tmp_path / "drift.onnx", input_shape=(4,), unsafe_pickle=True)
    torch.save(_NaNModel(), tmp_path / "nan.pt")
    with pytest.raises(NonFiniteError):
        export_file(tmp_path / "nan.pt", tmp_path / "nan.onnx", input_shape=(4,), unsafe_pickle=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drift.pt", "nan.pt"]


def test_node_module_map_resolves_legacy_scope_paths():
    helper = onnx.helper
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="/layer2/layer2.0/downsample/downsample.0/Conv"),
        helper.make_node("Relu", ["a"], ["b"], name="/layer1/0/relu1/Relu"),
        helper.make_node("Relu", ["b"], ["c"], name="/features/features.3/conv/conv.1/Relu_1"),
        helper.make_node("Relu", ["c"], ["y"], name="Relu_7"),
    ]
    vi = lambda n: helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1])  # noqa: E731
    m = helper.make_model(helper.make_graph(nodes, "g", [vi("x")], [vi("y")]))
    assert node_module_map(m) == {
        "/layer2/layer2.0/downsample/downsample.0/Conv": "layer2.0.downsample.0",
        "/layer1/0/relu1/Relu": "layer1.0.relu1",
        "/features/features.3/conv/conv.1/Relu_1": "features.3.conv.1",
    }
    assert node_module_map(m, {"layer1.0.relu1"}) == {"/layer1/0/relu1/Relu": "layer1.0.relu1"}


def _module_source(module: nn.Module, shape: tuple[int, ...]):
    from pathlib import Path

    from egp_deploy.export import SourceModel

    return SourceModel(kind="checkpoint", path=Path("in-memory.pt"), sha256="0" * 64, module=module.eval(),
                       input_shape=shape)


def test_ill_conditioned_model_is_judged_against_its_own_round_off():
    from test_surgery_helpers import cancelling_pair

    res = export_model(_module_source(cancelling_pair(eps=1e-2), (16, 12, 12)), rtol=1e-4)
    # onnxruntime and PyTorch differ by far more than 1e-4 on this output, and so does the graph with itself
    assert res.fp32_noise_floor is not None and res.fp32_noise_floor > 1e-4
    assert 1e-4 < res.max_rel_error <= 2 * res.fp32_noise_floor
    assert read_metadata(res.model)["export"]["fp32_noise_floor"] == pytest.approx(res.fp32_noise_floor)
    # a well-conditioned model keeps the requested tolerance and never measures a floor
    fine = export_model(_module_source(cancelling_pair(eps=100.0), (16, 12, 12)), rtol=1e-4)
    assert fine.fp32_noise_floor is None and fine.max_rel_error <= 1e-4


def test_a_wrong_export_of_an_ill_conditioned_model_is_still_refused(monkeypatch):
    import egp_deploy.export as export
    from test_surgery_helpers import cancelling_pair

    real = export._export_legacy

    def corrupting(*args, **kwargs):
        model, opset = real(*args, **kwargs)
        init = model.graph.initializer[0]
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.05, init.name))
        return model, opset

    monkeypatch.setattr(export, "_export_legacy", corrupting)
    with pytest.raises(VerificationError, match="own fp32 round-off"):
        export.export_model(_module_source(cancelling_pair(eps=1e-2), (16, 12, 12)), rtol=1e-4, exporter="legacy")
