"""PyTorch -> ONE self-contained ONNX file, verified against PyTorch before it is written.

Sources, detected from the file's contents (never from its suffix):
    checkpoint      our egp-deploy checkpoint (torch.load weights_only=True)
    torchscript     a torch.jit.save archive: a program (loading runs its __setstate__ methods, and its
                    graph can call any operator, aten::from_file included), so only with unsafe_pickle=True
    exported        a torch.export .pt2 archive (checked by egp_deploy.pt2_archive before torch reads it)
    pickled         a fully pickled nn.Module: arbitrary code on load, so only with unsafe_pickle=True

The legacy TorchScript exporter (``dynamo=False``) is the default for modules: it is fast and
names nodes after module paths ("/layer1/layer1.0/conv1/Conv"). A .pt2 can only go through the
dynamo exporter, which records module scopes in node metadata instead. Either way the model's
metadata_props carry provenance and ``egp.node_modules`` maps ONNX node names to module names.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import pickle
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch
import torch.nn as nn

from egp_deploy import __version__
from egp_deploy.provenance import read_props, set_prop
from egp_deploy.errors import (
    BackendUnavailableError, InputFileError, NonFiniteError, UnsupportedError, UsageError, VerificationError,
    first_words,
)
from egp_deploy.io_utils import sha256_file, write_bytes_atomic
from egp_deploy.numeric import NOISE_FACTOR, relative_error
from egp_deploy.pt2_archive import UNSAFE_HINT

SOURCE_KINDS = ("checkpoint", "torchscript", "exported", "pickled")
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
LEGACY_OPSET = 17
DYNAMO_OPSET = 18  # the dynamo exporter implements >= 18; converting down fails on Reduce* axes
MAX_SINGLE_FILE_BYTES = 2**31 - 1  # protobuf's limit: beyond it ONNX needs external data
MAX_EXAMPLE_BYTES = 8 << 30  # an export example beyond this is a typo in --input-shape, not a model


@dataclass
class SourceModel:
    """A loaded model and what is known about it (input shape and metadata may be unknown)."""

    kind: str
    path: Path
    sha256: str
    module: Any  # nn.Module, torch.jit.ScriptModule or torch.export.ExportedProgram
    input_shape: tuple[int, ...] | None = None  # one sample, no batch dim
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    dynamic_batch: bool = False  # a .pt2 exported with a symbolic batch dim

    def callable(self) -> Any:
        return self.module.module() if self.kind == "exported" else self.module

    def module_names(self) -> set[str]:
        mod = self.callable()
        names = {n for n, _ in mod.named_modules() if n} if hasattr(mod, "named_modules") else set()
        state = self.module.state_dict if self.kind == "exported" else mod.state_dict()
        names |= {k.rsplit(".", 1)[0] for k in state if "." in k}
        return names


@dataclass
class ExportResult:
    model: onnx.ModelProto
    source: SourceModel
    input_shape: tuple[int, ...]  # full shape used for export (batch first)
    dynamic_batch: bool
    exporter: str  # "legacy" or "dynamo"
    opset: int
    max_rel_error: float
    checked_batches: list[int]
    seconds: dict[str, float]
    fp32_noise_floor: float | None = None  # measured only when the error exceeded rtol (ill-conditioned model)


# ---------------------------------------------------------------- loading


def _first_line(e: BaseException, limit: int = 200) -> str:
    return first_words(e, limit) if str(e).strip() else type(e).__name__


def detect_kind(path: str | os.PathLike) -> str:
    """'checkpoint-or-pickle' (a torch.save file), 'torchscript' or 'exported'; InputFileError otherwise."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"model file not found: {path}")
    if path.is_dir():
        raise InputFileError(f"{path} is a folder, expected a model file")
    size = path.stat().st_size
    if size == 0:
        raise InputFileError(f"{path} is empty")
    with open(path, "rb") as f:
        head = f.read(8)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise InputFileError(f"{path} is a corrupt zip archive ({_first_line(e)})") from None
        rel = {(n.split("/", 1)[1] if "/" in n else n).lower() for n in names}
        # a TorchScript file told for another kind still meets only loaders that run nothing
        # (weights-only torch.load refuses a TorchScript zip, the .pt2 check refuses code/ members)
        if any(n.startswith("code/") for n in rel) or "constants.pkl" in rel:
            return "torchscript"
        if "archive_format" in rel or any(n.startswith("models/") for n in rel) \
                or "serialized_exported_program.json" in rel:
            return "exported"
        if "data.pkl" in rel:
            return "checkpoint-or-pickle"
        raise InputFileError(f"{path} is a zip archive but not a PyTorch file (no data.pkl, code/ or models/)")
    if head.startswith(b"PK"):
        raise InputFileError(f"{path} is a truncated or corrupt zip archive (PyTorch files are zips)")
    if head[:1] == b"\x80":  # pickle protocol marker: torch.save's legacy (non-zip) format
        return "checkpoint-or-pickle"
    if _looks_like_onnx(path, size):
        raise InputFileError(f"{path} is already an ONNX model: run egp-surgery on it instead of egp-export")
    raise InputFileError(
        f"{path} is not a PyTorch model file (expected an egp-deploy checkpoint, TorchScript archive or .pt2)"
    )


