"""Foundation: the architectures registry, the data loaders, the checkpoint format."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from egp_deploy.archs import create_model, list_archs
from egp_deploy.checkpoint import FORMAT, Checkpoint, checkpoint_from_model, load_checkpoint, save_checkpoint
from egp_deploy.data import cifar10_val_size, load_cifar10_folder, load_data, load_digits_bundle, make_loader
from egp_deploy.errors import DataError, InputFileError, UnsupportedError

HERE = Path(__file__).parent

# ---- architectures ------------------------------------------------------------------------------

SMALL = {
    "resnet18": {"width": 4},
    "resnet50": {"width": 4},
    "mobilenet_v2": {"width_mult": 0.25},
    "vgg16_bn": {"width": 4},
    "vit_tiny": {"width": 16, "layers": 2},
}


def test_registry_lists_the_four_reference_architectures_and_rejects_others():
    assert set(list_archs()) >= set(SMALL)
    with pytest.raises(UnsupportedError, match="unknown architecture 'resnet101'"):
        create_model("resnet101")
    with pytest.raises(UnsupportedError, match="bad arguments"):
        create_model("resnet18", no_such_knob=1)
    with pytest.raises(UnsupportedError, match="bad arguments for architecture 'resnet18'"):
        create_model("resnet18", width=0)  # fails inside torch's init: still the user's argument


@pytest.mark.parametrize("name", sorted(SMALL))
def test_knobs_classes_channels_and_forward_shape(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=1, **SMALL[name]).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 1, 32, 32))
    assert y.shape == (2, 7) and torch.isfinite(y).all()


def test_resnet50_has_torchvision_keys_shapes_and_parameter_count():
    """torchvision's resnet50 layout (v1.5), written out: its state_dict loads with strict=True."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected = {"conv1.weight", "fc.weight", "fc.bias"} | {f"bn1.{k}" for k in bn}
    for stage, blocks in enumerate((3, 4, 6, 3), 1):
        for b in range(blocks):
            p = f"layer{stage}.{b}."
            expected |= {p + f"conv{i}.weight" for i in (1, 2, 3)} | {p + f"bn{i}.{k}" for i in (1, 2, 3) for k in bn}
            if b == 0:
                expected |= {p + "downsample.0.weight"} | {p + f"downsample.1.{k}" for k in bn}
    model = create_model("resnet50", num_classes=1000)
    sd = model.state_dict()
    assert set(sd) == expected
    assert sum(p.numel() for p in model.parameters()) == 25_557_032  # torchvision's resnet50
    assert sd["layer2.0.conv2.weight"].shape == (128, 128, 3, 3) and sd["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)  # v1.5
    create_model("resnet50", num_classes=1000).load_state_dict(sd, strict=True)


def test_state_dict_keys_are_torchvision_style():
    r = create_model("resnet18", width=4).state_dict()
    for k in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.0.bn2.weight",
              "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_var", "layer4.1.conv2.weight", "fc.weight"):
        assert k in r, k
    assert r["layer4.1.conv2.weight"].shape == (32, 32, 3, 3)  # width 4 x 8 in stage 4
    m = create_model("mobilenet_v2", width_mult=0.25).state_dict()
    for k in ("features.0.0.weight", "features.0.1.running_mean", "features.1.conv.0.0.weight",
              "features.2.conv.2.weight", "features.18.0.weight", "classifier.1.weight"):
        assert k in m, k
    v = create_model("vgg16_bn", width=4).state_dict()
    assert "features.0.weight" in v and "features.1.running_var" in v
    t = create_model("vit_tiny", width=16, layers=2).state_dict()
    for k in ("conv_proj.weight", "class_token", "encoder.pos_embedding",
              "encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
              "encoder.layers.encoder_layer_1.mlp.0.weight", "encoder.layers.encoder_layer_1.mlp.3.weight",
              "encoder.ln.weight", "heads.head.weight"):
        assert k in t, k


def test_resnet18_imagenet_stem_option():
    model = create_model("resnet18", width=4, stem="imagenet", num_classes=5).eval()
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    with pytest.raises(UnsupportedError):
        create_model("resnet18", stem="round")


# ---- data -----------------------------------------------------------------------------------------


def _rows(ds) -> set[bytes]:
    x = ds.tensors[0]
    return {row.numpy().tobytes() for row in x.flatten(1)}


def test_digits_split_sizes_determinism_and_no_overlap():
    a, b = load_data("digits"), load_digits_bundle()
    assert (len(a.train), len(a.val), len(a.test)) == (1257, 270, 270)
    assert a.input_shape == (1, 32, 32) and a.num_classes == 10 and a.spec == "digits"
    for split in ("train", "val", "test"):
        for t1, t2 in zip(getattr(a, split).tensors, getattr(b, split).tensors):
            assert torch.equal(t1, t2), split
    train, val, test = _rows(a.train), _rows(a.val), _rows(a.test)  # the 1797 images are distinct
    assert len(train) == 1257 and not (train & val) and not (train & test) and not (val & test)
    assert set(a.train.tensors[1].tolist()) == set(range(10))
    # the normalisation uses the training split only: mean 0, std 1 there
    x = a.train.tensors[0]
    assert float(x.mean()) == pytest.approx(0.0, abs=1e-5) and float(x.std()) == pytest.approx(1.0, abs=1e-4)


