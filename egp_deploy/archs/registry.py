"""Name -> architecture constructor."""

from __future__ import annotations

import difflib
from typing import Callable

import torch.nn as nn

from egp_deploy.errors import UnsupportedError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_arch(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_archs() -> list[str]:
    return sorted(_REGISTRY)


def close_matches(name: str, known: list[str]) -> str:
    """' (did you mean a, b?)' for the known names closest to a mistyped one, else ''."""
    near = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(near)}?)" if near else ""


def check_arch(name: str) -> str:
    """``name`` if it is a registered architecture. An unknown one is UnsupportedError (exit 8)
    wherever it comes from: a command line, a tool's option or a checkpoint."""
    if name not in _REGISTRY:
        raise UnsupportedError(f"unknown architecture {name!r}{close_matches(name, list_archs())}; "
                               f"known: {', '.join(list_archs())}")
    return name


def create_model(name: str, **kwargs) -> nn.Module:
    """Build architecture ``name`` with keyword knobs (``num_classes``, ``in_channels``, ``width`` ...)."""
    check_arch(name)
    # every numeric knob of the reference architectures is a size (width, classes, layers ...):
    # a non-positive one builds a module that only fails at its first forward pass
    bad = {k: v for k, v in kwargs.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0}
    if bad:
        raise UnsupportedError(f"bad arguments for architecture {name!r}: sizes must be positive, got "
                               + ", ".join(f"{k}={v}" for k, v in bad.items()))
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as e:
        raise UnsupportedError(f"bad arguments for architecture {name!r}: {e}") from None
