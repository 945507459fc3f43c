"""Latency measurement with trtexec's conventions (../shared/MEASURE.md), several models interleaved.

* warm-up by time (200 ms per model), then rounds A B A B ... until every model has at least
  ``min_iterations`` samples AND the timed phase lasted at least ``min_duration_s`` (for a single
  model this is exactly trtexec's --iterations/--duration rule);
* min, mean, median, p90, p95, p99, max, throughput; percentile p is the nearest rank on the
  high side: sorted[max(n - 1 - int((1 - p/100) * n), 0)] (trtexec's definition);
* coefficient of variation over 2.5 % -> a noisy-machine warning;
* ratio of each model to the first: per round t_i / t_0, reported as median with min and max;
* random inputs drawn once per run (never zeros) and reused; environment recorded in the JSON.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from egp_deploy.errors import NonFiniteError, UsageError
from egp_deploy.runners import Runner, applicable_options, get_runner, random_inputs, resolve_input_shapes
from egp_deploy.runners.base import ShapeTriple

SCHEMA = "egp-deploy-bench/1"
NOISY_CV = 0.025
PERCENTILES = (90, 95, 99)


@dataclass
class BenchSettings:
    warmup_ms: float = 200.0
    min_iterations: int = 10
    min_duration_s: float = 3.0
    batch: int | None = None
    shapes: Mapping[str, ShapeTriple] | None = None
    threads: int | None = None
    precision: str = "fp32"
    include_copies: bool = False
    seed: int = 0

    def validate(self) -> None:
        """The command line's ranges (egp_deploy.validation): NaN/Inf durations would never end."""
        from egp_deploy.validation import validate_options

        validate_options("bench", vars(self))
        if self.precision not in ("fp32", "fp16"):
            raise UsageError(f"--precision {self.precision!r}: choose fp32 or fp16")


# ------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------
def percentile(sorted_values: Sequence[float], p: float) -> float:
    """trtexec's percentile: sorted[max(n - 1 - int((1 - p/100) * n), 0)] of an ascending list.

    The excluded count is computed as (100 - p) * n / 100 with a 1e-9 guard so binary rounding
    does not move the rank (in doubles (1 - 0.9) * 200 is 19.999..., which would give the 181st
    of 200 samples for p90 instead of the 180th that the formula means).
    """
    n = len(sorted_values)
    if n == 0:
        raise ValueError("percentile of no samples")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} outside [0, 100]")
    exclude = int((100.0 - p) * n / 100.0 + 1e-9)
    return float(sorted_values[max(n - 1 - exclude, 0)])


def median(sorted_values: Sequence[float]) -> float:
    """trtexec's median: the middle sample, or the mean of the two middle ones for an even count."""
    n = len(sorted_values)
    if n == 0:
        raise ValueError("median of no samples")
    m = n // 2
    return float(sorted_values[m]) if n % 2 else (float(sorted_values[m - 1]) + float(sorted_values[m])) / 2


def summarize(samples_ms: Sequence[float], batch: int = 1, wall_s: float | None = None) -> dict[str, Any]:
    """min/mean/median/p90/p95/p99/max (ms), throughput, CV and the noisy flag, as trtexec computes them.

    Throughput is trtexec's: inferences (batch x iterations) / the wall time they took (``wall_s``:
    the host time spent in the timed iterations; without it, the sum of the samples)."""
    if not samples_ms:
        raise ValueError("no samples")
    if not all(math.isfinite(t) for t in samples_ms):
        raise NonFiniteError("a timed iteration returned a non-finite latency")
    s = sorted(samples_ms)
    mean = statistics.fmean(s)
    std = statistics.pstdev(s) if len(s) > 1 else 0.0
    cv = std / mean if mean > 0 else 0.0
    wall = wall_s if wall_s is not None and wall_s > 0 else sum(s) / 1000.0
    out = {
        "n": len(s),
        "min": s[0],
        "mean": mean,
        "median": median(s),
        **{f"p{p}": percentile(s, p) for p in PERCENTILES},
        "max": s[-1],
        "std": std,
        "cv": cv,
        "noisy": cv > NOISY_CV,
        "wall_s": wall,
        "throughput_per_s": (batch * len(s) / wall) if wall > 0 else None,
    }
    return out


GPU_BACKENDS = ("ort-cuda", "ort-trt", "trt", "torch-cuda")


