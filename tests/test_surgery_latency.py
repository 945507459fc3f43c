"""--cost latency: candidates timed as tiny graphs, the latency table reused and carried, and bad
tables or backends -> one line, a distinct exit, nothing written."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
import torch

from egp_deploy.cli import surgery as cli
from egp_deploy.errors import BackendUnavailableError, InputFileError, UsageError
from egp_deploy.surgery import SurgeryOptions, optimize
from egp_deploy.surgery.latency import build_graph, layer_spec
from test_surgery_chain_merge import LinearInvertedResidual
from test_surgery_helpers import export_module, outputs, randn, rel_error

FAST = dict(cost="latency", latency_rounds=3)


@pytest.fixture
def block_model():
    torch.manual_seed(0)
    return export_module(LinearInvertedResidual(c=8), (1, 8, 8, 8), dynamic=True)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the default table never lands in ~


def test_latency_cost_times_every_candidate_and_the_table_is_reused(tmp_path, block_model):
    table = tmp_path / "t.json"
    x = randn(4, 8, 8, 8)
    res = optimize(block_model, x, None, SurgeryOptions(**FAST, latency_table=str(table)))
    planner = res.report["merge_planner"]
    assert planner["cost"] == "latency" and planner["measured_graphs"] > 0 and planner["table_written"]
    merged_rows = [c for c in planner["candidates"] if "ms_merged" in c]
    assert len(merged_rows) == 3  # (expand, dw), (dw, project), the whole block
    for c in merged_rows:
        assert c["ms_merged"] >= 0 and c["ms_span"] >= 0 and c["decision"] in ("merged", "kept") and c["why"]
    assert rel_error(outputs(block_model, x), outputs(res.model, x)) <= 1e-5
    data = json.loads(table.read_text())
    assert data["backend"] == "ort-cpu" and len(data["entries"]) == planner["measured_graphs"]
    again = optimize(block_model, x, None, SurgeryOptions(**FAST, latency_table=str(table)))
    p2 = again.report["merge_planner"]
    assert p2["measured_graphs"] == 0 and p2["graphs_from_table"] > 0 and not p2["table_written"]
    assert [c["decision"] for c in p2["candidates"]] == [c["decision"] for c in planner["candidates"]]


def test_table_decides_the_plan(tmp_path, block_model):
    """Planning follows the table's times: a table saying the whole block is slow keeps it apart."""
    table = tmp_path / "t.json"
    x = randn(4, 8, 8, 8)
    optimize(block_model, x, None, SurgeryOptions(**FAST, latency_table=str(table)))
    data = json.loads(table.read_text())
    whole = next(k for k in data["entries"] if '"w":[8,8,3,3]' in k and '"Add"' not in k)
    data["entries"][whole]["ms"] = 1e3
    table.write_text(json.dumps(data))
    res = optimize(block_model, x, None, SurgeryOptions(**FAST, latency_table=str(table)))
    assert sum(n.op_type == "Conv" for n in res.model.graph.node) > 1
    row = next(c for c in res.report["merge_planner"]["candidates"] if len(c["layers"]) == 3)
    assert row["decision"] == "kept" and "costs more" in row["why"]


def test_a_complete_table_from_another_device_plans_without_measuring(tmp_path, block_model):
    table = tmp_path / "edge.json"
    x = randn(4, 8, 8, 8)
    optimize(block_model, x, None, SurgeryOptions(**FAST, latency_table=str(table)))
    data = json.loads(table.read_text())
    data["device"] = "Jetson Orin (elsewhere)"
    table.write_text(json.dumps(data))
    before = table.read_bytes()
    res = optimize(block_model, x, None, SurgeryOptions(**FAST, latency_table=str(table)))
    p = res.report["merge_planner"]
    assert p["measured_graphs"] == 0 and p["table"]["foreign"] and table.read_bytes() == before


def test_an_incomplete_table_from_another_device_is_refused(tmp_path, block_model):
    table = tmp_path / "edge.json"
    table.write_text(json.dumps({"format": "egp-deploy latency table", "version": 1, "backend": "ort-cpu",
                                 "device": "Jetson Orin (elsewhere)", "versions": {"onnxruntime": "0"},
                                 "entries": {}}))
    with pytest.raises(UsageError, match="can only be measured there"):
        optimize(block_model, randn(4, 8, 8, 8), None, SurgeryOptions(**FAST, latency_table=str(table)))


def test_tiny_graphs_run_at_their_shapes():
    from egp_deploy.surgery.chain_merge import layer_affine
    from test_surgery_helpers import graph_of

    model = export_module(torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (1, 4, 9, 9))
    conv = next(n for n in graph_of(model).nodes if n.op == "Conv")
    spec = [layer_spec(layer_affine(conv)), {"op": "Add", "skip": -1}]
    probe = build_graph(spec)
    onnx.checker.check_model(probe, full_check=True)
    import onnxruntime as ort

    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": randn(1, 4, 9, 9), "skip": randn(1, 6, 5, 5)})
    assert y.shape == (1, 6, 5, 5)


