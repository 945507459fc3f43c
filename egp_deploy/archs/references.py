"""Models by reference: one string names how to build a model, and a checkpoint records it.

    resnet18                   the package's own architectures (the zoo: :mod:`egp_deploy.archs`)
    torchvision:resnet18       torchvision.models.get_model(NAME, weights=None, **kwargs)
    timm:resnet18              timm.create_model(NAME, pretrained=False, **kwargs)
    package.module:factory     import package.module, call factory(**kwargs) (a class or a function)

Nothing downloads: the registries' pretrained-weight arguments are refused (``--weights FILE``
loads a state_dict instead). Importing a module runs its code, so a ``package.module:factory``
named inside a file is built only where the caller trusts it (:func:`trusting`): the user named
the same reference on the command line, or passed ``--trust-module``.
"""

from __future__ import annotations

import importlib
import inspect
import re
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch.nn as nn

from egp_deploy.archs.registry import check_arch, close_matches, create_model, list_archs
from egp_deploy.errors import BackendUnavailableError, InputFileError, UnsupportedError, first_words

ZOO, TORCHVISION, TIMM, IMPORT = "zoo", "torchvision", "timm", "import"
REGISTRIES = (TORCHVISION, TIMM)
FORMS = "a zoo name ({}), torchvision:NAME, timm:NAME or package.module:factory"
# keyword arguments through which the registries fetch weights from the network
DOWNLOADING_KWARGS = ("weights", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


@dataclass(frozen=True)
class ModelReference:
    text: str  # as written: "torchvision:resnet18"
    kind: str  # ZOO, TORCHVISION, TIMM or IMPORT
    name: str  # the registry name, or the module path of an IMPORT
    attr: str = ""  # the factory of an IMPORT (dotted: a class's classmethod)

    def __str__(self) -> str:
        return self.text


def forms() -> str:
    return FORMS.format(", ".join(list_archs()))


def parse_reference(text: str) -> ModelReference:
    """Syntax only (nothing imported); a malformed reference is UnsupportedError (exit 8)."""
    text = str(text).strip()
    prefix, sep, rest = text.partition(":")
    if not sep:
        if not _DOTTED.fullmatch(text) or "." in text:
            raise UnsupportedError(f"{text!r} is not a model reference: use {forms()}")
        return ModelReference(text, ZOO, text)
    if prefix in REGISTRIES:
        if not rest:
            raise UnsupportedError(f"{text!r} names no model: use {prefix}:NAME")
        return ModelReference(text, prefix, rest)
    if not (_DOTTED.fullmatch(prefix) and _DOTTED.fullmatch(rest)):
        raise UnsupportedError(f"{text!r} is not a model reference: use {forms()}")
    return ModelReference(text, IMPORT, prefix, rest)


# --------------------------------------------------------------------------- trust


_TRUSTED: ContextVar[frozenset[str] | bool] = ContextVar("egp_trusted_imports", default=frozenset())


@contextmanager
def trusting(references: Any = (), everything: bool = False) -> Iterator[None]:
    """Within the block, the given ``package.module:factory`` references (or every one, with
    ``everything``) may be imported when a file names them."""
    before = _TRUSTED.get()
    if everything or before is True:
        now: frozenset[str] | bool = True
    else:
        refs = [references] if isinstance(references, (str, ModelReference)) else list(references)
        now = before | {str(r) for r in refs}
    token = _TRUSTED.set(now)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def is_trusted(ref: ModelReference | str) -> bool:
    trusted = _TRUSTED.get()
    return trusted is True or str(ref) in trusted


def check_trusted(ref: ModelReference, origin: str = "a file") -> None:
    """Refuse (exit 3, nothing imported) a module a file names that the user did not trust."""
    if ref.kind == IMPORT and not is_trusted(ref):
        raise InputFileError(
            f"{origin} names the Python factory {ref.text!r}: building it imports module {ref.name!r}, "
            "which runs its code; pass --trust-module (trust_module=True) if you trust it"
        )


# --------------------------------------------------------------------------- build


def _library(kind: str) -> Any:
    """torchvision.models or timm; BackendUnavailableError (exit 5) when it cannot be imported."""
    module = "torchvision.models" if kind == TORCHVISION else "timm"
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BackendUnavailableError(f"{kind} is not installed: pip install 'egp-deploy[zoo]' "
                                      f"(for {kind}:NAME models)") from None
    except Exception as e:  # a build whose compiled ops do not load beside this torch, ...
        raise BackendUnavailableError(f"{kind} cannot be imported here ({type(e).__name__}: {first_words(e, 160)})") from None


def check_reference(ref: ModelReference | str, origin: str = "a file") -> ModelReference:
    """That ``ref`` names something that exists, without importing a module the user did not trust:
    an unknown name is UnsupportedError (exit 8) with the closest known ones."""
    ref = parse_reference(ref) if isinstance(ref, str) else ref
    if ref.kind == ZOO:
        check_arch(ref.name)
    elif ref.kind in REGISTRIES:
        names = list(_library(ref.kind).list_models())
        base = ref.name.split(".")[0] if ref.kind == TIMM else ref.name  # timm: "resnet18.a1_in1k" names a config
        if base not in names:
            raise UnsupportedError(f"{ref.kind} has no model {ref.name!r}{close_matches(base, names)}")
    else:
        check_trusted(ref, origin)
        _factory(ref)
    return ref


def _factory(ref: ModelReference) -> Any:
    try:
        obj = importlib.import_module(ref.name)
    except ModuleNotFoundError as e:
        if e.name and ref.name.startswith(e.name):
            raise UnsupportedError(f"cannot import {ref.name!r} for model {ref.text!r}: no module named {e.name!r}"
                                   " (is its folder on PYTHONPATH?)") from None
        raise UnsupportedError(f"importing {ref.name!r} for model {ref.text!r} failed: {e}") from None
    except Exception as e:  # the module's own code failed
        raise UnsupportedError(f"importing {ref.name!r} for model {ref.text!r} failed: "
                               f"{type(e).__name__}: {first_words(e, 160)}") from None
    for part in ref.attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_")]
            raise UnsupportedError(f"{getattr(obj, '__name__', ref.name)!r} has no {part!r}{close_matches(part, public)} "
                                   f"(model {ref.text!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UnsupportedError(f"{ref.text!r} is a {type(obj).__name__}, not a class or function that builds a model")
    return obj


def accepts(ref: ModelReference | str, keyword: str) -> bool:
    """Whether the reference's constructor takes ``keyword`` (the registries' models all take
    ``num_classes``; a factory only when its signature names it)."""
    ref = parse_reference(ref) if isinstance(ref, str) else ref
    if ref.kind == ZOO:
        return keyword in ("num_classes", "in_channels")
    if ref.kind == TORCHVISION:
        return keyword == "num_classes"
    if ref.kind == TIMM:
        return keyword in ("num_classes", "in_chans")
    check_trusted(ref)
    try:
        return keyword in inspect.signature(_factory(ref)).parameters
    except (TypeError, ValueError):  # a builtin or C extension without a signature
        return False


def data_kwargs(ref: ModelReference | str, num_classes: int, in_channels: int) -> dict[str, Any]:
    """The constructor's knobs that follow the data (classes, input channels) where it has them."""
    ref = parse_reference(ref) if isinstance(ref, str) else ref
    out: dict[str, Any] = {}
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels), ("in_chans", in_channels)):
        if accepts(ref, key):
            out[key] = value
    return out


