"""Activation sites and the prunable layers that feed them, found from the model's graph.

A site is one call of a rectifier-like activation: a module (ReLU, ReLU6, Hardtanh(0, 6),
LeakyReLU, PReLU, GELU, SiLU) or a functional call (``F.relu``, ``torch.relu``, ``x.relu()``,
``F.relu6``, ``F.hardtanh(x, 0, 6)``, ``F.leaky_relu``, ``F.prelu``, ``F.gelu``, ``F.silu``, in-place
variants). A module called twice in one forward (torchvision's ResNet blocks share one ReLU) is
two sites. Its prunable layer (the "feeder") is the Conv/Linear whose output reaches the site's
input through value- and shape-preserving per-channel ops (BatchNorm, Identity, Dropout,
``contiguous``, a gate multiplication ``x * g(x)`` as in squeeze-excite). For an activation after
a residual add the feeder is the last layer of the residual BRANCH, told from the shortcut by
structure alone: walking back from the add, the branch holds an activation before the point
where the two operands fork, the shortcut (the identity or a projection) holds none. An add
where both or neither operand does is ambiguous and feeds nothing prunable. Layers feeding no
site (shortcut projections, the classifier, attention projections feeding a matmul/softmax, the
second MLP linear feeding an add) are never prunable, by construction.

The graph comes from ``torch.fx.symbolic_trace`` (traced in eval mode); for a model fx cannot
trace, from ``torch.export`` on example inputs (its ATen graph, each op mapped back to its module
by the ``nn_module_stack`` metadata; only module sites are measurable there); without example
inputs, from registration order (the last conv/linear registered before each activation module:
right for plain chains, not for residual blocks). ``Discovery.method`` says which was used.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# module type -> entropy kind
_KINDS: list[tuple[type, str]] = [
    (nn.ReLU6, "relu6"),
    (nn.ReLU, "relu"),
    (nn.LeakyReLU, "leaky_relu"),
    (nn.PReLU, "prelu"),
    (nn.GELU, "gelu"),
    (nn.SiLU, "silu"),
]
PROXY_KINDS = frozenset({"gelu", "silu"})  # ON = x > 0 is only a proxy there: removal is not exact
PASS_THROUGH = (nn.modules.batchnorm._BatchNorm, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                nn.AlphaDropout)
WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

# functional activations -> entropy kind (hardtanh only with bounds (0, 6): see _functional_kind)
_FUNCTION_KINDS: dict[Any, str] = {
    F.relu: "relu", F.relu_: "relu", torch.relu: "relu", torch.relu_: "relu",
    F.relu6: "relu6", F.hardtanh: "relu6", F.hardtanh_: "relu6",
    F.leaky_relu: "leaky_relu", F.leaky_relu_: "leaky_relu", F.prelu: "prelu", torch.prelu: "prelu",
    F.gelu: "gelu", F.silu: "silu",
}
_METHOD_KINDS = {"relu": "relu", "relu_": "relu"}
_PASS_FUNCTIONS = {F.batch_norm, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
_PASS_METHODS = {"contiguous"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
_MUL_METHODS = {"mul", "mul_"}
_WEIGHTED_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.linear}
_MAX_WALK = 256


def activation_kind(module: nn.Module) -> str | None:
    """Entropy kind of an activation module, or None when it is not a rectifier-like site."""
    if isinstance(module, nn.Hardtanh) and not isinstance(module, nn.ReLU6):
        return "relu6" if (module.min_val, module.max_val) == (0.0, 6.0) else None
    for cls, kind in _KINDS:
        if isinstance(module, cls):
            return kind
    return None


@dataclass(frozen=True)
class Site:
    name: str  # activation module name ("layer1.0.relu1"), "module#2" for its 2nd call, "scope.relu()" for F.relu
    kind: str  # "relu", "relu6", "leaky_relu", "prelu", "gelu", "silu"
    feeder: str | None  # prunable conv/linear module name, None if none was found
    post_add: bool = False  # the activation follows a residual add
    module: str | None = None  # the activation module (None: a functional call)
    call: int = 0  # which call of ``module`` in one forward pass (0-based)
    channel_axis: int | None = None  # a neuron's dim: 1 after a conv, -1 after a Linear, None: by rank

    @property
    def proxy(self) -> bool:
        return self.kind in PROXY_KINDS

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "feeder": self.feeder, "post_add": self.post_add}


@dataclass
class Discovery:
    """Sites and how they were found; ``graph`` (fx, symbolic trace only) locates functional sites
    for the entropy probes (``node_of``: site name -> fx node name)."""

    sites: list[Site]
    method: str  # "fx" | "export" | "order"
    note: str = ""  # why the graph methods were not used
    graph: Any = None
    node_of: dict[str, str] = field(default_factory=dict)

    @property
    def needs_graph(self) -> bool:
        """Some site is a functional call: no module to hook, only the fx graph locates it."""
        return any(s.module is None for s in self.sites)


# ---- the structural walk, shared by the fx and the export graphs -----------------------------------


@dataclass
class _View:
    """How one kind of graph spells the roles the walk needs."""

    activation: Callable[[Any], tuple[str, str | None, str] | None]  # node -> (kind, module|None, function name)
    weighted: Callable[[Any], str | None]  # node -> conv/linear module name
    pass_operand: Callable[[Any], Any]  # node -> its data operand when value/shape-preserving per channel
    is_add: Callable[[Any], bool]
    is_mul: Callable[[Any], bool]
    modules: dict[str, nn.Module]

    def channel_axis(self, feeder: str | None) -> int | None:
        """A Linear's neurons are its input's last dim whatever the rank; a conv's are dim 1."""
        mod = self.modules.get(feeder) if feeder is not None else None
        return -1 if isinstance(mod, nn.Linear) else 1 if isinstance(mod, WEIGHTED) else None