# ---------------------------------------------------------------- bad input on the command line
def _run(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["egp-surgery", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    cap = capsys.readouterr()
    return int(exc.value.code or 0), (cap.out + cap.err).strip()


@pytest.fixture
def model_file(tmp_path, block_model):
    path = tmp_path / "in.onnx"
    onnx.save(block_model, path)
    return path


def _refused(code, text, expected, out, needle):
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert code == expected, text
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], text
    assert not out.exists()


@pytest.mark.parametrize("content,needle", [
    ("{not json", "not readable JSON"),
    (json.dumps({"format": "egp-deploy latency table", "version": 1, "backend": "ort-cpu", "device": "x",
                 "versions": {}, "entries": {"k": {"ms": -1}}}), "corrupt"),
    (json.dumps([1, 2]), "corrupt"),
    # pathological JSON: one line, exit 3, never an internal error
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"format": "egp-deploy latency table", "version": 1, "backend": "ort-cpu", "device": "x", "versions": {},'
     ' "entries": {"k": {"ms": 1' + "0" * 400 + '}}}', "no finite non-negative"),
    ('{"version": 1' + "0" * 5000 + "}", "not readable JSON"),
])
def test_corrupt_table_is_refused_and_left_alone(tmp_path, monkeypatch, capsys, model_file, content, needle):
    table, out = tmp_path / "t.json", tmp_path / "out.onnx"
    table.write_text(content)
    code, text = _run(monkeypatch, capsys, model_file, out, "-q", "-n", 4, "--cost", "latency",
                      "--latency-table", table)
    _refused(code, text, InputFileError.exit_code, out, needle)
    assert table.read_text() == content


def test_table_of_another_backend_is_refused(tmp_path, monkeypatch, capsys, model_file):
    table, out = tmp_path / "t.json", tmp_path / "out.onnx"
    table.write_text(json.dumps({"format": "egp-deploy latency table", "version": 1, "backend": "ort-trt",
                                 "device": "GPU", "versions": {}, "entries": {}}))
    code, text = _run(monkeypatch, capsys, model_file, out, "-q", "-n", 4, "--cost", "latency",
                      "--latency-table", table)
    _refused(code, text, UsageError.exit_code, out, "backend ort-trt")


def test_backend_that_is_not_installed_is_refused(tmp_path, monkeypatch, capsys, model_file):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    out, table = tmp_path / "out.onnx", tmp_path / "t.json"
    code, text = _run(monkeypatch, capsys, model_file, out, "-q", "-n", 4, "--cost", "latency",
                      "--backend", "ort-cuda", "--latency-table", table)
    _refused(code, text, BackendUnavailableError.exit_code, out, "ort-cuda")
    assert not table.exists()


@pytest.mark.parametrize("args,needle", [
    (("--latency-table", "t.json"), "only applies to merges timed with cost latency"),
    (("--latency-margin", "0.2"), "latency_margin (--latency-margin) only applies"),
    (("--cost", "flops"), "is not one of 'macs', 'latency'"),
    (("--cost", "latency", "--backend", "trt"), "is not one of 'ort-cpu', 'ort-cuda', 'ort-trt'"),
])
def test_contradictory_cost_options_are_refused(tmp_path, monkeypatch, capsys, model_file, args, needle):
    out = tmp_path / "out.onnx"
    code, text = _run(monkeypatch, capsys, model_file, out, "-q", "-n", 4, *args)
    _refused(code, text, UsageError.exit_code, out, needle)


def test_cli_latency_run_prints_each_decision(tmp_path, monkeypatch, capsys, model_file):
    out, table = tmp_path / "out.onnx", tmp_path / "t.json"
    code, text = _run(monkeypatch, capsys, model_file, out, "-n", 8, "--cost", "latency", "--latency-table", table)
    assert code == 0, text
    assert "merge planner: latency on ort-cpu" in text and "ms merged vs" in text and table.is_file()
    assert np.isfinite(json.loads(table.read_text())["entries"][next(iter(json.loads(table.read_text())["entries"]))]["ms"])


def test_egp_export_reaches_the_cost_options_through_surgery_option():
    from egp_deploy.api import parse_surgery_settings, surgery_options

    opts = surgery_options(parse_surgery_settings(["cost=latency", "latency_backend=ort-cpu", "latency_table=none",
                                                   "latency_margin=0.1", "latency_rounds=5"]))
    assert (opts.cost, opts.latency_table, opts.latency_margin, opts.latency_rounds) == ("latency", None, 0.1, 5)


# ---------------------------------------------------------------- the cache, table bounds, checked up front
def test_a_cache_that_cannot_be_written_is_a_warning_decided_before_work(tmp_path, monkeypatch, capsys, model_file):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    out = tmp_path / "out.onnx"
    code, text = _run(monkeypatch, capsys, model_file, out, "-q", "-n", 8, "--cost", "latency")
    assert code == 0 and out.is_file(), text
    warning = [ln for ln in text.splitlines() if "latency" in ln]
    assert len(warning) == 1 and warning[0].startswith("warning: cannot write latency cache"), text
    assert warning[0].endswith("is a file, not a folder: this run's latency timings will not be kept for the next one")
    assert blocker.read_text() == "a file where the cache folder would go"


