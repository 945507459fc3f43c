"""Data sets, all offline: bundled digits (default), CIFAR-10 python folder, image folder, plugin.

A data spec is a string:
    digits                       scikit-learn's bundled handwritten digits, upscaled to 32x32
    cifar10:/path/to/folder      the CIFAR-10 "python version" (data_batch_1..5, test_batch); the
                                 last min(5000, 10 %) training images are the val split
    folder:/path/to/root         root/{train,val[,test]}/<class>/*.png|jpg, or root/<class>/*
    plugin:package.module:func   func() -> (train, val[, test]) or a dict with those keys
                                 (+ optional num_classes); Datasets or DataLoaders
Every split yields (image float32 NCHW, label int64). ``val`` is the calibration split.
"""

from __future__ import annotations

import importlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from egp_deploy.errors import DataError, InputFileError, NonFiniteError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}


@dataclass
class DataBundle:
    name: str
    spec: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W) of one sample
    info: dict[str, Any] = field(default_factory=dict)


def _split_indices(n: int, fractions: tuple[float, float], seed: int) -> tuple[np.ndarray, ...]:
    perm = np.random.default_rng(seed).permutation(n)
    n_val, n_test = int(round(n * fractions[0])), int(round(n * fractions[1]))
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


def _check_finite(x: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"{what} contains NaN or Inf values")
    return x