def build_model(ref: ModelReference | str, kwargs: Mapping[str, Any] | None = None, origin: str = "a file") -> nn.Module:
    """The model a reference names, built with ``kwargs``; every failure is one line."""
    ref = check_reference(ref, origin)
    kwargs = dict(kwargs or {})
    if ref.kind == ZOO:
        return create_model(ref.name, **kwargs)
    downloading = sorted(k for k in kwargs if k in DOWNLOADING_KWARGS)
    if downloading:
        raise UnsupportedError(f"{ref.text}: {', '.join(downloading)} would fetch weights (nothing downloads "
                               "here); build without it and load a state_dict with --weights FILE")
    if ref.kind == TORCHVISION:
        make, kwargs = _library(TORCHVISION).get_model, {"name": ref.name, "weights": None, **kwargs}
    elif ref.kind == TIMM:
        make, kwargs = _library(TIMM).create_model, {"model_name": ref.name, "pretrained": False, **kwargs}
    else:
        make = _factory(ref)
    try:
        model = make(**kwargs)
    except TypeError as e:
        raise UnsupportedError(f"bad arguments for model {ref.text!r}: {first_words(e, 160)}") from None
    except Exception as e:  # the constructor's own checks (a size it refuses, ...)
        raise UnsupportedError(f"building model {ref.text!r} failed: {type(e).__name__}: {first_words(e, 160)}") from None
    if not isinstance(model, nn.Module):
        raise UnsupportedError(f"{ref.text!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def reference_of(model: nn.Module) -> str | None:
    """``module:Class`` of an instance when that import finds this very class again, else None
    (a class defined in ``__main__``, inside a function, or replaced since)."""
    cls = type(model)
    module, qualname = cls.__module__, cls.__qualname__
    if module == "__main__" or "<locals>" in qualname:
        return None
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except Exception:  # noqa: BLE001 - anything that stops the import means "not importable"
        return None
    return f"{module}:{qualname}" if obj is cls else None