def _looks_like_onnx(path: Path, size: int) -> bool:
    if size > MAX_SINGLE_FILE_BYTES:
        return False
    try:
        m = onnx.load_model(str(path), load_external_data=False)
    except Exception:
        return False
    return bool(m.graph.node) or m.ir_version > 0 and bool(m.opset_import)


def load_source(path: str | os.PathLike, unsafe_pickle: bool = False, trust_module: bool = False) -> SourceModel:
    """Load any supported source; every failure a user can cause is one InputFileError line.
    ``trust_module``: a checkpoint whose model reference is a ``package.module:factory`` may
    import it (that runs the module's code); refused otherwise, nothing imported."""
    path = Path(path)
    kind = detect_kind(path)
    digest = sha256_file(path)
    if kind == "torchscript":
        if not unsafe_pickle:  # decided from the member names alone: torch.jit.load already runs code
            raise InputFileError(f"{path} is a TorchScript archive, a program rather than data; {UNSAFE_HINT}")
        try:
            with _quiet():
                module = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as e:
            raise InputFileError(f"{path} is a damaged TorchScript archive ({_first_line(e)})") from None
        return SourceModel("torchscript", path, digest, module, arch=_class_name(module))
    if kind == "exported":
        from egp_deploy.pt2_archive import load_exported_program

        try:
            with _quiet():
                ep = load_exported_program(path, unsafe=unsafe_pickle)
        except InputFileError:
            raise
        except Exception as e:
            raise InputFileError(f"{path} is a damaged torch.export archive ({_first_line(e)})") from None
        shape, dynamic = _exported_input_shape(ep)
        return SourceModel("exported", path, digest, ep, input_shape=shape, dynamic_batch=dynamic)
    return _load_torch_save(path, digest, unsafe_pickle, trust_module)


def _load_torch_save(path: Path, digest: str, unsafe_pickle: bool, trust_module: bool = False) -> SourceModel:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # weights_only refuses classes: the file pickles code (an nn.Module or similar)
        if not unsafe_pickle:
            raise InputFileError(f"{path} is a pickled Python object, not a checkpoint; {UNSAFE_HINT}") from None
        return _load_pickled_module(path, digest)
    except (zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError) as e:
        raise InputFileError(f"{path} is a truncated or damaged PyTorch file ({_first_line(e)})") from None
    if isinstance(obj, dict) and obj.get("format") == "egp-deploy-checkpoint":
        from egp_deploy.archs.references import trusting
        from egp_deploy.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)
        with trusting(everything=trust_module):
            model = ckpt.build_model()
        return SourceModel(
            "checkpoint", path, digest, model, input_shape=tuple(ckpt.input_shape), arch=ckpt.arch,
            arch_kwargs=dict(ckpt.arch_kwargs), num_classes=ckpt.num_classes, metadata=dict(ckpt.metadata),
        )
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputFileError(
            f"{path} holds a bare state_dict (weights without an architecture); wrap it in an egp-deploy "
            "checkpoint (egp_deploy.checkpoint.checkpoint_from_model) or save a TorchScript/.pt2 model"
        )
    raise InputFileError(f"{path} is a torch.save file but not an egp-deploy checkpoint ({type(obj).__name__})")