def load_digits_bundle(image_size: int = 32, channels: int = 1, seed: int = 0) -> DataBundle:
    """scikit-learn's 1797 8x8 digits, bilinearly upscaled; fixed 70/15/15 split (seeded)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    y = torch.tensor(d.target, dtype=torch.int64)
    tr, va, te = _split_indices(len(y), (0.15, 0.15), seed)
    mean, std = x[tr].mean(), x[tr].std()
    x = ((x - mean) / std).repeat(1, channels, 1, 1).contiguous()
    ds = lambda idx: TensorDataset(x[idx], y[idx])  # noqa: E731
    return DataBundle(
        "digits", "digits", ds(tr), ds(va), ds(te), 10, (channels, image_size, image_size),
        {"split_seed": seed, "sizes": [len(tr), len(va), len(te)], "mean": float(mean), "std": float(std)},
    )


CIFAR10_VAL_SIZE = 5000  # the usual held-out slice of the 50,000 training images


def cifar10_val_size(n_train: int) -> int:
    """The calibration (val) split of ``n_train`` training images: the usual 5000, but at most
    10 % so a small folder still leaves most images to train on; at least one of each."""
    return min(CIFAR10_VAL_SIZE, max(1, n_train // 10))


def load_cifar10_folder(root: str | Path, val_size: int | None = None) -> DataBundle:
    """The CIFAR-10 python folder; ``val_size`` (default: cifar10_val_size) images of the training
    batches' end form the calibration split."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"CIFAR-10 folder not found: {root}")
    files = [root / f"data_batch_{i}" for i in range(1, 6)] + [root / "test_batch"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{root} is not a CIFAR-10 python folder: missing {', '.join(missing)}")

    def read(path: Path) -> tuple[np.ndarray, np.ndarray]:
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(batch[b"labels"], dtype=np.int64).reshape(-1)
        except Exception as e:  # a malformed pickle can raise almost anything
            raise DataError(f"malformed CIFAR-10 batch {path}: {type(e).__name__}: {e}") from None
        if len(labels) != len(data):
            raise DataError(f"malformed CIFAR-10 batch {path}: {len(data)} images but {len(labels)} labels")
        return data, labels

    parts = [read(f) for f in files[:5]]
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    xte, yte = read(files[5])
    if len(ytr) < 2:
        raise DataError(f"{root} holds {len(ytr)} training image(s); at least 2 are needed "
                        "(one to train on, one for the calibration split)")
    val_size = cifar10_val_size(len(ytr)) if val_size is None else val_size
    if not 0 < val_size < len(ytr):
        raise DataError(f"validation split of {val_size} images does not fit {len(ytr)} training images in {root}")
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    norm = lambda a: (torch.from_numpy(a).float() / 255.0 - mean) / std  # noqa: E731
    n = len(ytr) - val_size
    return DataBundle(
        "cifar10", f"cifar10:{root}",
        TensorDataset(norm(xtr[:n]), torch.from_numpy(ytr[:n])),
        TensorDataset(norm(xtr[n:]), torch.from_numpy(ytr[n:])),
        TensorDataset(norm(xte), torch.from_numpy(yte)), 10, (3, 32, 32), {"val_size": val_size},
    )


class ImageFolderDataset(Dataset):
    """(path, label) pairs decoded lazily with Pillow, resized, scaled to [-1, 1]."""

    def __init__(self, samples: list[tuple[Path, int]], image_size: int, channels: int) -> None:
        self.samples, self.image_size, self.channels = samples, image_size, channels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB" if self.channels == 3 else "L").resize((self.image_size,) * 2)
                arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        except Exception as e:
            raise DataError(f"cannot read image {path}: {e}") from None
        t = torch.from_numpy(arr).reshape(self.image_size, self.image_size, self.channels).permute(2, 0, 1)
        return t.contiguous(), label


def load_image_folder(root: str | Path, image_size: int = 32, channels: int = 3, seed: int = 0) -> DataBundle:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")

    def scan(folder: Path, classes: list[str]) -> list[tuple[Path, int]]:
        out = []
        for ci, c in enumerate(classes):
            out += [(p, ci) for p in sorted((folder / c).rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
        return out

    if (root / "train").is_dir() and (root / "val").is_dir():
        classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        train, val = scan(root / "train", classes), scan(root / "val", classes)
        test = scan(root / "test", classes) if (root / "test").is_dir() else val
    else:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        every = scan(root, classes)
        tr, va, te = _split_indices(len(every), (0.15, 0.15), seed)
        train, val, test = ([every[i] for i in idx] for idx in (tr, va, te))
    if not classes or not train or not val:
        raise DataError(f"{root} holds no class folders with images (expected <class>/*.png or train/<class>/...)")
    mk = lambda s: ImageFolderDataset(s, image_size, channels)  # noqa: E731
    return DataBundle(
        "folder", f"folder:{root}", mk(train), mk(val), mk(test), len(classes),
        (channels, image_size, image_size), {"classes": classes},
    )


def load_plugin(target: str) -> DataBundle:
    """``package.module:function`` returning (train, val[, test]) or a dict; Datasets or DataLoaders."""
    mod_name, _, fn_name = target.partition(":")
    if not mod_name or not fn_name:
        raise DataError(f"plugin must be 'package.module:function', got {target!r}")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except Exception as e:
        raise DataError(f"cannot import data plugin {target!r}: {type(e).__name__}: {e}") from None
    try:
        out = fn()
    except Exception as e:
        raise DataError(f"data plugin {target!r} failed: {type(e).__name__}: {e}") from None
    if isinstance(out, dict):
        parts = [out.get("train"), out.get("val"), out.get("test", out.get("val"))]
        num_classes = out.get("num_classes")
    elif isinstance(out, (tuple, list)) and len(out) in (2, 3):
        parts = [out[0], out[1], out[2] if len(out) == 3 else out[1]]
        num_classes = None
    else:
        raise DataError(f"data plugin {target!r} must return (train, val[, test]) or a dict, got {type(out).__name__}")
    if any(p is None for p in parts):
        raise DataError(f"data plugin {target!r} did not return both train and val")
    parts = [p.dataset if isinstance(p, DataLoader) else p for p in parts]
    try:
        x0, _ = parts[0][0]
        if num_classes is None:
            num_classes = 1 + max(int(parts[0][i][1]) for i in range(len(parts[0])))
    except Exception as e:
        raise DataError(f"data plugin {target!r} yields no (image, label) samples: {e}") from None
    return DataBundle("plugin", f"plugin:{target}", *parts, int(num_classes), tuple(x0.shape))


def load_data(spec: str = "digits", image_size: int | None = None, channels: int | None = None) -> DataBundle:
    """Resolve a data spec (see module docstring) to a DataBundle."""
    kind, _, arg = spec.partition(":")
    if kind == "digits":
        return load_digits_bundle(image_size or 32, channels or 1)
    if kind == "cifar10":
        return load_cifar10_folder(arg)
    if kind == "folder":
        return load_image_folder(arg, image_size or 32, channels or 3)
    if kind == "plugin":
        return load_plugin(arg)
    raise DataError(f"unknown data spec {spec!r}: use digits, cifar10:DIR, folder:DIR or plugin:module:function")


def recorded_data_spec(spec: Any, source: str | Path, option: str, allowed: bool = False) -> str | None:
    """The data spec a checkpoint records, for when the user names none. A plugin there is a module
    to import and a function to call named by the file, that is code: used only when the user names
    it (``option``) or allows code (``allowed``: --unsafe-pickle); InputFileError (exit 3) otherwise."""
    if not isinstance(spec, str):
        return None
    if spec.partition(":")[0] == "plugin" and not allowed:
        raise InputFileError(f"{source} records the data plugin {spec!r}: importing it runs code the file names; "
                             f"pass {option} {spec} only if you trust it")
    return spec


def make_loader(ds: Dataset, batch_size: int = 128, shuffle: bool = False, seed: int = 0, **kw) -> DataLoader:
    """Deterministic loader: a seeded generator drives the shuffling."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, **kw)


def calibration_batch(bundle: DataBundle, n: int = 256, split: str = "val") -> torch.Tensor:
    """The first ``n`` inputs of a split as one tensor (for ONNX calibration / verification)."""
    ds = getattr(bundle, split)
    n = min(n, len(ds))
    xs = torch.stack([ds[i][0] for i in range(n)])
    return _check_finite(xs, f"{split} split of {bundle.spec}")