def metric_label(backend: str, include_copies: bool) -> str:
    """trtexec's name for what one timed iteration covers: GPU Compute Time (kernels only, the
    default) or Host Latency (with the host<->device copies); on a CPU backend simply Latency."""
    if backend in GPU_BACKENDS:
        return "Host Latency" if include_copies else "GPU Compute Time"
    return "Latency"


def trtexec_summary(latency_ms: Mapping[str, float], label: str = "Latency") -> str:
    """trtexec's one-line summary, number formatting included (C++ ostream defaults = %g):
    ``Latency: min = X ms, max = X ms, mean = X ms, median = X ms, percentile(90%) = X ms, ...``.
    trtexec calls the with-copies figure ``Latency``; kernels-only is ``GPU Compute Time``."""
    name = "Latency" if label in ("Latency", "Host Latency") else label
    parts = [f"{k} = {latency_ms[k]:g} ms" for k in ("min", "max", "mean", "median")]
    parts += [f"percentile({p:g}%) = {latency_ms[f'p{p}']:g} ms" for p in PERCENTILES]
    return f"{name}: " + ", ".join(parts)


def ratio_stats(samples: Sequence[float], reference: Sequence[float]) -> dict[str, float]:
    """Per-round ratio sample/reference (same round = same machine state): median, min, max."""
    ratios = sorted(a / b for a, b in zip(samples, reference) if b > 0)
    if not ratios:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "pairs": 0}
    return {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1], "pairs": len(ratios)}


# ------------------------------------------------------------------------------------------
# The measurement loop
# ------------------------------------------------------------------------------------------
def interleaved_rounds(
    timers: Sequence[Callable[[], float]],
    *,
    warmup_ms: float = 200.0,
    min_iterations: int = 10,
    min_duration_s: float = 3.0,
    clock: Callable[[], float] = time.perf_counter,
    on_round: Callable[[float], None] | None = None,
    walls: list[float] | None = None,
) -> list[list[float]]:
    """Warm each timer for ``warmup_ms`` of wall time, then call them in rounds t0 t1 ... t0 t1 ...

    Stops after the round in which both conditions hold: ``min_iterations`` rounds done and
    ``min_duration_s`` of wall time spent in the timed phase. Returns samples per timer (ms);
    ``walls``, when given, receives each timer's total host wall time in the timed phase (s).
    """
    if not timers:
        raise UsageError("nothing to benchmark")
    for timer in timers:
        t_end = clock() + warmup_ms / 1e3
        timer()  # at least once, even with --warmup-ms 0: first-call costs never enter the stats
        while clock() < t_end:
            timer()
    samples: list[list[float]] = [[] for _ in timers]
    spent = [0.0] * len(timers)
    start = clock()
    rounds = 0
    while True:
        for i, timer in enumerate(timers):
            t0 = clock()
            samples[i].append(float(timer()))
            spent[i] += clock() - t0
        rounds += 1
        if walls is not None:
            walls[:] = spent
        elapsed = clock() - start
        if on_round:
            on_round(elapsed)
        if rounds >= min_iterations and elapsed >= min_duration_s:
            return samples


# ------------------------------------------------------------------------------------------
# Environment record
# ------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo (platform.processor() is empty on most Linux systems)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("egp-deploy", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "torch", "tensorrt", "polygraphy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    try:  # JetPack installs tensorrt as a Debian package, invisible to importlib.metadata
        import tensorrt  # noqa: PLC0415

        out["tensorrt"] = tensorrt.__version__
    except Exception:  # noqa: BLE001 - optional
        pass
    return out