def _load_pickled_module(path: Path, digest: str) -> SourceModel:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # unpickling foreign code can raise anything (missing class, import error)
        raise InputFileError(f"{path} could not be unpickled ({type(e).__name__}: {_first_line(e)})") from None
    if isinstance(obj, dict):
        obj = next((obj[k] for k in ("model", "module", "net") if isinstance(obj.get(k), nn.Module)), obj)
    if not isinstance(obj, nn.Module):
        raise InputFileError(f"{path} unpickles to a {type(obj).__name__}, not a torch.nn.Module")
    return SourceModel("pickled", path, digest, obj.eval(), arch=_class_name(obj))


def _class_name(module: Any) -> str:
    name = getattr(module, "original_name", None) or type(module).__name__
    return str(name)


def _exported_input_shape(ep: Any) -> tuple[tuple[int, ...] | None, bool]:
    """Sample shape of the program's single user input and whether its batch dim is symbolic."""
    users = [s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    if len(users) != 1:
        return None, False
    name = users[0].arg.name
    node = next((n for n in ep.graph.nodes if n.op == "placeholder" and n.name == name), None)
    val = node.meta.get("val") if node is not None else None
    if val is None or not hasattr(val, "shape"):
        return None, False
    dims = list(val.shape)
    static = [d for d in dims[1:] if isinstance(d, int)]
    if len(static) != len(dims) - 1:
        return None, False
    return tuple(int(d) for d in dims[1:]), not isinstance(dims[0], int)


@contextlib.contextmanager
def _quiet():
    """Silence exporter chatter (deprecation warnings, progress lines, version-converter logs)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


# ---------------------------------------------------------------- shapes


def parse_input_shape(text: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """'3,32,32' (or 3x32x32) -> (3, 32, 32); one sample, without the batch dim."""
    if text is None:
        return None
    if not isinstance(text, str):
        dims = tuple(int(d) for d in text)
    else:
        compact = text.replace(" ", "")
        parts = compact.split(",") if "," in compact else compact.split("x")
        try:
            dims = tuple(int(p) for p in parts)
        except ValueError:
            raise UsageError(f"--input-shape must be comma-separated positive integers like 3,32,32, got {text!r}") from None
    if not dims or any(d <= 0 for d in dims):
        raise UsageError(f"--input-shape must be positive integers like 3,32,32 (no batch dim), got {text!r}")
    return dims


# ---------------------------------------------------------------- export


def export_model(
    source: SourceModel,
    input_shape: Sequence[int] | None = None,
    dynamic_batch: bool = False,
    batch_size: int = 1,
    exporter: str = "auto",
    opset: int | None = None,
    rtol: float = 1e-4,
    seed: int = 0,
) -> ExportResult:
    """Export ``source`` to an in-memory ModelProto with provenance metadata, verified with onnxruntime.

    ``input_shape`` is one sample (no batch); it overrides the shape the source records.
    Raises VerificationError when onnxruntime disagrees with PyTorch beyond ``rtol`` (relative
    to the output's max magnitude; for an ill-conditioned model, beyond twice the graph's own fp32
    round-off if that is larger: see _verify_onnxruntime), NonFiniteError on NaN/Inf outputs.
    """
    if exporter not in ("auto", "legacy", "dynamo"):
        raise UsageError(f"exporter must be auto, legacy or dynamo, got {exporter!r}")
    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    names = input_names(source)
    if names is not None and len(names) != 1:  # exit 8, as from every command (egp-surgery, ...)
        raise UnsupportedError(f"the model takes {len(names)} inputs ({', '.join(names)}); egp-export supports exactly one")
    sample = tuple(input_shape) if input_shape else source.input_shape
    if sample is None:
        raise UsageError(f"the input shape of a {source.kind} model is not recorded in {source.path.name}: "
                         "pass --input-shape C,H,W")
    if source.kind == "exported":
        if exporter == "legacy":
            raise UnsupportedError("a torch.export .pt2 program can only be exported with the dynamo exporter")
        if source.input_shape is not None and tuple(sample) != tuple(source.input_shape):
            raise UsageError(f"--input-shape {','.join(map(str, sample))} differs from the shape the .pt2 program "
                             f"was exported with ({','.join(map(str, source.input_shape))})")
    timings: dict[str, float] = {}
    generator = torch.Generator().manual_seed(seed)
    need = batch_size * math.prod(sample) * 4 * 3  # the example, PyTorch's output and onnxruntime's copy
    if need > MAX_EXAMPLE_BYTES:
        raise UnsupportedError(f"a batch of {batch_size} inputs of shape {tuple(sample)} needs {need / 2**30:.0f} GiB "
                               f"(limit {MAX_EXAMPLE_BYTES >> 30} GiB): check --input-shape and --batch-size")
    example = torch.randn((batch_size, *sample), generator=generator)

    t0 = time.perf_counter()
    reference = _run_torch(source, example)
    timings["torch_forward"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    use_dynamo = exporter == "dynamo" or source.kind == "exported"
    if use_dynamo:
        model, used_opset = _export_dynamo(source, example, dynamic_batch, opset or DYNAMO_OPSET, len(reference))
        used = "dynamo"
    else:
        try:
            model, used_opset = _export_legacy(source, example, dynamic_batch, opset or LEGACY_OPSET, len(reference))
            used = "legacy"
        except Exception as e:
            if exporter == "legacy" or source.kind == "torchscript":
                raise UnsupportedError(f"ONNX export failed: {type(e).__name__}: {_first_line(e)}") from None
            model, used_opset = _export_dynamo(source, example, dynamic_batch, opset or DYNAMO_OPSET, len(reference))
            used = "dynamo"
    timings["export"] = time.perf_counter() - t0
    if model.ByteSize() > MAX_SINGLE_FILE_BYTES:
        raise UnsupportedError("the model exceeds 2 GB and cannot be one self-contained .onnx file")

    t0 = time.perf_counter()
    checks = [(example, reference)]
    if dynamic_batch:  # the symbolic batch must really accept another size
        other = torch.randn((batch_size + 2, *sample), generator=generator)
        checks.append((other, _run_torch(source, other)))
    max_rel, floor = _verify_onnxruntime(model, checks, rtol)
    timings["verify"] = time.perf_counter() - t0

    _attach_metadata(model, source, tuple(sample), dynamic_batch, used, used_opset, max_rel, floor)
    return ExportResult(
        model=model, source=source, input_shape=(batch_size, *sample), dynamic_batch=dynamic_batch,
        exporter=used, opset=used_opset, max_rel_error=max_rel, checked_batches=[int(x.shape[0]) for x, _ in checks],
        seconds=timings, fp32_noise_floor=floor,
    )


def _flatten_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        flat: list[torch.Tensor] = []
        for o in out:
            flat += _flatten_outputs(o)
        return flat
    raise UnsupportedError(f"the model returns a {type(out).__name__}; only tensors (or tuples of them) export")


def input_names(source: SourceModel) -> list[str] | None:
    """Names of the tensors the model's forward takes (None when they cannot be read)."""
    import inspect

    if source.kind == "exported":
        return [s.arg.name for s in source.module.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    if source.kind == "torchscript":
        try:
            return [a.name for a in source.module.forward.schema.arguments[1:]]
        except (AttributeError, RuntimeError):
            return None
    try:
        params = inspect.signature(source.module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    return [p.name for p in params if p.default is inspect.Parameter.empty
            and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]


def _run_torch(source: SourceModel, x: torch.Tensor) -> list[np.ndarray]:
    fn = source.callable()
    try:
        with torch.no_grad(), _quiet():
            out = _flatten_outputs(fn(x))
    except UnsupportedError:
        raise
    except Exception as e:
        raise UsageError(
            f"the model does not accept input of shape {tuple(x.shape)} "
            f"({type(e).__name__}: {_first_line(e, 160)}); check --input-shape"
        ) from None
    arrays = [o.detach().float().cpu().numpy() for o in out]
    if not all(np.isfinite(a).all() for a in arrays):
        raise NonFiniteError("the PyTorch model produces NaN/Inf on random normal inputs")
    return arrays


def _output_names(n: int) -> list[str]:
    return [OUTPUT_NAME] + [f"output_{i}" for i in range(1, n)]


def _export_legacy(source: SourceModel, example: torch.Tensor, dynamic: bool, opset: int,
                   n_outputs: int) -> tuple[onnx.ModelProto, int]:
    names = _output_names(n_outputs)
    axes = {n: {0: "batch"} for n in [INPUT_NAME, *names]} if dynamic else None
    buf = io.BytesIO()
    with _quiet():
        torch.onnx.export(
            source.callable(), (example,), buf, dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=[INPUT_NAME], output_names=names, dynamic_axes=axes,
        )
    return onnx.load_model_from_string(buf.getvalue()), opset


def _export_dynamo(source: SourceModel, example: torch.Tensor, dynamic: bool, opset: int,
                   n_outputs: int) -> tuple[onnx.ModelProto, int]:
    if source.kind == "torchscript":
        raise UnsupportedError("a TorchScript archive can only be exported with the legacy exporter")
    names = _output_names(n_outputs)
    target: Any = source.module
    dynamic_shapes = None
    if source.kind == "exported":
        if dynamic and not source.dynamic_batch:
            # the traced program has the batch baked into its ops (views, guards): it cannot be widened
            raise UnsupportedError(
                f"{source.path.name} was exported with a static batch; re-export it with "
                "dynamic_shapes={'x': {0: Dim('batch')}} or drop --dynamic-batch"
            )
    elif dynamic:
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},)
        if example.shape[0] == 1:  # an example batch of 1 would be specialised to a constant
            example = torch.cat([example, example])
    try:
        with _quiet():
            program = torch.onnx.export(
                target, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME], output_names=names,
                dynamic_shapes=dynamic_shapes, verbose=False, optimize=True,
            )
    except UnsupportedError:
        raise
    except Exception as e:
        raise UnsupportedError(f"ONNX export (dynamo) failed: {type(e).__name__}: {_first_line(e)}") from None
    model = program.model_proto
    if source.kind == "exported" and source.dynamic_batch and not dynamic:
        _pin_batch(model, int(example.shape[0]))
    elif dynamic:
        _name_batch_dim(model)
    used = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    return model, int(used)


