"""Calibration and held-out inputs for the graph surgery: ONE loader, ONE held-out policy.

Both egp-export and egp-surgery (and the Python API) go through :func:`load_calibration`:

- a data spec (``digits``, ``cifar10:DIR``, ``folder:DIR``, ``plugin:mod:fn``): the *val* split
  calibrates, the *test* split is held out;
- an array file (``.npy`` / ``.npz``, ``(N, *sample_shape)``): the first half calibrates, the
  second half is held out (so no held-out sample was ever seen by the measurement);
- ``random``: two independent standard-normal draws (only exact rewrites can then be trusted);
- a separate held-out source, when given, replaces the policy's held-out half: the calibration
  source is then used whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from egp_deploy.errors import DataError, NonFiniteError, UnsupportedError, first_words

RANDOM = "random"
ARRAY_SUFFIXES = (".npy", ".npz")
RANDOM_WARNING = ("no calibration data known: using random normal inputs; activation statistics of random "
                  "inputs say little about real data, so data-dependent strips are unreliable")

SampleShape = Sequence[Optional[int]]  # one sample, no batch; None = a dynamic dimension


@dataclass
class CalibrationSet:
    """Inputs that calibrate the surgery's measurement and inputs that verify its result."""

    calibration: np.ndarray
    held_out: np.ndarray | None
    description: str
    warnings: list[str] = field(default_factory=list)


def is_array_file(spec: str) -> bool:
    return spec.endswith(ARRAY_SUFFIXES)


def read_array_file(path: str | Path) -> np.ndarray:
    """A batch of samples from a .npy or .npz file (the ``input`` array of an .npz, else its first)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"calibration file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            keys = list(data.keys())
            if not keys:
                raise DataError(f"{path} holds no arrays")
            data = data["input"] if "input" in keys else data[keys[0]]
        arr = np.asarray(data, dtype=np.float32)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path} is not a readable .npy/.npz array ({type(e).__name__}: {first_words(e, 120)})") from None
    if arr.ndim < 2:
        raise DataError(f"{path} must hold a batch of samples (N, ...), got shape {arr.shape}")
    return arr


def _random(sample_shape: SampleShape, n: int, seed: int) -> np.ndarray:
    if any(d is None for d in sample_shape):
        raise DataError(f"random calibration needs a static input shape, the model's is "
                        f"{['?' if d is None else d for d in sample_shape]}: pass real calibration data")
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *[int(d) for d in sample_shape])).astype(np.float32)


def _data_split(spec: str, sample_shape: SampleShape, n: int, split: str) -> tuple[np.ndarray, str]:
    from egp_deploy.data import calibration_batch, load_data

    image = len(sample_shape) == 3
    channels = sample_shape[0] if image else None
    size = sample_shape[-1] if image and sample_shape[-1] is not None and sample_shape[-1] == sample_shape[-2] else None
    bundle = load_data(spec, image_size=size, channels=channels)
    return calibration_batch(bundle, n, split).numpy().astype(np.float32), bundle.spec


def load_samples(spec: str, sample_shape: SampleShape, n: int, split: str = "val", seed: int = 0) -> np.ndarray:
    """``n`` samples from one source: a data set's ``split``, a whole array file, or random normal."""
    if spec == RANDOM:
        return _random(sample_shape, n, seed)
    if is_array_file(spec):
        return read_array_file(spec)[:n]
    return _data_split(spec, sample_shape, n, split)[0]


def load_calibration(
    spec: str | None,
    sample_shape: SampleShape,
    samples: int = 256,
    held_out_samples: int | None = None,
    held_out: str | None = None,
    seed: int = 0,
) -> CalibrationSet:
    """Calibration and held-out inputs by the module's policy; ``spec=None`` means random, with a warning.

    Raises DataError for a missing/unreadable source or a sample shape the model does not take,
    NonFiniteError for NaN/Inf inputs: all before any model work."""
    if samples < 1:
        raise DataError(f"need at least 1 calibration sample, got {samples}")
    n_held = samples if held_out_samples is None else held_out_samples
    notes = [RANDOM_WARNING] if spec is None else []
    spec = spec or RANDOM
    if spec == RANDOM:
        calib = _random(sample_shape, samples, seed)
        held = None if held_out else _random(sample_shape, n_held, seed + 1)
        desc = "random normal"
    elif is_array_file(spec):
        arr = read_array_file(spec)
        if held_out:
            calib, held = arr[:samples], None
            desc = f"file {Path(spec).name} ({len(calib)} samples)"
        else:
            if len(arr) < 2:
                raise DataError(f"{spec} holds {len(arr)} sample(s); need at least 2 (calibration + held-out)")
            half = len(arr) // 2
            calib, held = arr[:half][:samples], arr[half:][:n_held]
            desc = f"file {Path(spec).name} ({len(calib)} calibration + {len(held)} held-out)"
    else:
        calib, name = _data_split(spec, sample_shape, samples, "val")
        held = None if held_out else _data_split(spec, sample_shape, n_held, "test")[0]
        desc = f"{name}: {len(calib)} val" + ("" if held is None else f" + {len(held)} test") + " samples"
    if held_out:
        held = load_samples(held_out, sample_shape, n_held, "test", seed + 1)
        desc += f"; held-out: {held_out} ({len(held)} samples)"
    for what, arr in (("calibration", calib), ("held-out", held)):
        _check(arr, sample_shape, what, held_out if what == "held-out" and held_out else spec)
    return CalibrationSet(calib, held, desc, notes)


def _check(arr: np.ndarray | None, sample_shape: SampleShape, what: str, source: str) -> None:
    if arr is None:
        return
    got = tuple(arr.shape[1:])
    want = tuple(sample_shape)
    if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
        shown = tuple("?" if w is None else w for w in want)
        raise DataError(f"{what} data from {source} has sample shape {got}, the model takes {shown}")
    if len(arr) == 0:
        raise DataError(f"{what} data from {source} holds no samples")
    if not np.isfinite(arr).all():
        raise NonFiniteError(f"{what} data from {source} contains NaN or Inf values")


def onnx_sample_shape(model) -> tuple[list[int | None], str]:
    """(one sample's shape with None for dynamic dims, input name) of a single-input ONNX model."""
    init = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    if len(inputs) != 1:
        raise UnsupportedError(f"the model has {len(inputs)} inputs; the surgery supports exactly one")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    return dims[1:], inputs[0].name