def collect_environment(backend_details: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Machine, GPU, library versions and per-runner backend facts (threads, providers, ...)."""
    from egp_deploy.build import gpu_identity

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    gpu = gpu_identity()
    cuda = None
    try:
        import torch

        cuda = torch.version.cuda
    except Exception:  # noqa: BLE001
        pass
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "gpu_name": gpu["name"],
        "gpu_compute_capability": gpu["compute_capability"],
        "gpu_driver": gpu["driver"],
        "cuda": cuda,
        "versions": _versions(),
        "backends": list(backend_details),
    }


# ------------------------------------------------------------------------------------------
# Benchmark of model files
# ------------------------------------------------------------------------------------------
def benchmark_models(
    model_paths: Sequence[str | Path],
    backend: str | None = None,
    settings: BenchSettings | None = None,
    *,
    progress: bool = False,
    keep_samples: bool = True,
) -> dict[str, Any]:
    """Benchmark one or more models side by side on one backend; returns the JSON-able report."""
    settings = settings or BenchSettings()
    settings.validate()
    if not model_paths:
        raise UsageError("give at least one model")
    runners: list[Runner] = []
    try:
        for path in model_paths:
            r = get_runner(backend, path, **applicable_options(
                backend, path, threads=settings.threads, precision=settings.precision,
                include_copies=settings.include_copies))
            r.load()
            runners.append(r)
        feeds_per_model = []
        for r in runners:
            specs = r.input_specs()
            shapes = resolve_input_shapes(specs, settings.batch, settings.shapes)
            feeds = random_inputs(specs, shapes, seed=settings.seed)
            r.prepare(feeds)
            feeds_per_model.append((specs, feeds))

        bar = None
        if progress:
            from egp_deploy.progress import progress_bar

            total = max(settings.min_duration_s, 1e-3)
            bar = progress_bar(total=total, unit="s", desc=f"timing {len(runners)} model(s)", leave=False,
                       bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s")

        last = [0.0]

        def on_round(elapsed: float) -> None:
            # refresh at most 5 times a second: the bar must not perturb what it reports
            if bar is not None and elapsed - last[0] >= 0.2:
                last[0] = elapsed
                bar.n = min(elapsed, bar.total)
                bar.refresh()

        walls: list[float] = []
        samples = interleaved_rounds(
            [r.time_once for r in runners], warmup_ms=settings.warmup_ms,
            min_iterations=settings.min_iterations, min_duration_s=settings.min_duration_s, on_round=on_round,
            walls=walls,
        )
        if bar is not None:
            bar.close()

        models = []
        warnings_: list[str] = []
        for i, (r, (specs, feeds), s) in enumerate(zip(runners, feeds_per_model, samples)):
            batch = next(iter(feeds.values())).shape[0] if feeds and next(iter(feeds.values())).ndim else 1
            stats = summarize(s, batch=batch, wall_s=walls[i] if i < len(walls) else None)
            label = metric_label(r.backend, settings.include_copies)
            entry = {
                "path": str(r.model_path),
                "name": r.model_path.name,
                "backend": r.backend,
                "inputs": [{"name": sp.name, "shape": list(feeds[sp.name].shape), "dtype": str(feeds[sp.name].dtype)}
                           for sp in specs],
                "batch": batch,
                "latency_ms": {k: stats[k] for k in ("min", "mean", "median", "p90", "p95", "p99", "max", "std")},
                "cv": stats["cv"],
                "noisy": stats["noisy"],
                "throughput_per_s": stats["throughput_per_s"],
                "wall_s": stats["wall_s"],
                "metric": label,
                "trtexec_summary": trtexec_summary(stats, label),
                "iterations": stats["n"],
                "ratio_to_first": ratio_stats(s, samples[0]),
                "backend_details": r.describe(),
            }
            if keep_samples:
                entry["samples_ms"] = s
            if stats["noisy"]:
                warnings_.append(
                    f"{r.model_path.name}: coefficient of variation {100 * stats['cv']:.1f} % > "
                    f"{100 * NOISY_CV:.1f} %: the machine is noisy, compare ratios rather than absolute times"
                )
            models.append(entry)
        return {
            "schema": SCHEMA,
            "settings": {**asdict(settings), "shapes": {k: [list(x) for x in v] for k, v in (settings.shapes or {}).items()},
                         "backend": ", ".join(dict.fromkeys(r.backend for r in runners)),
                         "interleaved": len(runners) > 1,
                         "percentile_rule": "sorted[max(n - 1 - int((1 - p/100) * n), 0)]",
                         "median_rule": "middle sample; mean of the two middle ones for an even count (trtexec)",
                         "throughput_rule": "batch x iterations / host wall time of the timed iterations (trtexec)"},
            "rounds": len(samples[0]),
            "environment": collect_environment([m["backend_details"] for m in models]),
            "models": models,
            "warnings": warnings_,
        }
    finally:
        for r in runners:
            r.close()


# ------------------------------------------------------------------------------------------
# Presentation
# ------------------------------------------------------------------------------------------
def print_table(report: Mapping[str, Any], console=None) -> None:
    """A rich table: one row per model, latency columns in ms, ratio to the first model."""
    from rich.console import Console
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    console = console or Console(highlight=False)
    if not console.is_terminal:  # piped/CI logs: do not squeeze the table into 80 columns
        console = Console(file=console.file, highlight=False, width=max(console.width, 160))
    env = report["environment"]
    first = report["models"][0]["backend_details"]
    threads = first.get("intra_op_threads")
    title = (f"{report['settings']['backend']} | {env['cpu_model']} ({env['cpu_usable']} usable cores"
             + (f", {threads} threads" if threads else "") + ")"
             + (f" | {env['gpu_name']}" if env.get("gpu_name") else "")
             + f" | {report['rounds']} rounds" + (" interleaved" if report['settings']['interleaved'] else "")
             + f" | {report['models'][0].get('metric', 'Latency')}")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    mixed = len({m["backend"] for m in report["models"]}) > 1
    table.add_column("model")
    if mixed:
        table.add_column("backend")
    for col in ("min", "median", "mean", "p90", "p95", "p99", "max"):
        table.add_column(f"{col} ms", justify="right")
    table.add_column("CV", justify="right")
    table.add_column("inf/s", justify="right")
    table.add_column("ratio (min-max)", justify="right")
    for m in report["models"]:
        lat, ratio = m["latency_ms"], m["ratio_to_first"]
        table.add_row(
            escape(m["name"]), *([m["backend"]] if mixed else []), *(f"{lat[c]:.3f}" for c in ("min", "median", "mean", "p90", "p95", "p99", "max")),
            f"{100 * m['cv']:.1f}%", f"{m['throughput_per_s']:.1f}",
            f"{ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f})",
        )
    console.print(table)
    for m in report["models"]:  # the lines scripts written for trtexec parse
        label = m.get("metric", "Latency")
        console.print(f"{escape(m['name'])} ({m['backend']}, {label}):", soft_wrap=True)
        console.print(f"Throughput: {m['throughput_per_s']:g} qps", soft_wrap=True)
        console.print(m.get("trtexec_summary") or trtexec_summary(m["latency_ms"], label), soft_wrap=True)
    for w in report.get("warnings", []):
        console.print(f"[yellow]warning:[/] {escape(w)}", soft_wrap=True)


def save_latency_plot(report: Mapping[str, Any], png_path: str | Path) -> Path:
    """Latency distribution per model (histogram) and per-round ratio to the first (PNG, atomic)."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures stay untouched

    from egp_deploy.io_utils import atomic_path

    models = [m for m in report["models"] if m.get("samples_ms")]
    if not models:
        raise UsageError("the report holds no samples to plot")
    fig = Figure(figsize=(11 if len(models) > 1 else 6, 4))
    axes = fig.subplots(1, 2 if len(models) > 1 else 1, squeeze=False)
    ax = axes[0][0]
    # shared bins up to the largest p99: the shape stays visible, the few outliers are counted aside
    lo = min(m["latency_ms"]["min"] for m in models)
    hi = max(m["latency_ms"]["p99"] for m in models)
    bins = [lo + (hi - lo) * i / 60 for i in range(61)] if hi > lo else 20
    for m in models:
        beyond = sum(1 for t in m["samples_ms"] if t > hi)
        ax.hist([t for t in m["samples_ms"] if t <= hi], bins=bins, alpha=0.6,
                label=f"{m['name']} (median {m['latency_ms']['median']:.3f} ms; {beyond} beyond plot)")
    ax.set_xlabel("latency per iteration [ms] (up to the largest p99)")
    ax.set_ylabel("iterations")
    ax.set_title(f"latency distribution ({report['settings']['backend']})")
    ax.legend(fontsize=8)
    if len(models) > 1:
        ax2 = axes[0][1]
        ref = models[0]["samples_ms"]
        for m in models[1:]:
            ax2.plot([a / b for a, b in zip(m["samples_ms"], ref)], ".", ms=2, label=f"{m['name']} / {models[0]['name']}")
        ax2.axhline(1.0, color="grey", lw=0.8)
        ax2.set_yscale("log")
        ax2.set_xlabel("round")
        ax2.set_ylabel("latency ratio to the first model")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return png_path


from egp_deploy._callable import make_callable  # noqa: E402  (egp_deploy.bench(...) is the API call)

make_callable(__name__)