def _node_operands(node) -> list:
    import torch.fx as fx

    return [a for a in node.args[:2] if isinstance(a, fx.Node)]


class _Walker:
    def __init__(self, view: _View) -> None:
        self.view = view
        self._ancestors: dict[Any, frozenset] = {}

    def ancestors(self, node) -> frozenset:
        """``node`` and everything it depends on."""
        if node in self._ancestors:
            return self._ancestors[node]
        seen, stack = {node}, [node]
        while stack:
            for n in stack.pop().all_input_nodes:
                if n not in seen:
                    seen.add(n)
                    stack.append(n)
        out = self._ancestors[node] = frozenset(seen)
        return out

    def _has_activation(self, nodes) -> bool:
        return any(self.view.activation(n) is not None for n in nodes)

    def residual_operand(self, a, b):
        """The branch of ``a + b``: the operand whose own part of the graph (from the fork where the
        two meet to the add) holds an activation while the other's (identity or projection) holds none."""
        anc_a, anc_b = self.ancestors(a), self.ancestors(b)
        act_a, act_b = self._has_activation(anc_a - anc_b), self._has_activation(anc_b - anc_a)
        if act_a != act_b:
            return a if act_a else b
        return None

    def feeder(self, node) -> tuple[str | None, bool]:
        """Follow a pre-activation back to its conv/linear; (module name, passed a residual add)."""
        post_add = False
        for _ in range(_MAX_WALK):
            if node is None or not hasattr(node, "op"):
                return None, post_add
            name = self.view.weighted(node)
            if name is not None:
                return name, post_add
            nxt = self.view.pass_operand(node)
            if nxt is not None:
                node = nxt
                continue
            ops = _node_operands(node)
            if self.view.is_mul(node) and len(ops) == 2:
                a, b = ops  # a gate computed from the data (squeeze-excite): x * g(x) keeps x's channels' signs
                if a in self.ancestors(b) and b not in self.ancestors(a):
                    node = a
                    continue
                if b in self.ancestors(a) and a not in self.ancestors(b):
                    node = b
                    continue
                return None, post_add
            if self.view.is_add(node) and len(ops) == 2:
                post_add = True
                node = self.residual_operand(*ops)
                continue
            return None, post_add
        return None, post_add


def _unique_names(raw: list[tuple[str, Any]]) -> list[str]:
    """Site names from (base name, key) pairs: a repeated base gets "#2", "#3" ..."""
    count: dict[str, int] = {}
    out = []
    for base, _ in raw:
        count[base] = count.get(base, 0) + 1
        out.append(base if count[base] == 1 else f"{base}#{count[base]}")
    return out


