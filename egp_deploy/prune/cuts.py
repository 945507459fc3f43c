"""Cut layers: prunable layers that lie on EVERY path from the model's input to its output.

Emptying such a layer (all weights zero) leaves the output a constant, so the network falls to
chance accuracy; emptying a layer that something bypasses (a residual branch) only shortens the
network, which is what EGP is after. Found on the torch.fx graph by a reachability search from
the input placeholders that may not enter the layer's node. Edges that carry only a tensor's
shape (``x.size(0)``, ``x.shape``) are not data paths: a value computed from them does not depend
on the input's values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

_SHAPE_METHODS = frozenset({"size", "dim", "numel"})
_SHAPE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device"})


@dataclass(frozen=True)
class CutLayers:
    layers: list[str] | None  # the cut layers in the order given; None: unknown (fx could not trace)
    note: str = ""  # why they are unknown

    @property
    def known(self) -> bool:
        return self.layers is not None


def _carries_values(node) -> bool:
    """False for nodes whose result depends only on a tensor's metadata, not its values."""
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return False
    if node.op == "call_function":
        if node.target is getattr and len(node.args) > 1 and node.args[1] in _SHAPE_ATTRIBUTES:
            return False
        if node.target is len:
            return False
    return True


def _output_reachable_without(graph, blocked_module: str) -> bool:
    """Is there a data path from an input to the output that never calls ``blocked_module``?"""
    starts = [n for n in graph.nodes if n.op == "placeholder"]
    seen, stack = set(starts), list(starts)
    while stack:
        node = stack.pop()
        if node.op == "output":
            return True
        for user in node.users:
            if user in seen or not _carries_values(user):
                continue
            if user.op == "call_module" and user.target == blocked_module:
                continue
            seen.add(user)
            stack.append(user)
    return False


def find_cut_layers(model: nn.Module, layers: list[str]) -> CutLayers:
    """Which of ``layers`` (module names) no input-output path avoids."""
    import torch.fx as fx

    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as e:  # data-dependent control flow etc.: fx cannot trace every model
        return CutLayers(None, f"torch.fx cannot trace {type(model).__name__} ({type(e).__name__}), "
                               "so which layers nothing bypasses is unknown")
    return CutLayers([name for name in layers if not _output_reachable_without(graph, name)])
