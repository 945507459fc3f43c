"""Activation sites and the prunable layers that feed them.

A site is an activation module (ReLU, ReLU6, LeakyReLU, PReLU, GELU, SiLU, Hardtanh(0, 6)).
Its prunable layer is the Conv/Linear whose output reaches the site's input through shape- and
value-preserving per-channel ops (BatchNorm, Identity, Dropout); for an activation after a
residual add it is the last conv of the residual branch (never the shortcut/downsample).
Found on the torch.fx graph, with a registration-order fallback for untraceable models.
Layers not feeding any site (shortcuts, the classifier, attention projections, the second MLP
linear) are never prunable by construction.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn as nn

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
PASS_THROUGH = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Identity, nn.Dropout, nn.Dropout2d)
WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
SHORTCUT_WORDS = ("downsample", "shortcut", "skip")


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
    name: str  # activation module name, e.g. "layer1.0.relu1"
    kind: str  # "relu", "relu6", "leaky_relu", "prelu", "gelu", "silu"
    feeder: str | None  # prunable conv/linear module name, None if none was found
    post_add: bool = False  # the activation follows a residual add

    @property
    def proxy(self) -> bool:
        return self.kind in PROXY_KINDS


def _is_shortcut(name: str) -> bool:
    return any(part.startswith(w) for part in name.split(".") for w in SHORTCUT_WORDS)


def _fx_sites(model: nn.Module) -> list[Site]:
    import torch.fx as fx

    gm = fx.symbolic_trace(model)
    modules = dict(model.named_modules())

    def walk(node, depth=0) -> tuple[str | None, bool]:
        """Follow the pre-activation back to a conv/linear; returns (name, passed a residual add)."""
        while depth < 64:
            depth += 1
            if not isinstance(node, fx.Node):
                return None, False
            if node.op == "call_module":
                mod = modules[node.target]
                if isinstance(mod, WEIGHTED):
                    return node.target, False
                if isinstance(mod, PASS_THROUGH) and node.args:
                    node = node.args[0]
                    continue
                return None, False
            is_add = (node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)) or (
                node.op == "call_method" and node.target in ("add", "add_")
            )
            if is_add:
                found = [walk(a, depth)[0] for a in node.args[:2]]
                branch = [f for f in found if f is not None and not _is_shortcut(f)]
                return (branch[0] if len(branch) == 1 else None), True
            return None, False
        return None, False

    sites, seen = [], set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in seen:
            continue
        kind = activation_kind(modules[node.target])
        if kind is None:
            continue
        seen.add(node.target)
        feeder, post_add = walk(node.args[0]) if node.args else (None, False)
        sites.append(Site(node.target, kind, feeder, post_add))
    return sites


def _order_sites(model: nn.Module) -> list[Site]:
    """Fallback: the last conv/linear registered before each activation (not a shortcut)."""
    sites, last = [], None
    for name, mod in model.named_modules():
        if isinstance(mod, WEIGHTED) and not _is_shortcut(name):
            last = name
        kind = activation_kind(mod)
        if kind is not None:
            sites.append(Site(name, kind, last))
    return sites


def find_sites(model: nn.Module) -> list[Site]:
    """Every activation site in execution order (fx) or registration order (fallback)."""
    try:
        return _fx_sites(model)
    except Exception:  # data-dependent control flow etc.: fx cannot trace every model
        return _order_sites(model)


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
