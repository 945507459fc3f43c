"""The ``model.pt`` checkpoint format: a plain dict that loads with ``torch.load(weights_only=True)``.

    format          "egp-deploy-checkpoint"
    format_version  1
    arch            the model reference: a zoo name ("resnet18"), "torchvision:NAME", "timm:NAME" or
                    "package.module:factory" (see egp_deploy.archs.references; building the last one
                    imports a module, so only where the user trusts it)
    arch_kwargs     keyword arguments of the constructor (JSON-like)
    state_dict      weights with pruning masks folded in (pruned weights are exact zeros)
    input_shape     [C, H, W] of one sample
    num_classes     int
    metadata        JSON-like dict: data spec, accuracy, sparsity, per-layer entropy, recipe, ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from egp_deploy.archs.references import build_model as build_reference
from egp_deploy.errors import InputFileError, first_words
from egp_deploy.io_utils import atomic_path

FORMAT = "egp-deploy-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    arch: str
    arch_kwargs: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    input_shape: tuple[int, ...]
    num_classes: int
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False)  # the file it was read from (not stored)

    def build_model(self) -> nn.Module:
        """Instantiate the architecture and load the weights; eval mode. A ``package.module:factory``
        reference is built only where it is trusted (:func:`egp_deploy.archs.references.trusting`)."""
        origin = str(self.path) if self.path is not None else "the checkpoint"
        model = build_reference(self.arch, self.arch_kwargs, origin=origin)
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError:
            raise InputFileError(
                f"checkpoint weights do not fit architecture {self.arch!r} {self.arch_kwargs}: "
                f"{describe_mismatch(model.state_dict(), self.state_dict)}"
            ) from None
        return model.eval()

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "arch": self.arch,
            "arch_kwargs": dict(self.arch_kwargs),
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in self.state_dict.items()},
            "input_shape": list(self.input_shape),
            "num_classes": int(self.num_classes),
            "metadata": self.metadata,
        }


def _some(names: list[str], shown: int) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def describe_mismatch(expected: dict[str, Any], given: dict[str, Any], shown: int = 3) -> str:
    """One line: how a state_dict differs from the one a model expects (torch's own message lists
    every key, thousands of characters for a whole other architecture)."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    reshaped = [f"{k} {list(getattr(given[k], 'shape', []))} vs model {list(expected[k].shape)}"
                for k in expected if k in given and tuple(getattr(given[k], "shape", ())) != tuple(expected[k].shape)]
    parts = [f"{len(names)} {what} ({_some(names, shown)})" for what, names in
             (("missing from the checkpoint", missing), ("not in the model", unexpected),
              ("of another shape", reshaped)) if names]
    return "; ".join(parts) or "the weights do not load"


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    """Write atomically (temp file + rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: a full disk is an OSError
        torch.save(ckpt.to_dict(), f)  # (torch's own writer reports it as "unexpected pos"), exit 9
    return Path(path)


def checkpoint_from_model(
    model: nn.Module, arch: str, arch_kwargs: dict[str, Any], input_shape, num_classes: int,
    metadata: dict[str, Any] | None = None,
) -> Checkpoint:
    return Checkpoint(arch, dict(arch_kwargs), model.state_dict(), tuple(input_shape), num_classes, metadata or {})


def _unreadable_because(path: Path, error: Exception) -> str:
    """What is wrong with a file torch.load refused, in our words (torch's own text runs to a
    paragraph about its defaults, or ends in a miniz error number)."""
    import pickle

    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"cannot read it ({e.strerror or type(e).__name__})"
    if not head:
        return "the file is empty"
    if head != b"PK\x03\x04" and not head.startswith(b"\x80"):  # torch.save's zip, or a (legacy) pickle
        return "not a PyTorch file (neither a zip archive nor a pickle)"
    if isinstance(error, pickle.UnpicklingError) or "weights only load failed" in str(error).lower():
        return "a pickle holding more than tensors and plain containers, or not written by torch.save (nothing else is unpickled here)"
    return "a damaged or truncated file" if head.startswith(b"\x80") else "a damaged or truncated zip archive"


def load_checkpoint(path: str | Path, expected_arch: str | None = None) -> Checkpoint:
    """Read and validate a checkpoint; every failure is one clear InputFileError."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load on a foreign file can raise nearly anything (KeyError, EOFError...)
        raise InputFileError(f"{path} is not a readable egp-deploy checkpoint: {_unreadable_because(path, e)}; "
                             "TorchScript/.pt2/pickled modules are accepted by egp-export only") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise InputFileError(f"{path} is not an egp-deploy checkpoint (no 'format': '{FORMAT}' entry)")
    if obj.get("format_version") != FORMAT_VERSION:
        raise InputFileError(
            f"{path} has checkpoint format version {obj.get('format_version')}, this tool reads {FORMAT_VERSION}"
        )
    missing = [k for k in ("arch", "arch_kwargs", "state_dict", "input_shape", "num_classes") if k not in obj]
    if missing:
        raise InputFileError(f"{path} lacks checkpoint fields: {', '.join(missing)}")
    if expected_arch is not None and obj["arch"] != expected_arch:
        raise InputFileError(f"{path} holds architecture {obj['arch']!r}, expected {expected_arch!r}")
    if not isinstance(obj["arch"], str) or not isinstance(obj["arch_kwargs"], dict):
        raise InputFileError(f"{path} has a malformed model reference (arch {type(obj['arch']).__name__}, "
                             f"arch_kwargs {type(obj['arch_kwargs']).__name__})")
    return Checkpoint(
        obj["arch"], dict(obj["arch_kwargs"]), obj["state_dict"], tuple(obj["input_shape"]),
        int(obj["num_classes"]), dict(obj.get("metadata") or {}), path,
    )


def load_weights(model: nn.Module, path: str | Path, what: str = "the model") -> nn.Module:
    """Load a state_dict file into ``model`` weights-only (a file that pickles anything beyond
    tensors is refused, nothing of it runs). Accepted: the state_dict itself, or a dict holding it
    under "state_dict" or "model" (training scripts' checkpoints, egp-deploy's own)."""
    import pickle

    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputFileError(f"{path} pickles Python objects beyond tensors; --weights loads a plain state_dict "
                             "only (weights-only: nothing in the file runs)") from None
    except Exception as e:  # a truncated or foreign file
        raise InputFileError(f"{path} is not a readable weights file ({type(e).__name__}: {first_words(e, 160)})") from None
    if isinstance(obj, dict):
        obj = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), obj)
    if not (isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())):
        raise InputFileError(f"{path} holds no state_dict (a dict of named tensors)")
    try:
        model.load_state_dict(obj, strict=True)
    except RuntimeError:
        raise InputFileError(f"{path} does not fit {what}: {describe_mismatch(model.state_dict(), obj)}") from None
    return model