def _scope(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else ""


def _sites_from_graph(graph, view: _View, method: str) -> Discovery:
    walker = _Walker(view)
    raw, found = [], []
    for node in graph.nodes:
        act = view.activation(node)
        if act is None:
            continue
        kind, module, function = act
        base = module if module is not None else (f"{_scope(node)}.{function}()" if _scope(node) else f"{function}()")
        data = node.args[0] if node.args else None
        feeder, post_add = walker.feeder(data)
        raw.append((base, node))
        found.append((kind, feeder, post_add, module, node))
    names = _unique_names(raw)
    calls: dict[str, int] = {}
    sites, node_of = [], {}
    for name, (kind, feeder, post_add, module, node) in zip(names, found):
        call = 0
        if module is not None:
            call = calls.get(module, 0)
            calls[module] = call + 1
        sites.append(Site(name, kind, feeder, post_add, module, call, view.channel_axis(feeder)))
        node_of[name] = node.name
    return Discovery(sites, method, graph=graph if method == "fx" else None, node_of=node_of if method == "fx" else {})


# ---- torch.fx symbolic trace ---------------------------------------------------------------------------


def _functional_kind(node) -> str | None:
    if node.op == "call_method":
        return _METHOD_KINDS.get(node.target)
    if node.op != "call_function":
        return None
    try:
        kind = _FUNCTION_KINDS.get(node.target)
    except TypeError:  # an unhashable target
        return None
    if kind == "relu6" and node.target in (F.hardtanh, F.hardtanh_):
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
        return "relu6" if (lo, hi) == (0.0, 6.0) else None
    return kind


def _fx_view(model: nn.Module) -> _View:
    modules = dict(model.named_modules())

    def activation(node):
        if node.op == "call_module":
            kind = activation_kind(modules[node.target])
            return (kind, node.target, "") if kind else None
        kind = _functional_kind(node)
        if kind is None:
            return None
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
        return kind, None, name

    def weighted(node):
        if node.op == "call_module" and isinstance(modules[node.target], WEIGHTED):
            return node.target
        if node.op == "call_function" and node.target in _WEIGHTED_FUNCTIONS and len(node.args) > 1:
            w = node.args[1]  # F.conv2d(x, self.weight) inside a conv subclass fx traced through
            if getattr(w, "op", None) == "get_attr" and w.target.endswith(".weight"):
                owner = w.target.rsplit(".", 1)[0]
                if isinstance(modules.get(owner), WEIGHTED):
                    return owner
        return None

    def pass_operand(node):
        if not node.args:
            return None
        if node.op == "call_module" and isinstance(modules[node.target], PASS_THROUGH):
            return node.args[0]
        if node.op == "call_function" and node.target in _PASS_FUNCTIONS:
            return node.args[0]
        if node.op == "call_method" and node.target in _PASS_METHODS:
            return node.args[0]
        return None

    def is_add(node):
        return (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
            node.op == "call_method" and node.target in _ADD_METHODS)

    def is_mul(node):
        return (node.op == "call_function" and node.target in _MUL_FUNCTIONS) or (
            node.op == "call_method" and node.target in _MUL_METHODS)

    return _View(activation, weighted, pass_operand, is_add, is_mul, modules)


def trace(model: nn.Module):
    """``torch.fx.symbolic_trace`` in eval mode (the mode entropy is measured in)."""
    import torch.fx as fx

    was = model.training
    model.eval()
    try:
        return fx.symbolic_trace(model)
    finally:
        model.train(was)


def _fx_sites(model: nn.Module) -> Discovery:
    return _sites_from_graph(trace(model).graph, _fx_view(model), "fx")


# ---- torch.export (ATen graph) --------------------------------------------------------------------------


def _export_view(model: nn.Module) -> _View:
    aten = torch.ops.aten
    modules = dict(model.named_modules())
    kinds = {
        aten.relu.default: "relu", aten.relu_.default: "relu", aten.relu6.default: "relu6",
        aten.leaky_relu.default: "leaky_relu", aten.leaky_relu_.default: "leaky_relu", aten.prelu.default: "prelu",
        aten.gelu.default: "gelu", aten.silu.default: "silu", aten.silu_.default: "silu",
        aten.hardtanh.default: "relu6", aten.hardtanh_.default: "relu6",
    }
    conv_ops = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.linear.default,
                aten.convolution.default}
    pass_ops = {aten.batch_norm.default, aten.dropout.default, aten.clone.default, aten.contiguous.default,
                aten._native_batch_norm_legit_no_training.default, aten.alias.default}
    add_ops = {aten.add.Tensor, aten.add_.Tensor}
    mul_ops = {aten.mul.Tensor, aten.mul_.Tensor}

    def owner(node) -> str | None:
        scope = _scope(node)
        return scope if scope in modules else None

    def activation(node):
        if node.op != "call_function" or node.target not in kinds:
            return None
        kind = kinds[node.target]
        if node.target in (aten.hardtanh.default, aten.hardtanh_.default) and tuple(node.args[1:3]) != (0.0, 6.0):
            return None
        mod = owner(node)
        if mod is not None and activation_kind(modules[mod]) is not None:
            return kind, mod, ""
        return kind, None, node.target.overloadpacket.__name__

    def weighted(node):
        if node.op == "call_function" and node.target in conv_ops:
            mod = owner(node)
            return mod if mod is not None and isinstance(modules[mod], WEIGHTED) else None
        return None

    def pass_operand(node):
        if node.op != "call_function" or not node.args:
            return None
        if node.target in pass_ops:
            return node.args[0]
        if node.target is operator.getitem and node.args[1] == 0:  # (out, mean, invstd) of a batch norm
            src = node.args[0]
            if getattr(src, "op", None) == "call_function" and src.target in pass_ops:
                return src.args[0]
        return None

    return _View(activation, weighted, pass_operand, lambda n: n.op == "call_function" and n.target in add_ops,
                 lambda n: n.op == "call_function" and n.target in mul_ops, modules)