def _pin_batch(model: onnx.ModelProto, batch: int) -> None:
    """Give the graph's inputs and outputs a static batch (the program itself stays shape-generic)."""
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    del model.graph.value_info[:]


def _name_batch_dim(model: onnx.ModelProto) -> None:
    """Call the input's symbolic batch dim "batch" (dynamo names it s0, s77, ...) everywhere it occurs."""
    dims = model.graph.input[0].type.tensor_type.shape.dim if model.graph.input else []
    old = dims[0].dim_param if dims and dims[0].HasField("dim_param") else None
    if not old:
        return
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param == old:
                d.dim_param = "batch"


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """numeric.relative_error (max |got - want| / max |want|) as one figure; inf when shapes differ."""
    return math.inf if got.shape != want.shape else relative_error(got, want)[2]


def _verify_onnxruntime(model: onnx.ModelProto, checks: list[tuple[torch.Tensor, list[np.ndarray]]],
                        rtol: float) -> tuple[float, float | None]:
    """Worst relative error of onnxruntime against PyTorch over ``checks``, and the graph's own fp32
    round-off when it had to be measured (None otherwise).

    An ill-conditioned model (a half-collapsed network whose outputs are small differences of large
    terms) can miss ``rtol`` although the graph is right: it is then judged, like the surgery's
    rewrites, against ``NOISE_FACTOR`` x its own disagreement between two onnxruntime kernel choices.
    """
    from egp_deploy.runners.ort import fp32_noise_floor, open_session

    try:
        session = open_session(model, threads=min(2, os.cpu_count() or 1))
    except BackendUnavailableError:
        raise
    except Exception as e:
        raise VerificationError(f"onnxruntime cannot load the exported graph: {_first_line(e)}") from None
    worst, floor = 0.0, None
    for x, want in checks:
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        if len(got) != len(want):
            raise VerificationError(f"exported graph has {len(got)} outputs, PyTorch {len(want)}")
        if not all(np.isfinite(g).all() for g in got):
            raise NonFiniteError(f"onnxruntime produced NaN/Inf on batch {x.shape[0]} where PyTorch did not")
        errs = [_relative_error(g, w) for g, w in zip(got, want)]
        err, limit = max(errs), rtol
        if not err <= rtol and all(g.shape == w.shape for g, w in zip(got, want)):
            measured = fp32_noise_floor(model, x.numpy(), got, batch_size=int(x.shape[0]))
            floor = max(floor or 0.0, measured)
            limit = max(rtol, NOISE_FACTOR * measured)
        worst = max(worst, err)
        if not err <= limit:
            shapes = ", ".join(f"{tuple(g.shape)} vs {tuple(w.shape)}" for g, w in zip(got, want))
            own = f"; the graph's own fp32 round-off is {floor:.3g}" if floor is not None else ""
            raise VerificationError(
                f"exported graph differs from PyTorch: relative error {err:.3g} > {limit:.3g} "
                f"(batch {x.shape[0]}, output shape {shapes}{own})"
            )
    return worst, floor


