"""Benchmark statistics and loop: percentiles by hand, interleaving order, JSON schema, CV warning."""

import json
import math
import statistics

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from egp_deploy import bench
from egp_deploy.bench import (
    BenchSettings, benchmark_models, interleaved_rounds, percentile, ratio_stats, save_latency_plot, summarize,
)
from egp_deploy.errors import NonFiniteError, UsageError
from egp_deploy.io_utils import write_json_atomic
from egp_deploy.runners import TensorSpec, random_inputs


def tiny_onnx(path, n_in=4, n_out=3, seed=0):
    """y = relu(x @ W + b), dynamic batch."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((n_in, n_out)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(n_out).astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out])], [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # what onnxruntime 1.18+ reads
    onnx.save(model, str(path))
    return path


FAST = dict(warmup_ms=5, min_iterations=5, min_duration_s=0.02, threads=1)


# ---------------------------------------------------------------------------- percentiles
def test_percentile_hand_computed_ten_samples():
    values = [float(v) for v in range(1, 11)]  # 1..10
    # n=10: p50 -> index 9 - int(5) = 4 -> 5; p90 -> 9 - 1 = 8 -> 9; p95/p99 -> 9 - 0 -> 10
    assert percentile(values, 50) == 5.0
    assert percentile(values, 90) == 9.0
    assert percentile(values, 95) == 10.0
    assert percentile(values, 99) == 10.0
    assert percentile(values, 100) == 10.0
    assert percentile(values, 0) == 1.0  # index clamps at 0


def test_percentile_two_hundred_samples_no_float_drift():
    values = [float(v) for v in range(1, 201)]
    # exclude = (100 - p) * 200 / 100: p90 -> 20 -> index 179 -> 180 (not 181 from 19.999...)
    assert percentile(values, 90) == 180.0
    assert percentile(values, 95) == 190.0
    assert percentile(values, 99) == 198.0
    assert percentile(values, 99.9) == 200.0  # exclude = int(0.2) = 0


def test_percentile_single_and_errors():
    assert percentile([3.5], 99) == 3.5
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_matches_hand_statistics():
    samples = [4.0, 1.0, 3.0, 2.0, 10.0]
    s = summarize(samples, batch=2)
    assert s["min"] == 1.0 and s["max"] == 10.0
    assert s["mean"] == pytest.approx(4.0)
    assert s["median"] == 3.0  # n=5: 4 - int(2.5) = 2 -> sorted[2]
    assert s["p90"] == 10.0 and s["p99"] == 10.0
    assert s["std"] == pytest.approx(statistics.pstdev(samples))
    assert s["cv"] == pytest.approx(statistics.pstdev(samples) / 4.0)
    assert s["noisy"] is True
    assert s["throughput_per_s"] == pytest.approx(2 * 1000.0 / 4.0)  # no wall time given: the samples' sum
    assert summarize(samples, batch=2, wall_s=0.04)["throughput_per_s"] == pytest.approx(2 * 5 / 0.04)


def test_median_of_an_even_count_is_trtexecs():
    # trtexec's findMedian: the mean of the two middle samples when the count is even
    assert summarize([4.0, 1.0, 3.0, 2.0])["median"] == 2.5
    assert summarize([1.0, 9.0])["median"] == 5.0
    assert bench.median([1.0, 2.0, 7.0]) == 2.0


def test_trtexec_summary_line_and_labels():
    lat = {"min": 0.5, "max": 2.25, "mean": 1.0, "median": 0.75, "p90": 1.5, "p95": 1.75, "p99": 2.0}
    assert bench.trtexec_summary(lat) == (
        "Latency: min = 0.5 ms, max = 2.25 ms, mean = 1 ms, median = 0.75 ms, percentile(90%) = 1.5 ms, "
        "percentile(95%) = 1.75 ms, percentile(99%) = 2 ms")
    assert bench.trtexec_summary(lat, "GPU Compute Time").startswith("GPU Compute Time: min = 0.5 ms")
    assert bench.metric_label("trt", include_copies=False) == "GPU Compute Time"
    assert bench.metric_label("trt", include_copies=True) == "Host Latency"
    assert bench.trtexec_summary(lat, "Host Latency").startswith("Latency: ")  # trtexec's name for it
    assert bench.metric_label("ort-cpu", include_copies=False) == "Latency"


def test_cv_threshold():
    steady = [10.0, 10.1, 9.9, 10.0]  # cv ~0.7 %
    assert summarize(steady)["noisy"] is False
    jumpy = [10.0] * 9 + [13.0]  # cv ~9 %
    assert summarize(jumpy)["noisy"] is True


def test_summarize_rejects_nan():
    with pytest.raises(NonFiniteError):
        summarize([1.0, math.nan])


def test_ratio_stats_per_round():
    r = ratio_stats([2.0, 4.0, 9.0], [1.0, 2.0, 3.0])
    assert r == {"median": 2.0, "min": 2.0, "max": 3.0, "pairs": 3}


# ---------------------------------------------------------------------------- the loop
class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def make_timers(clock, log, names, cost_s=0.25):
    def timer_for(name):
        def timer():
            log.append(name)
            clock.t += cost_s  # exact binary fractions: no float drift in the stop rule
            return 1.0
        return timer
    return [timer_for(n) for n in names]


def test_interleaving_order_and_stop_rule():
    clock, log = FakeClock(), []
    samples = interleaved_rounds(
        make_timers(clock, log, "AB"), warmup_ms=1000, min_iterations=2, min_duration_s=2.0, clock=clock
    )
    # warm-up: A until 1 s of its own calls (4 x 0.25 s), then B likewise; then rounds A B
    # until >= 2 rounds AND >= 2.0 s timed: 4 rounds of 0.5 s
    assert "".join(log) == "AAAA" + "BBBB" + "AB" * 4
    assert [len(s) for s in samples] == [4, 4]


def test_min_iterations_dominates_short_duration():
    clock, log = FakeClock(), []
    samples = interleaved_rounds(
        make_timers(clock, log, "ABC"), warmup_ms=0, min_iterations=6, min_duration_s=0.1, clock=clock
    )
    assert "".join(log) == "ABC" + "ABC" * 6  # warm-up 0 ms still runs each model once
    assert all(len(s) == 6 for s in samples)


# ---------------------------------------------------------------------------- inputs
def test_random_inputs_never_zero_and_reproducible():
    specs = [TensorSpec("x", (None, 3), np.dtype(np.float32)), TensorSpec("ids", (None, 5), np.dtype(np.int64)),
             TensorSpec("h", (None, 2), np.dtype(np.float16))]
    shapes = {"x": (4, 3), "ids": (4, 5), "h": (4, 2)}
    a, b = random_inputs(specs, shapes, seed=3), random_inputs(specs, shapes, seed=3)
    for k in a:
        assert a[k].shape == shapes[k] and a[k].dtype == specs[[s.name for s in specs].index(k)].dtype
        np.testing.assert_array_equal(a[k], b[k])
        assert np.any(a[k] != 0)
    assert a["ids"].min() >= 1 and a["ids"].max() <= 10
    c = random_inputs(specs, shapes, seed=4)
    assert not np.array_equal(a["x"], c["x"])


# ---------------------------------------------------------------------------- whole benchmark
def test_benchmark_json_schema(tmp_path):
    a, b = tiny_onnx(tmp_path / "a.onnx"), tiny_onnx(tmp_path / "b.onnx", seed=1)
    report = benchmark_models([a, b], "ort-cpu", BenchSettings(batch=3, **FAST))
    path = write_json_atomic(tmp_path / "r.json", report)
    data = json.loads(path.read_text())
    assert data["schema"] == "egp-deploy-bench/1"
    assert data["settings"]["interleaved"] is True and data["settings"]["backend"] == "ort-cpu"
    assert data["rounds"] >= 5
    env = data["environment"]
    for key in ("cpu_model", "cpu_usable", "gpu_name", "gpu_driver", "versions", "date_utc", "backends"):
        assert key in env
    assert env["versions"]["onnxruntime"]
    assert [m["name"] for m in data["models"]] == ["a.onnx", "b.onnx"]
    for m in data["models"]:
        assert m["inputs"] == [{"name": "x", "shape": [3, 4], "dtype": "float32"}]
        assert m["iterations"] == data["rounds"] == len(m["samples_ms"])
        lat = m["latency_ms"]
        assert lat["min"] <= lat["median"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert m["backend_details"]["intra_op_threads"] == 1
        # trtexec: inferences / host wall time of the timed iterations (not 1000 / mean)
        assert m["throughput_per_s"] == pytest.approx(3 * m["iterations"] / m["wall_s"])
        assert m["wall_s"] >= sum(m["samples_ms"]) / 1000 * 0.999
        assert m["metric"] == "Latency" and m["trtexec_summary"].startswith("Latency: min = ")
    first = data["models"][0]["ratio_to_first"]
    assert first["median"] == first["min"] == first["max"] == 1.0
    second = data["models"][1]
    expected = statistics.median(x / y for x, y in zip(second["samples_ms"], data["models"][0]["samples_ms"]))
    assert second["ratio_to_first"]["median"] == pytest.approx(expected)


@pytest.mark.parametrize("samples, noisy", [([1.0, 1.0, 1.0, 1.0, 1.0], False), ([1.0, 1.0, 1.0, 1.0, 2.0], True)])
def test_noisy_warning_follows_cv(tmp_path, monkeypatch, samples, noisy):
    model = tiny_onnx(tmp_path / "m.onnx")
    monkeypatch.setattr(bench, "interleaved_rounds", lambda timers, **kw: [list(samples) for _ in timers])
    report = benchmark_models([model], "ort-cpu", BenchSettings(**FAST))
    assert report["models"][0]["noisy"] is noisy
    assert bool(report["warnings"]) is noisy
    if noisy:
        assert "noisy" in report["warnings"][0] and "m.onnx" in report["warnings"][0]


def test_settings_validation(tmp_path):
    model = tiny_onnx(tmp_path / "m.onnx")
    with pytest.raises(UsageError):
        benchmark_models([model], "ort-cpu", BenchSettings(min_iterations=0))
    with pytest.raises(UsageError):
        benchmark_models([model], "ort-cpu", BenchSettings(precision="int4"))


def test_latency_plot_is_png(tmp_path):
    a, b = tiny_onnx(tmp_path / "a.onnx"), tiny_onnx(tmp_path / "b.onnx", seed=1)
    report = benchmark_models([a, b], "ort-cpu", BenchSettings(**FAST))
    png = save_latency_plot(report, tmp_path / "lat.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