def _export_sites(model: nn.Module, example_inputs: tuple) -> Discovery:
    was = model.training
    model.eval()
    try:
        ep = torch.export.export(model, example_inputs, strict=False)
    finally:
        model.train(was)
    found = _sites_from_graph(ep.graph_module.graph, _export_view(model), "export")
    # a functional call in an exported graph has no module to hook: not measurable on the model
    found.sites = [s for s in found.sites if s.module is not None]
    return found


# ---- registration order (last resort) ---------------------------------------------------------------


def _order_sites(model: nn.Module) -> list[Site]:
    """The last conv/linear registered before each activation module."""
    sites, last = [], None
    for name, mod in model.named_modules():
        if isinstance(mod, WEIGHTED):
            last = name
        kind = activation_kind(mod)
        if kind is not None:
            sites.append(Site(name, kind, last, module=name))
    return sites  # no channel_axis: a guessed feeder does not say where the neurons are


def _as_tuple(example_inputs) -> tuple:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def discover_sites(model: nn.Module, example_inputs: Any = None) -> Discovery:
    """Every activation site in execution order, with how it was found (see the module docstring)."""
    try:
        return _fx_sites(model)
    except Exception as e:  # noqa: BLE001 - data-dependent control flow etc.: fx cannot trace every model
        note = f"torch.fx cannot trace {type(model).__name__} ({type(e).__name__})"
    if example_inputs is not None:
        try:
            found = _export_sites(model, _as_tuple(example_inputs))
            found.note = note + "; sites found with torch.export"
            return found
        except Exception as e:  # noqa: BLE001 - torch.export cannot export every model either
            note += f"; torch.export failed too ({type(e).__name__})"
    return Discovery(_order_sites(model), "order", note + "; sites in registration order")


def find_sites(model: nn.Module, example_inputs: Any = None) -> list[Site]:
    """Every activation site in execution order (``discover_sites(...).sites``)."""
    return discover_sites(model, example_inputs).sites


def prunable_layers(model: nn.Module, sites: list[Site] | None = None) -> list[str]:
    """Names of the conv/linear modules that feed an activation site, in order, unique."""
    sites = find_sites(model) if sites is None else sites
    out: list[str] = []
    for s in sites:
        if s.feeder is not None and s.feeder not in out:
            out.append(s.feeder)
    return out


def all_weight_layers(model: nn.Module) -> list[str]:
    """Every conv/linear module name (the IMP baseline prunes all of them)."""
    return [n for n, m in model.named_modules() if isinstance(m, WEIGHTED)]