def test_make_loader_shuffles_deterministically():
    ds = load_digits_bundle().val
    order = lambda seed: torch.cat([y for _, y in make_loader(ds, 64, shuffle=True, seed=seed)])  # noqa: E731
    assert torch.equal(order(1), order(1)) and not torch.equal(order(1), order(2))


def _png_tree(root: Path, split_dirs: bool) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    splits = ("train", "val") if split_dirs else ("",)
    for split in splits:
        for cls in ("a", "b", "c"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(4 if split_dirs else 10):
                Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(d / f"{i}.png")
    (root / ("train" if split_dirs else "") / "a" / "notes.txt").write_text("not an image")


def test_image_folder_with_train_val_dirs(tmp_path):
    _png_tree(tmp_path, split_dirs=True)
    b = load_data(f"folder:{tmp_path}")
    assert b.num_classes == 3 and b.info["classes"] == ["a", "b", "c"]
    assert (len(b.train), len(b.val), len(b.test)) == (12, 12, 12)  # no test dir: test = val
    x, y = b.train[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1.0 <= float(x.min()) <= float(x.max()) <= 1.0
    assert y == 1  # sorted: a a a a b ...
    assert b.input_shape == (3, 32, 32)


def test_image_folder_flat_split_and_unreadable_image(tmp_path):
    _png_tree(tmp_path, split_dirs=False)
    b = load_data(f"folder:{tmp_path}")
    assert len(b.train) + len(b.val) + len(b.test) == 30 and len(b.val) == len(b.test) == 4
    names = lambda ds: {p for p, _ in ds.samples}  # noqa: E731
    assert not (names(b.train) & names(b.val)) and not (names(b.val) & names(b.test))
    broken = tmp_path / "b" / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    b2 = load_data(f"folder:{tmp_path}")
    idx = next(i for split in (b2.train, b2.val, b2.test) for i, (p, _) in enumerate(split.samples) if p == broken)
    ds = next(split for split in (b2.train, b2.val, b2.test) if any(p == broken for p, _ in split.samples))
    with pytest.raises(DataError, match="cannot read image"):
        ds[idx]


def _fake_cifar(root: Path, per_batch: int = 6) -> None:
    rng = np.random.default_rng(0)
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, per_batch)]}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_folder(tmp_path):
    _fake_cifar(tmp_path / "c")
    b = load_cifar10_folder(tmp_path / "c", val_size=6)
    assert (len(b.train), len(b.val), len(b.test)) == (24, 6, 6)
    assert b.input_shape == (3, 32, 32) and b.num_classes == 10 and b.spec == f"cifar10:{tmp_path / 'c'}"
    # pixel (channel 0, row 0, col 0) of the first image, normalised with CIFAR's mean/std
    with open(tmp_path / "c" / "data_batch_1", "rb") as f:
        raw = pickle.load(f)
    expect = (raw[b"data"][0, 0] / 255.0 - 0.4914) / 0.2470
    assert float(b.train[0][0][0, 0, 0]) == pytest.approx(expect, abs=1e-5)
    assert int(b.train[0][1]) == raw[b"labels"][0]


@pytest.mark.parametrize("per_batch, split", [(4, (18, 2)), (1, (4, 1)), (200, (900, 100))])
def test_cifar10_default_val_split_is_ten_percent_at_most_5000(tmp_path, per_batch, split):
    # a fixed 5000 left small folders with no training images at all
    _fake_cifar(tmp_path / "c", per_batch)
    b = load_data(f"cifar10:{tmp_path / 'c'}")
    assert (len(b.train), len(b.val)) == split and len(b.test) == per_batch
    assert cifar10_val_size(50000) == 5000 and cifar10_val_size(60000) == 5000  # the full set: as usual


def test_cifar10_too_few_training_images(tmp_path):
    _fake_cifar(tmp_path / "c", per_batch=0)
    with open(tmp_path / "c" / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [3]}, f)
    with pytest.raises(DataError, match="holds 1 training image.*at least 2"):
        load_data(f"cifar10:{tmp_path / 'c'}")
    with pytest.raises(DataError, match="4 images but 3 labels"):
        with open(tmp_path / "c" / "data_batch_2", "wb") as f:
            pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [3, 1, 2]}, f)
        load_data(f"cifar10:{tmp_path / 'c'}")