# ---------------------------------------------------------------- provenance


def node_module_map(model: onnx.ModelProto, module_names: set[str] | None = None) -> dict[str, str]:
    """ONNX node name -> PyTorch module name, for every node whose module can be recovered.

    Dynamo graphs: the weight's parameter name ("layer1.0.conv1.weight"), else the innermost module
    scope in the node metadata. Legacy graphs: the scope path of the node name, where each part is
    either relative ("conv1") or already qualified ("layer1.0").
    """
    init_names = {t.name for t in model.graph.initializer}
    mapping: dict[str, str] = {}
    for node in model.graph.node:
        if not node.name:
            continue
        found = _module_from_weight(node, init_names, module_names)
        if found is None:
            scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
            found = _module_from_scopes(scopes, module_names) if scopes else _module_from_path(node.name, module_names)
        if found:
            mapping[node.name] = found
    return mapping


def _module_from_weight(node: onnx.NodeProto, init_names: set[str], modules: set[str] | None) -> str | None:
    if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
        return None
    for name in node.input[1:2] if node.op_type != "MatMul" else node.input[:2]:
        if name in init_names and name.endswith(".weight"):
            mod = name[: -len(".weight")]
            if modules is None or mod in modules:
                return mod
    return None


def _module_from_scopes(text: str, modules: set[str] | None) -> str | None:
    try:
        scopes = [s for s in json.loads(text.replace("'", '"')) if s]
    except ValueError:
        return None
    candidates = scopes[:-1] if len(scopes) > 1 else scopes  # the last scope is the aten op itself
    if modules is not None:
        known = [s for s in candidates if s in modules]
        return known[-1] if known else None
    return candidates[-1] if candidates else None


