"""ONNX memory bombs: a few hundred bytes that ask for gigabytes (ConstantOfShape, Expand, Tile,
Resize, Range, sizes computed from shapes), and tensors that declare more data than they hold,
are refused with one line before a weight is decoded or onnxruntime sees the file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_reliability import _one_error_line, _tiny_onnx, run_cli

import egp_deploy
from egp_deploy.build import onnx_inputs
from egp_deploy.errors import InputFileError, UnsupportedError
from egp_deploy.onnx_file import check_onnx_sizes, read_onnx

HUGE = 1 << 16  # 65536 x 65536 float32 = 16 GiB


def _ints(values, name: str) -> TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _model(nodes, initializers, input_dims=(1, 1)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_dims))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(input_dims))], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _summed_into_output(*nodes):
    """``nodes`` end in tensor "big"; the model returns x + sum(big), so "big" is only an intermediate."""
    return [*nodes, helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
            helper.make_node("Add", ["x", "total"], ["y"])]


def _constant_of_shape():
    value = helper.make_tensor("value", TensorProto.FLOAT, [1], [0.0])
    return _model(_summed_into_output(helper.make_node("ConstantOfShape", ["shape"], ["big"], value=value)),
                  [_ints([HUGE, HUGE], "shape")])


def _shape_computed_constant_of_shape():  # the size comes from x's shape times a constant
    value = helper.make_tensor("value", TensorProto.FLOAT, [1], [0.0])
    return _model(_summed_into_output(
        helper.make_node("Shape", ["x"], ["dims"]), helper.make_node("Mul", ["dims", "k"], ["shape"]),
        helper.make_node("ConstantOfShape", ["shape"], ["big"], value=value)), [_ints([HUGE, HUGE], "k")])


def _expand():
    return _model(_summed_into_output(helper.make_node("Expand", ["x", "shape"], ["big"])), [_ints([HUGE, HUGE], "shape")])


def _tile():
    return _model(_summed_into_output(helper.make_node("Tile", ["x", "repeats"], ["big"])), [_ints([HUGE, HUGE], "repeats")])


def _resize():
    scales = numpy_helper.from_array(np.array([1, 1, HUGE, HUGE], np.float32), "scales")
    return _model(_summed_into_output(helper.make_node("Resize", ["x", "", "scales"], ["big"])), [scales],
                  input_dims=(1, 1, 1, 1))


def _range():
    return _model(_summed_into_output(helper.make_node("Range", ["zero", "limit", "one"], ["steps"]),
                                      helper.make_node("Cast", ["steps"], ["big"], to=TensorProto.FLOAT)),
                  [_ints(0, "zero"), _ints(1 << 32, "limit"), _ints(1, "one")])


def _shape_computed_range():
    return _model(_summed_into_output(
        helper.make_node("Shape", ["x"], ["dims"]), helper.make_node("Gather", ["dims", "zero"], ["rows"], axis=0),
        helper.make_node("Mul", ["rows", "k"], ["limit"]), helper.make_node("Range", ["zero", "limit", "one"], ["steps"]),
        helper.make_node("Cast", ["steps"], ["big"], to=TensorProto.FLOAT)),
        [_ints(0, "zero"), _ints(1 << 32, "k"), _ints(1, "one")])


BOMBS = {"ConstantOfShape": _constant_of_shape, "ConstantOfShape of a computed shape": _shape_computed_constant_of_shape,
         "Expand": _expand, "Tile": _tile, "Resize": _resize, "Range": _range,
         "Range to a computed limit": _shape_computed_range}


@pytest.fixture
def no_session(monkeypatch) -> list:
    """onnxruntime never creates a session (it would fold the constants: the allocation itself)."""
    import onnxruntime

    calls: list = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("onnxruntime was handed a model the size check should have refused")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    return calls


@pytest.mark.parametrize("bomb", list(BOMBS))
def test_memory_bombs_are_refused_before_anything_runs(bomb, tmp_path, no_session):
    path = tmp_path / "bomb.onnx"
    onnx.save(BOMBS[bomb](), path)
    assert path.stat().st_size < 400  # a few hundred bytes ...
    with pytest.raises(UnsupportedError) as info:  # ... asking for 16 GiB or more
        read_onnx(path)
    message = str(info.value)
    assert "GiB" in message and "\n" not in message and str(path) in message and info.value.exit_code == 8
    with pytest.raises(UnsupportedError):
        egp_deploy.optimize(path, "random", samples=2)
    with pytest.raises(UnsupportedError):
        egp_deploy.optimize(onnx.load(path), "random", samples=2)
    with pytest.raises(UnsupportedError):
        onnx_inputs(path)
    assert no_session == []


@pytest.mark.parametrize("stage,extra", [("surgery", ["out.onnx"]), ("bench", ["--iterations", "2"]),
                                         ("check", ["--budget-ms", "5"])])
def test_commands_refuse_a_memory_bomb_with_one_line_exit_8(stage, extra, tmp_path, monkeypatch, capsys, no_session):
    monkeypatch.chdir(tmp_path)
    onnx.save(_constant_of_shape(), tmp_path / "bomb.onnx")
    code, err, _ = run_cli(stage, ["bomb.onnx", *extra], capsys)
    _one_error_line(code, err, 8 if stage != "check" else 2, "ConstantOfShape", "GiB")
    assert no_session == [] and not (tmp_path / "out.onnx").exists()


def test_shape_computations_of_ordinary_models_pass(tmp_path):
    # a Range to a size computed from the input's shape, well within the limit: accepted and runnable
    model = _shape_computed_range()
    model.graph.initializer[1].CopyFrom(_ints(100, "k"))
    onnx.save(model, tmp_path / "ok.onnx")
    loaded = read_onnx(tmp_path / "ok.onnx")
    from egp_deploy.runners.ort import open_cpu_session

    (y,) = open_cpu_session(loaded).run(None, {"x": np.zeros((1, 1), np.float32)})
    assert y.item() == sum(range(100))


def _with_initializer(tensor: TensorProto) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [tensor])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _short_raw_data():
    return TensorProto(name="w", dims=[4, 3], data_type=TensorProto.FLOAT, raw_data=b"\0" * 8)


def _huge_dims_few_bytes():
    return TensorProto(name="w", dims=[1 << 20, 1 << 20], data_type=TensorProto.FLOAT, raw_data=b"\0" * 48)


def _few_float_entries():
    return TensorProto(name="w", dims=[4, 3], data_type=TensorProto.FLOAT, float_data=[1.0, 2.0])


def _no_data():
    return TensorProto(name="w", dims=[4, 3], data_type=TensorProto.FLOAT)


def _negative_dims():
    return TensorProto(name="w", dims=[-4, -3], data_type=TensorProto.FLOAT, raw_data=b"\0" * 48)


MALFORMED = {"raw data shorter than its dims": (_short_raw_data, "holds 8"),
             "16 TiB declared, 48 bytes held": (_huge_dims_few_bytes, "holds 48"),
             "fewer float entries than its dims": (_few_float_entries, "holds 2"),
             "no data at all": (_no_data, "holds 0"),
             "negative dims": (_negative_dims, "negative dimension")}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_tensor_holding_less_than_it_declares_is_a_malformed_file(case, tmp_path, capsys, no_session):
    build, words = MALFORMED[case]
    path = tmp_path / "m.onnx"
    onnx.save(_with_initializer(build()), path)
    with pytest.raises(InputFileError) as info:
        egp_deploy.optimize(path, "random", samples=2)
    assert words in str(info.value) and "'w'" in str(info.value) and info.value.exit_code == 3
    code, err, _ = run_cli("surgery", [path, tmp_path / "o.onnx"], capsys)
    _one_error_line(code, err, 3, "'w'", words)
    assert no_session == [] and not (tmp_path / "o.onnx").exists()


def test_a_constant_node_holding_less_than_it_declares_is_refused(tmp_path):
    short = TensorProto(name="c", dims=[1 << 30], data_type=TensorProto.FLOAT, raw_data=b"\0" * 4)
    model = _model([helper.make_node("Constant", [], ["c"], value=short),
                    helper.make_node("ReduceSum", ["c"], ["s"], keepdims=0), helper.make_node("Add", ["x", "s"], ["y"])], [])
    with pytest.raises(InputFileError, match="attribute 'value' of Constant node"):
        check_onnx_sizes(model)


def test_a_sparse_initializer_of_huge_dims_is_refused():
    values = numpy_helper.from_array(np.ones(1, np.float32), "w")
    sparse = helper.make_sparse_tensor(values, _ints([0], "w_idx"), [HUGE, HUGE])
    model = _model([helper.make_node("Add", ["x", "x"], ["y"])], [])
    model.graph.sparse_initializer.append(sparse)
    with pytest.raises(UnsupportedError, match="sparse initializer 'w'"):
        check_onnx_sizes(model)


def _external(tmp_path: Path) -> tuple[onnx.ModelProto, Path]:
    model = onnx.load(_tiny_onnx(tmp_path / "m.onnx"))
    onnx.save_model(model, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.data", size_threshold=0)
    return onnx.load(tmp_path / "ext.onnx", load_external_data=False), tmp_path / "ext.data"


def _set_entry(model: onnx.ModelProto, key: str, value: str) -> None:
    entries = model.graph.initializer[0].external_data
    for entry in entries:
        if entry.key == key:
            entry.value = value
            return
    entries.add(key=key, value=value)


def test_external_data_checked_before_it_is_read(tmp_path):
    model, data = _external(tmp_path)
    loaded = read_onnx(tmp_path / "ext.onnx")  # a sound file: its weights come back
    assert numpy_helper.to_array(loaded.graph.initializer[0]).shape == (4, 3)

    cases = {"length": ("length", "4096", "external data entry says 4096"),
             "truncated": ("offset", "40", "truncated"),
             "outside": ("location", "../ext.data", "not a file beside the model"),
             "absolute": ("location", str(data), "not a file beside the model"),
             "missing": ("location", "gone.data", "missing")}
    for key, value, words in cases.values():
        crafted = onnx.ModelProto()
        crafted.CopyFrom(model)
        _set_entry(crafted, key, value)
        onnx.save(crafted, tmp_path / "crafted.onnx")
        with pytest.raises(InputFileError, match=words):
            read_onnx(tmp_path / "crafted.onnx")
    os.symlink("/dev/zero", tmp_path / "zero.data")  # a device never ends: reading it would take all memory
    crafted = onnx.ModelProto()
    crafted.CopyFrom(model)
    _set_entry(crafted, "location", "zero.data")
    onnx.save(crafted, tmp_path / "crafted.onnx")
    with pytest.raises(InputFileError, match="not a regular file"):
        read_onnx(tmp_path / "crafted.onnx")
    with pytest.raises(InputFileError, match="in-memory model"):
        check_onnx_sizes(model)


def test_a_long_integer_range_is_refused_before_shape_inference_writes_it_out(tmp_path):
    # 8M int64 values are 64 MiB as a tensor, but onnx's data propagation (run by the surgery) writes
    # each one out as a protobuf dimension: refused, naming the op
    model = _range()
    model.graph.initializer[1].CopyFrom(_ints(1 << 23, "limit"))
    with pytest.raises(UnsupportedError, match="Range 'steps' makes 8388608 integers"):
        check_onnx_sizes(model)
