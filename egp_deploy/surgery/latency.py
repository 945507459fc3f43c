"""Measured cost for the chain merge planner, and the latency table that keeps the measurements.

With ``cost="latency"`` every candidate segment (merged, and each layer on its own) is built as a
tiny ONNX graph at its real shape (batch 1, random weights: fp32 dense kernels do not care about
values) and timed on the target backend, all graphs round-robin in one loop so that drifts of a
noisy machine hit them alike. A segment's cost is its median time minus that of an empty graph
(the per-call overhead, which a merged layer pays once and separate layers would pay each); a
merged segment counts (1 + margin) times its cost, so a merge is taken only when it is faster by
the margin.

The table is JSON: the backend, the device and the library versions it was measured with, and one
entry per graph signature (ops, shapes, attributes). It is reused on the next run and can be
carried: a table measured on the target device plans surgeries anywhere, as long as it holds every
timing the model needs (what it lacks can only be measured on that device).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from egp_deploy.errors import BackendUnavailableError, EgpError, InputFileError, UsageError
from egp_deploy.surgery.chain_merge import Affine, Candidate, Chain

TABLE_FORMAT = "egp-deploy latency table"
TABLE_VERSION = 1
LATENCY_BACKENDS = ("ort-cpu", "ort-cuda", "ort-trt")
WARMUP = 3


# ---------------------------------------------------------------- environment
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - only a label
        pass
    return "CUDA device 0"


def environment(backend: str, threads: int) -> tuple[str, dict[str, str]]:
    """(device, library versions) that a timing depends on."""
    if backend not in LATENCY_BACKENDS:
        raise UsageError(f"--backend {backend!r} cannot time candidate merges; choose one of {', '.join(LATENCY_BACKENDS)}")
    from egp_deploy.runners.ort import import_onnxruntime

    ort = import_onnxruntime("cpu" if backend == "ort-cpu" else "gpu")
    versions = {"onnxruntime": ort.__version__}
    device = f"{_cpu_name()}, {threads} thread{'s' if threads != 1 else ''}" if backend == "ort-cpu" else _gpu_name()
    if backend == "ort-trt":
        try:
            import tensorrt

            versions["tensorrt"] = tensorrt.__version__
        except ImportError:
            pass
    return device, versions


def default_table_path(backend: str, device: str, versions: dict[str, str]) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "egp-deploy" / "latency"
    digest = hashlib.sha1(json.dumps([device, versions], sort_keys=True).encode()).hexdigest()[:12]
    return root / f"{backend}-{digest}.json"


# ---------------------------------------------------------------- the table
MAX_TABLE_BYTES = 64 << 20  # ~200k timings; a bigger "table" is not one


class LatencyTable:
    def __init__(self, backend: str, device: str, versions: dict[str, str], path: Path | None = None,
                 entries: dict[str, dict[str, Any]] | None = None, foreign: bool = False,
                 cache: bool = False) -> None:
        self.backend, self.device, self.versions = backend, device, versions
        self.path, self.entries, self.foreign = path, entries or {}, foreign
        self.cache = cache  # the per-device cache, not a file the user named: never worth losing a result for
        self.added = 0
        self.warnings: list[str] = []

    @classmethod
    def open(cls, path: Path | None, backend: str, device: str, versions: dict[str, str],
             cache: bool = False) -> LatencyTable:
        """The table at ``path`` (a new one if the file does not exist). A corrupt file is InputFileError,
        one measured with another backend UsageError; one from another device or library versions is
        read-only (``foreign``). The per-device ``cache`` is never an error: a cache that cannot be
        read is started afresh and one that cannot be written is used without saving, each with a
        warning (``warnings``), decided here, before any work."""
        if path is None:
            return cls(backend, device, versions)
        path = Path(path)
        try:
            table = cls._read(path, backend, device, versions) if os.path.lexists(path) else \
                cls(backend, device, versions, path)
        except EgpError as e:
            if not cache:
                raise
            table = cls(backend, device, versions, path)
            table.warnings.append(f"latency cache ignored: {e}")
        table.cache = cache
        if cache and not table.foreign:
            problem = _unwritable(path)
            if problem:
                table.warnings.append(f"{problem}: this run's latency timings will not be kept for the next one")
                table.path = None
        return table

    @classmethod
    def _read(cls, path: Path, backend: str, device: str, versions: dict[str, str]) -> LatencyTable:
        from egp_deploy.io_utils import read_json_file

        data = read_json_file(path, "latency table", MAX_TABLE_BYTES)
        problem = _schema_problem(data)
        if problem:
            raise InputFileError(f"latency table {path} is corrupt: {problem}")
        if data["backend"] != backend:
            raise UsageError(f"latency table {path} was measured with backend {data['backend']}, not --backend "
                             f"{backend}: pass a table of {backend} or another --latency-table path")
        foreign = data["device"] != device or data["versions"] != versions
        entries = {k: {"ms": float(e["ms"]), **({"rounds": e["rounds"]} if _is_count(e.get("rounds")) else {})}
                   for k, e in data["entries"].items()}
        return cls(backend, data["device"], data["versions"], path, entries, foreign)

    def describe(self) -> dict[str, Any]:
        return {"path": None if self.path is None else os.fspath(self.path), "backend": self.backend,
                "device": self.device, "versions": self.versions, "entries": len(self.entries),
                "added": self.added, "foreign": self.foreign}

    def save(self) -> bool:
        """Write the table (atomically) when it gained entries; True if written. A write that fails
        (a full disk, a folder made read-only meanwhile) is a warning: the timings are a by-product,
        the surgery's result does not depend on them being kept."""
        if self.path is None or not self.added or self.foreign:
            return False
        from egp_deploy.io_utils import write_json_atomic

        try:
            write_json_atomic(self.path, {"format": TABLE_FORMAT, "version": TABLE_VERSION, "backend": self.backend,
                                          "device": self.device, "versions": self.versions,
                                          "entries": dict(sorted(self.entries.items()))})
        except (OSError, EgpError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            self.warnings.append(f"latency {'cache' if self.cache else 'table'} {self.path} not written "
                                 f"({reason}): this run's {self.added} new timings are not kept")
            return False
        return True


def _unwritable(path: Path) -> str | None:
    """Why ``path`` cannot be (re)written as a regular file, or None."""
    from egp_deploy.validation import check_outputs

    if os.path.lexists(path) and not path.is_file():
        return f"latency cache {path} is not a regular file"
    try:
        check_outputs([], {"latency cache": path})
    except UsageError as e:
        return str(e)
    return None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10**9


def _schema_problem(data: Any) -> str | None:
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
        return f"not an {TABLE_FORMAT} (no \"format\": \"{TABLE_FORMAT}\")"
    if data.get("version") != TABLE_VERSION:
        return f"version {repr(data.get('version'))[:40]}, this egp-deploy reads version {TABLE_VERSION}"
    for key, kind in (("backend", str), ("device", str), ("versions", dict), ("entries", dict)):
        if not isinstance(data.get(key), kind):
            return f"field {key!r} missing or not a {kind.__name__}"
    if not all(isinstance(v, str) for v in data["versions"].values()):
        return "field 'versions' holds a value that is not a string"
    for key, entry in data["entries"].items():
        ms = entry.get("ms") if isinstance(entry, dict) else None
        if not isinstance(ms, (int, float)) or isinstance(ms, bool) or not _finite(ms) or ms < 0:
            return f"entry {key[:60]!r} has no finite non-negative \"ms\""
    return None


def _finite(x: float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int of 400 digits: finite, but no time
        return False


# ---------------------------------------------------------------- tiny graphs
def layer_spec(m: Affine) -> dict[str, Any]:
    if m.kind == "gemm":
        return {"op": "Gemm", "in": [1, m.cin], "out": m.cout}
    return {"op": "Conv", "in": [1, m.cin, *m.in_spatial], "out": [1, m.cout, *m.out_spatial],
            "w": [m.cout, m.cin // m.group, *m.kernel], "group": m.group, "strides": list(m.strides),
            "pads": list(m.pads), "dilations": list(m.dilations), "border": bool(m.border)}


def span_spec(chain: Chain, a: int, b: int, merged: Affine | None, folds: bool) -> list[dict[str, Any]]:
    """Ops of segment a..b: the merged layer, or (merged None) the layers as they are with their Adds.

    An Add item {"op": "Add", "skip": k} adds the tensor that layer k read (k relative to a; -1: a
    second graph input, the skip of a residual that starts before the segment)."""
    if merged is not None:
        ops = [layer_spec(merged)]
        start = chain.residual_start(b)
        if start is not None and not folds:
            ops.append({"op": "Add", "skip": -1})
        return ops
    ops = []
    for k in range(a, b + 1):
        ops.append(layer_spec(chain.layers[k]))
        start = chain.residual_start(k)
        if start is not None:
            ops.append({"op": "Add", "skip": start - a if start >= a else -1})
    return ops


def signature(ops: list[dict[str, Any]]) -> str:
    return json.dumps(ops, sort_keys=True, separators=(",", ":"))


def build_graph(ops: list[dict[str, Any]], seed: int = 0) -> onnx.ModelProto:
    """An ONNX model running ``ops`` at their shapes with random weights (for timing only)."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    shape = ops[0]["in"] if ops else [1, 1]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)]
    cur, layer_inputs, n = "x", [], 0

    def const(values: np.ndarray) -> str:
        name = f"c{len(inits)}"
        inits.append(numpy_helper.from_array(values.astype(np.float32), name))
        return name

    for op in ops:
        n += 1
        out = f"t{n}"
        if op["op"] == "Conv":
            layer_inputs.append(cur)
            w = const(rng.standard_normal(op["w"]) * 0.1)
            nodes.append(helper.make_node("Conv", [cur, w, const(rng.standard_normal(op["w"][0]))], [out],
                                          group=op["group"], strides=op["strides"], pads=op["pads"],
                                          dilations=op["dilations"], kernel_shape=op["w"][2:]))
            shape = op["out"]
            if op.get("border"):
                cur, out, n = out, f"t{n + 1}", n + 1
                nodes.append(helper.make_node("Add", [cur, const(rng.standard_normal(shape))], [out]))
        elif op["op"] == "Gemm":
            layer_inputs.append(cur)
            nodes.append(helper.make_node("Gemm", [cur, const(rng.standard_normal((op["in"][1], op["out"]))),
                                                   const(rng.standard_normal(op["out"]))], [out]))
            shape = [1, op["out"]]
        elif op["op"] == "Add":
            if op["skip"] < 0:
                inputs.append(helper.make_tensor_value_info("skip", TensorProto.FLOAT, shape))
                skip = "skip"
            else:
                skip = layer_inputs[op["skip"]]
            nodes.append(helper.make_node("Add", [cur, skip], [out]))
        else:
            raise ValueError(f"unknown op {op['op']!r}")
        cur = out
    if not nodes:  # the empty graph: per-call overhead
        nodes.append(helper.make_node("Identity", ["x"], ["t1"]))
        cur = "t1"
    graph = helper.make_graph(nodes, "egp_latency_probe", inputs,
                              [helper.make_tensor_value_info(cur, TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


# ---------------------------------------------------------------- the cost model
class LatencyCost:
    """Prices candidates by measured latency on ``backend`` (see the module docstring)."""

    name = "latency"

    def __init__(self, backend: str = "ort-cpu", table: str | os.PathLike | None = None, margin: float = 0.05,
                 threads: int = 1, rounds: int = 30, default_table: bool = True) -> None:
        if margin < 0:
            raise UsageError(f"latency margin must be >= 0, got {margin}")
        if rounds < 1:
            raise UsageError(f"latency rounds must be >= 1, got {rounds}")
        self.backend, self.margin, self.threads, self.rounds = backend, margin, threads, rounds
        device, versions = environment(backend, threads)
        self._check_backend_runs()
        path = Path(table) if table is not None else (default_table_path(backend, device, versions)
                                                      if default_table else None)
        self.table = LatencyTable.open(path, backend, device, versions, cache=table is None)
        self.here = device
        self.measure_s = 0.0
        self.measured = 0
        self.reused = 0
        self.lacking: set[str] | None = None  # while planning (planning()): timings a foreign table lacks

    @property
    def warnings(self) -> list[str]:
        return self.table.warnings

    @contextlib.contextmanager
    def planning(self):
        """A dry run of the planner: timings a foreign table lacks are collected in the yielded set
        (their merges priced as not worth it) instead of refused one chain at a time mid-surgery."""
        self.lacking = set()
        try:
            yield self.lacking
        finally:
            self.lacking = None

    def _check_backend_runs(self) -> None:
        """BackendUnavailableError now, before any work, when the backend cannot start here."""
        self._time_graphs({"probe": build_graph([])}, rounds=1)

    def describe(self) -> dict[str, Any]:
        return {"cost": "latency", "backend": self.backend, "margin": self.margin, "threads": self.threads,
                "rounds": self.rounds, "measured_graphs": self.measured, "graphs_from_table": self.reused,
                "measure_s": round(self.measure_s, 3), "table": self.table.describe()}

    def save(self) -> bool:
        return self.table.save()

    def price(self, chains: list[tuple[Chain, list[Candidate]]]) -> None:
        specs: dict[str, list[dict[str, Any]]] = {signature([]): []}
        jobs = []
        for chain, cands in chains:
            for c in cands:
                merged = span_spec(chain, c.a, c.b, c.geometry, c.folds_residual) if c.merges else None
                alone = span_spec(chain, c.a, c.b, None, False)
                keys = [signature(alone)] + ([signature(merged)] if merged is not None else [])
                specs.update({signature(alone): alone})
                if merged is not None:
                    specs[signature(merged)] = merged
                jobs.append((c, keys))
        missing = [k for k in specs if k not in self.table.entries]
        if missing and self.table.foreign:
            if self.lacking is None:
                raise self.lacks_timings(len(missing), len(specs))
            self.lacking.update(missing)
            self._price(jobs, set(missing))
            return
        if self.lacking is None:  # a dry plan reuses nothing for the report
            self.reused += len(specs) - len(missing)
        if missing:
            t0 = time.perf_counter()
            times = self._time_graphs({k: build_graph(specs[k]) for k in missing}, self.rounds)
            self.measure_s += time.perf_counter() - t0
            self.measured += len(missing)
            self.table.added += len(missing)
            for k, ms in times.items():
                self.table.entries[k] = {"ms": ms, "rounds": self.rounds}
        self._price(jobs, {})

    def lacks_timings(self, lacking: int, needed: int | None = None) -> UsageError:
        of = f" of the {needed}" if needed is not None else ""
        return UsageError(
            f"latency table {self.table.path} was measured on {self.table.device} "
            f"({_versions(self.table.versions)}), this machine is {self.here}: it lacks {lacking}{of} timings "
            "this model's merge plan needs, and those can only be measured there")

    def _price(self, jobs, lacking: set[str] = frozenset()) -> None:
        """Set each candidate's cost from the table; while planning dry, a timing the table
        ``lacking`` counts 0 for layers apart and infinity for a merge (an unknown merge is never
        chosen, so the dry plan follows the real one up to the first timing it lacks)."""
        entries = self.table.entries
        overhead = 0.0 if signature([]) in lacking else entries[signature([])]["ms"]

        def ms(key: str, unknown: float) -> float:
            return unknown if key in lacking else max(entries[key]["ms"] - overhead, 0.0)

        for c, keys in jobs:
            t_alone = ms(keys[0], 0.0)
            if c.merges:
                t_merged = ms(keys[1], math.inf)
                c.cost = t_merged * (1.0 + self.margin) if c.b > c.a else t_merged
                c.info = {"ms_merged": round(t_merged, 5), "ms_span": round(t_alone, 5)}
            else:
                c.cost = t_alone
                c.info = {"ms": round(t_alone, 5)}

    def _time_graphs(self, graphs: dict[str, onnx.ModelProto], rounds: int) -> dict[str, float]:
        """Median ms per graph, all graphs timed round-robin (interleaved)."""
        from egp_deploy.runners.ort import OrtRunner

        runners = {}
        with tempfile.TemporaryDirectory(prefix="egp_latency_") as tmp:
            try:
                for i, (key, model) in enumerate(graphs.items()):
                    path = Path(tmp) / f"g{i}.onnx"
                    onnx.save(model, path)
                    r = OrtRunner(path, backend=self.backend, threads=self.threads).load()
                    feeds = {s.name: np.random.default_rng(i).standard_normal(s.shape).astype(np.float32)
                             for s in r.input_specs()}
                    r.prepare(feeds)
                    for _ in range(WARMUP):
                        r.time_once()
                    runners[key] = r
                samples: dict[str, list[float]] = {k: [] for k in runners}
                order = list(runners)
                for rnd in range(rounds):
                    for k in (order if rnd % 2 == 0 else order[::-1]):
                        samples[k].append(runners[k].time_once())
            except BackendUnavailableError:
                raise
            finally:
                for r in runners.values():
                    r.close()
        return {k: float(np.median(v)) for k, v in samples.items()}


def _versions(v: dict[str, str]) -> str:
    return ", ".join(f"{k} {x}" for k, x in sorted(v.items())) or "no versions"


# SurgeryOptions fields that only the latency cost model reads, with egp-surgery's flag for each
LATENCY_OPTIONS = {"latency_backend": "--backend", "latency_table": "--latency-table",
                   "latency_margin": "--latency-margin", "latency_threads": None, "latency_rounds": None}


def make_cost_model(options, inputs: Iterable[str | os.PathLike | None] = (),
                    outputs: Mapping[str, str | os.PathLike | None] | None = None) -> Any:
    """The planner's cost model for SurgeryOptions, every cost option checked here, before any work:
    latency options need ``cost="latency"`` (UsageError, never silently ignored); a latency table
    named by the user is neither one of the job's ``inputs`` nor one of its ``outputs`` (``{what:
    path}``) and can be written (UsageError); a table that cannot be read is InputFileError; a
    backend that cannot run here BackendUnavailableError. The per-device cache is never an error
    (:meth:`LatencyTable.open`)."""
    from egp_deploy.surgery import SurgeryOptions
    from egp_deploy.surgery.chain_merge import MacCost
    from egp_deploy.validation import check_outputs

    if options.cost not in ("macs", "latency"):
        raise UsageError(f"cost must be 'macs' or 'latency', got {options.cost!r}")
    if options.cost == "macs":
        defaults = SurgeryOptions()
        given = [f"{name} ({flag})" if flag else name for name, flag in LATENCY_OPTIONS.items()
                 if getattr(options, name) != getattr(defaults, name)]
        if given:
            raise UsageError(f"{', '.join(given)} only applies to merges timed with cost latency "
                             "(egp-surgery --cost latency, egp-export --set cost=latency); it would be ignored")
        return MacCost(options.max_mac_growth)
    if options.latency_table is not None:  # read and extended: an output that is none of the job's files
        check_outputs(inputs, {**(outputs or {}), "latency table": options.latency_table})
    return LatencyCost(options.latency_backend, options.latency_table, options.latency_margin,
                       options.latency_threads, options.latency_rounds)