def test_a_failed_table_write_is_a_warning_never_a_lost_result(tmp_path, monkeypatch, block_model):
    import errno

    from egp_deploy import io_utils

    def disk_full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(io_utils, "write_json_atomic", disk_full)
    for table in (None, str(tmp_path / "t.json")):  # the per-device cache and a table the user named
        res = optimize(block_model, randn(8, 8, 8, 8), None, SurgeryOptions(**FAST, latency_table=table))
        assert not res.report["merge_planner"]["table_written"]
        assert any("No space left on device" in w and "not kept" in w for w in res.report["warnings"])
    assert not (tmp_path / "t.json").exists()


def test_a_table_that_is_a_fifo_or_a_device_is_refused_without_reading_it(tmp_path, monkeypatch, capsys, model_file):
    import os

    fifo = tmp_path / "t.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "out.onnx"
    for table in (fifo, "/dev/zero"):  # a reader would hang on one and fill memory from the other
        monkeypatch.setattr("egp_deploy.validation.check_outputs", lambda *a, **k: None)  # reach the reader
        code, text = _run(monkeypatch, capsys, model_file, out, "-q", "-n", 4, "--cost", "latency",
                          "--latency-table", table)
        _refused(code, text, InputFileError.exit_code, out, "not a regular file")


def test_a_table_beyond_the_size_bound_is_refused(tmp_path, monkeypatch, capsys, model_file):
    from egp_deploy.surgery import latency

    monkeypatch.setattr(latency, "MAX_TABLE_BYTES", 100)
    table, out = tmp_path / "t.json", tmp_path / "out.onnx"
    table.write_text(json.dumps({"format": "egp-deploy latency table", "pad": "x" * 200}))
    code, text = _run(monkeypatch, capsys, model_file, out, "-q", "-n", 4, "--cost", "latency",
                      "--latency-table", table)
    _refused(code, text, InputFileError.exit_code, out, "more than the 100")


def test_latency_options_without_cost_latency_are_refused_by_the_api_before_work(tmp_path, block_model, monkeypatch):
    import egp_deploy
    from egp_deploy.surgery import pipeline

    def no_work(*_a, **_k):
        raise AssertionError("measured before the options were checked")

    monkeypatch.setattr(pipeline, "measure_activation_stats", no_work)
    for given in ({"latency_margin": 0.2}, {"latency_table": str(tmp_path / "t.json")}, {"latency_rounds": 4}):
        with pytest.raises(UsageError, match="only applies to merges timed with cost latency"):
            egp_deploy.optimize(block_model, randn(4, 8, 8, 8), None, **given)


def test_export_set_latency_table_is_checked_like_the_other_outputs(tmp_path, monkeypatch):
    import egp_deploy
    from egp_deploy import export

    def no_work(*_a, **_k):
        raise AssertionError("loaded the model before the latency table was checked")

    monkeypatch.setattr(export, "load_source", no_work)
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"PK\x03\x04 not really")  # never read: the refusal comes first
    monkeypatch.setattr(export, "detect_kind", lambda p: "checkpoint")
    out = tmp_path / "m.egp.onnx"
    for table, needle in ((tmp_path / "m.onnx", "same path"), (ckpt, "is the input"), (out, "same path"),
                          (tmp_path / "m.egp.json", "same path")):
        with pytest.raises(UsageError, match=needle):
            egp_deploy.deploy(ckpt, out, options={"cost": "latency", "latency_table": str(table)})
    with pytest.raises(UsageError, match="only applies to merges timed with cost latency"):
        egp_deploy.deploy(ckpt, out, options={"latency_table": str(tmp_path / "t.json")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_a_foreign_table_missing_timings_is_refused_before_the_rewrite(tmp_path, block_model, monkeypatch):
    from egp_deploy.surgery import pipeline

    table = tmp_path / "edge.json"
    x = randn(8, 8, 8, 8)
    optimize(block_model, x, None, SurgeryOptions(**FAST, latency_table=str(table)))
    data = json.loads(table.read_text())
    data["device"] = "Jetson Orin (elsewhere)"
    whole = next(k for k in data["entries"] if '"w":[8,8,3,3]' in k and '"Add"' not in k)
    del data["entries"][whole]  # one timing the plan needs, in the middle of the chain's candidates
    table.write_text(json.dumps(data))
    rewrite, rewrites = pipeline._rewrite, []

    def recorded(named, stats, options, module_of, cost_model=None):
        rewrites.append("dry" if cost_model.lacking is not None else "real")
        return rewrite(named, stats, options, module_of, cost_model)

    monkeypatch.setattr(pipeline, "_rewrite", recorded)
    with pytest.raises(UsageError, match="lacks 1 timings this model's merge plan needs"):
        optimize(block_model, x, x, SurgeryOptions(**FAST, latency_table=str(table)))
    # planned dry (once: this block has no activation to strip, so no revert to plan for); no real rewrite began
    assert rewrites == ["dry"]