def test_cifar10_malformed_and_missing(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_data(f"cifar10:{tmp_path / 'nope'}")
    _fake_cifar(tmp_path / "c")
    (tmp_path / "c" / "data_batch_3").write_bytes(b"junk")
    with pytest.raises(DataError, match="malformed CIFAR-10 batch .*data_batch_3"):
        load_data(f"cifar10:{tmp_path / 'c'}")
    (tmp_path / "c" / "test_batch").unlink()
    with pytest.raises(DataError, match="missing test_batch"):
        load_data(f"cifar10:{tmp_path / 'c'}")


def test_plugin_loader(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    b = load_data("plugin:plugin_data:small_digits")
    assert (len(b.train), len(b.val), len(b.test)) == (192, 96, 96) and b.num_classes == 10
    assert b.input_shape == (1, 32, 32)
    (tmp_path / "my_plugin.py").write_text(
        "import torch\nfrom torch.utils.data import DataLoader, TensorDataset\n"
        "def pair():\n"
        "    ds = TensorDataset(torch.zeros(5, 2, 4, 4), torch.tensor([0, 1, 2, 1, 0]))\n"
        "    return DataLoader(ds, batch_size=2), ds\n"
        "def broken():\n    raise RuntimeError('disk on fire')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    p = load_data("plugin:my_plugin:pair")  # loaders are unwrapped; classes inferred; test = val
    assert p.num_classes == 3 and p.input_shape == (2, 4, 4) and p.test is p.val
    with pytest.raises(DataError, match="disk on fire"):
        load_data("plugin:my_plugin:broken")
    with pytest.raises(DataError, match="cannot import"):
        load_data("plugin:my_plugin:absent")
    with pytest.raises(DataError, match="package.module:function"):
        load_data("plugin:my_plugin")
    with pytest.raises(DataError, match="unknown data spec"):
        load_data("imagenet:/data")


# ---- checkpoint -----------------------------------------------------------------------------------


def _ckpt() -> Checkpoint:
    torch.manual_seed(0)
    model = create_model("resnet18", width=4, in_channels=1)
    with torch.no_grad():
        model.layer1[0].conv1.weight[0].zero_()
    kw = {"width": 4, "in_channels": 1}
    return checkpoint_from_model(model, "resnet18", kw, (1, 32, 32), 10, {"test_acc": 91.5, "entropy": {"relu": 0.5}})


def test_checkpoint_round_trip_and_weights_only(tmp_path):
    ck = _ckpt()
    path = save_checkpoint(tmp_path / "m.pt", ck)
    raw = torch.load(path, weights_only=True)  # plain data only: safe to load
    assert raw["format"] == FORMAT and raw["format_version"] == 1 and raw["arch"] == "resnet18"
    assert raw["input_shape"] == [1, 32, 32] and raw["num_classes"] == 10
    back = load_checkpoint(path, expected_arch="resnet18")
    assert back.metadata == ck.metadata and back.arch_kwargs == ck.arch_kwargs and back.input_shape == (1, 32, 32)
    model = back.build_model()
    assert not model.training
    for k, v in ck.state_dict.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert not [p for p in tmp_path.iterdir() if p.name != "m.pt"]  # no temp file left


class PickledThing:  # an arbitrary pickled object: a checkpoint holding one must never be unpickled
    pass


def _write(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def test_weights_of_another_architecture_give_one_short_line():
    # torch's message lists every key (thousands of characters); ours counts and shows a few
    resnet = create_model("resnet18", width=4)
    for arch, kwargs, words in [
        ("vgg16_bn", {"width": 4}, ["missing from the checkpoint (features.0.weight", "not in the model (conv1.weight"]),
        ("resnet18", {"width": 8}, ["of another shape (conv1.weight [4, 3, 3, 3] vs model [8, 3, 3, 3]"]),
    ]:
        ckpt = checkpoint_from_model(resnet, arch, kwargs, (3, 32, 32), 10)
        with pytest.raises(InputFileError) as info:
            ckpt.build_model()
        msg = str(info.value)
        assert "\n" not in msg and len(msg) < 300, msg
        assert msg.startswith(f"checkpoint weights do not fit architecture {arch!r}")
        assert all(w in msg for w in words), msg


def test_checkpoint_rejections(tmp_path):
    good = _ckpt().to_dict()
    with pytest.raises(InputFileError, match="format version 2"):
        load_checkpoint(_write(tmp_path / "v.pt", {**good, "format_version": 2}))
    missing = {k: v for k, v in good.items() if k not in ("arch", "num_classes")}
    with pytest.raises(InputFileError, match="lacks checkpoint fields: arch, num_classes"):
        load_checkpoint(_write(tmp_path / "f.pt", missing))
    with pytest.raises(InputFileError, match="not an egp-deploy checkpoint"):
        load_checkpoint(_write(tmp_path / "sd.pt", good["state_dict"]))
    with pytest.raises(InputFileError, match="expected 'vgg16_bn'"):
        load_checkpoint(_write(tmp_path / "a.pt", good), expected_arch="vgg16_bn")
    with pytest.raises(InputFileError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 64)
    with pytest.raises(InputFileError, match="not a readable"):
        load_checkpoint(tmp_path / "junk.pt")

    torch.save({"format": FORMAT, "obj": PickledThing()}, tmp_path / "pickle.pt")
    with pytest.raises(InputFileError, match="not a readable"):
        load_checkpoint(tmp_path / "pickle.pt")
    wrong = load_checkpoint(_write(tmp_path / "w.pt", {**good, "arch_kwargs": {"width": 8, "in_channels": 1}}))
    with pytest.raises(InputFileError, match="do not fit"):
        wrong.build_model()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