def _module_from_path(name: str, modules: set[str] | None) -> str | None:
    parts = [p for p in name.split("/") if p][:-1]  # the last part is the op ("Conv", "Relu_1")
    if not parts or not name.startswith("/"):
        return None
    qualified, last = "", ""
    for part in parts:
        # Sequential children are scoped as "<container>.<index>" under "<container>"
        if last and part.startswith(last + "."):
            qualified = qualified[: len(qualified) - len(last)] + part
        else:
            qualified = f"{qualified}.{part}" if qualified else part
        last = part
    if modules is not None and qualified not in modules:
        return None
    return qualified


def _weight_sparsity(source: SourceModel) -> dict[str, Any]:
    """Fraction of exact zeros over conv/linear weights (>= 2-D tensors named *.weight)."""
    state = source.module.state_dict if source.kind == "exported" else source.callable().state_dict()
    total = zeros = 0
    for name, t in state.items():
        if name.endswith("weight") and isinstance(t, torch.Tensor) and t.dim() >= 2 and t.is_floating_point():
            total += t.numel()
            zeros += int((t == 0).sum())
    return {"weights": total, "zero_weights": zeros, "sparsity": zeros / total if total else 0.0}


def _metadata_entry(meta: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if k in meta and meta[k] is not None:
            return meta[k]
    return None


def _attach_metadata(model: onnx.ModelProto, source: SourceModel, sample: tuple[int, ...], dynamic: bool,
                     exporter: str, opset: int, max_rel: float, noise_floor: float | None = None) -> None:
    meta = source.metadata or {}
    sparsity = _weight_sparsity(source)
    props: dict[str, Any] = {
        "version": __version__,
        "source_file": source.path.name,
        "source_sha256": source.sha256,
        "source_kind": source.kind,
        "arch": source.arch or "",
        "arch_kwargs": source.arch_kwargs,
        "num_classes": source.num_classes,
        "input_shape": list(sample),
        "dynamic_batch": dynamic,
        "sparsity": sparsity["sparsity"],
        "weight_counts": {"weights": sparsity["weights"], "zero_weights": sparsity["zero_weights"]},
        "recorded_sparsity": _metadata_entry(meta, "sparsity"),
        "entropy": _metadata_entry(meta, "entropy", "layer_entropy", "entropy_per_layer", "entropies"),
        "data": _metadata_entry(meta, "data", "data_spec", "dataset"),
        "export": {"exporter": exporter, "opset": opset, "max_rel_error_vs_torch": max_rel,
                   "fp32_noise_floor": noise_floor, "torch": torch.__version__, "onnx": onnx.__version__},
        "node_modules": node_module_map(model, source.module_names()),
    }
    for key, value in props.items():
        set_prop(model, key, value)
    if meta:
        try:
            set_prop(model, "checkpoint_metadata", meta)
        except (TypeError, ValueError):
            pass


read_metadata = read_props  # the ``egp.*`` metadata_props, JSON-decoded (one reader, in provenance.py)


# ---------------------------------------------------------------- one call


def check_output_path(source_path: str | os.PathLike, out_path: str | os.PathLike) -> None:
    """Before any work: ``out_path`` is not the source (symlinks and hard links resolved), not a
    folder, and can be written (its nearest existing parent is a writable folder)."""
    from egp_deploy.validation import check_outputs

    check_outputs([source_path], {"output path": out_path})


def export_file(
    source_path: str | os.PathLike,
    out_path: str | os.PathLike,
    input_shape: Sequence[int] | None = None,
    dynamic_batch: bool = False,
    unsafe_pickle: bool = False,
    trust_module: bool = False,
    **kw: Any,
) -> ExportResult:
    """Load, export, verify, then write ``out_path`` atomically (nothing is written on failure)."""
    check_output_path(source_path, out_path)
    source = load_source(source_path, unsafe_pickle=unsafe_pickle, trust_module=trust_module)
    result = export_model(source, input_shape=input_shape, dynamic_batch=dynamic_batch, **kw)
    t0 = time.perf_counter()
    write_bytes_atomic(out_path, result.model.SerializeToString())
    result.seconds["write"] = time.perf_counter() - t0
    return result


from egp_deploy._callable import make_callable  # noqa: E402  (egp_deploy.export(...) is the API call)

make_callable(__name__)
