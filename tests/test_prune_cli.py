"""egp-prune's command line: --help and bad input through the real console command.

Every bad input must give ONE line on stderr starting with "error:", the exit code of its error
class (egp_deploy/errors.py), no traceback, and no files in the output folder. The commands run
as subprocesses (`python -m egp_deploy.cli prune ...`), a few at a time, prepared once per module.
(tests/test_prune_core.py covers unknown architecture names, missing folders, plugins that do
not import, random bytes, plain state_dicts, a width mismatch and --lr 1e30; the cases here are
the others.)
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from egp_deploy.archs import create_model
from egp_deploy.checkpoint import checkpoint_from_model
from egp_deploy.errors import DataError, InputFileError, NonFiniteError, UnsupportedError, UsageError

HERE = Path(__file__).parent
KW = {"num_classes": 10, "in_channels": 1, "width": 4}

NAN_PLUGIN = '''
import torch
from torch.utils.data import TensorDataset

def nan_images():
    x = torch.randn(16, 1, 32, 32)
    x[3, 0, 5, 5] = float("nan")
    y = torch.arange(16) % 10
    return TensorDataset(x, y), TensorDataset(x, y)
'''


def _env(extra_path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(extra_path)]), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def _run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "egp_deploy.cli", "prune", *args], capture_output=True, text=True,
                          env=env, timeout=180)


def _save_ckpt(path: Path, arch: str = "resnet18", kwargs: dict | None = None, **fields) -> Path:
    torch.manual_seed(0)
    model = create_model("resnet18", **KW)
    ck = checkpoint_from_model(model, arch, kwargs or KW, (1, 32, 32), 10, {"data": "digits"})
    d = ck.to_dict()
    d.update(fields)
    for k in [k for k, v in fields.items() if v is None]:
        del d[k]
    torch.save(d, path)
    return path


def _png_folder(root: Path, channels_mode: str = "RGB") -> Path:
    from PIL import Image

    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(10):
            Image.new(channels_mode, (8, 8), color=(i * 20, 0, 0) if channels_mode == "RGB" else i * 20).save(
                root / cls / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    (base / "plugins").mkdir()
    (base / "plugins" / "nan_plugin.py").write_text(NAN_PLUGIN)
    env = _env(base / "plugins")

    bad_cifar = base / "bad_cifar"
    bad_cifar.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (bad_cifar / name).write_bytes(b"\x80\x04garbage, not a pickle of a CIFAR batch")
    partial_cifar = base / "partial_cifar"
    partial_cifar.mkdir()
    with open(partial_cifar / "data_batch_1", "wb") as f:
        pickle.dump({b"data": [[0] * 3072], b"labels": [0]}, f)
    (base / "empty_folder").mkdir()
    rgb = _png_folder(base / "rgb")

    good = _save_ckpt(base / "good.pt")
    other_arch = _save_ckpt(base / "other_arch.pt", arch="vgg16_bn")  # resnet weights, declared vgg
    unknown_arch = _save_ckpt(base / "unknown_arch.pt", arch="resnet99")
    version = _save_ckpt(base / "version.pt", format_version=99)
    no_sd = _save_ckpt(base / "no_sd.pt", state_dict=None)
    truncated = base / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    resume_other = base / "resume_other"
    resume_other.mkdir()
    _save_ckpt(resume_other / "dense.pt", arch="vgg16_bn")

    q = ["-q", "--dense-epochs", "1", "-n", "1", "--epochs", "0"]
    cases = {
        "malformed_cifar": (["resnet18", "--data", f"cifar10:{bad_cifar}"], DataError, "malformed CIFAR-10"),
        "partial_cifar": (["resnet18", "--data", f"cifar10:{partial_cifar}"], DataError, "missing data_batch_2"),
        "empty_image_folder": (["resnet18", "--data", f"folder:{base / 'empty_folder'}"], DataError, "no class folders"),
        "nan_plugin_dense": (["resnet18", "--data", "plugin:nan_plugin:nan_images"], NonFiniteError, "training data contains NaN"),
        "nan_plugin_ckpt": ([str(good), "--data", "plugin:nan_plugin:nan_images"], NonFiniteError, "calibration data contains NaN"),
        "other_arch": ([str(other_arch)], InputFileError, "do not fit architecture 'vgg16_bn'"),
        "unknown_arch_in_ckpt": ([str(unknown_arch)], UnsupportedError, "unknown architecture 'resnet99'"),
        "format_version": ([str(version)], InputFileError, "format version 99"),
        "missing_fields": ([str(no_sd)], InputFileError, "lacks checkpoint fields: state_dict"),
        "truncated": ([str(truncated)], InputFileError, "not a readable egp-deploy checkpoint"),
        "missing_ckpt": ([str(base / "nope.pt")], InputFileError, "checkpoint not found"),
        "shape_mismatch": ([str(good), "--data", f"folder:{rgb}"], UsageError, "(3, 32, 32)"),
        "resume_other_arch": (["resnet18", "--resume"], InputFileError, "holds architecture 'vgg16_bn'"),
        "arch_kwargs_on_ckpt": ([str(good), "--arch-kwargs", "width=8"], UsageError, "--arch-kwargs"),
        "bad_arch_kwargs": (["resnet18", "--arch-kwargs", "stem=round"], UnsupportedError, "stem"),
        "bad_schedule": ([str(good), "--schedule", "linear"], UsageError, "--schedule"),
    }
    jobs = {}
    with ThreadPoolExecutor(max_workers=3) as pool:
        for name, (args, _, _) in cases.items():
            out = resume_other if name == "resume_other_arch" else base / f"out_{name}"
            jobs[name] = (out, pool.submit(_run, [*args, "-o", str(out), *q], env))
        help_job = pool.submit(_run, ["--help"], env)
    done = {name: (out, job.result(), cases[name][1], cases[name][2]) for name, (out, job) in jobs.items()}
    return done, help_job.result()


BAD = ["malformed_cifar", "partial_cifar", "empty_image_folder", "nan_plugin_dense", "nan_plugin_ckpt", "other_arch",
       "unknown_arch_in_ckpt", "format_version", "missing_fields", "truncated", "missing_ckpt", "shape_mismatch",
       "resume_other_arch", "arch_kwargs_on_ckpt", "bad_arch_kwargs", "bad_schedule"]


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_one_clear_line_with_its_exit_code_and_no_files(results, name):
    out, r, error_class, words = results[0][name]
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == error_class.exit_code, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert words in lines[0], lines[0]
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    if name == "resume_other_arch":  # the pre-existing file is untouched, nothing added
        assert sorted(p.name for p in out.iterdir()) == ["dense.pt"]
    elif out.exists():
        assert [p for p in out.rglob("*") if p.is_file()] == []


def test_every_prepared_case_is_checked(results):
    assert sorted(results[0]) == sorted(BAD)


def test_exit_codes_are_distinct_per_error_kind():
    codes = [c.exit_code for c in (UsageError, InputFileError, DataError, NonFiniteError, UnsupportedError)]
    assert len(set(codes)) == len(codes) and 0 not in codes and 1 not in codes


def test_help_explains_the_options(results):
    r = results[1]
    assert r.returncode == 0 and r.stderr == ""
    text = " ".join(r.stdout.split())
    for option in ("--method", "--data", "--iterations", "--rate", "--tolerance", "--patience", "--epochs", "--lr",
                   "--dense-epochs", "--batch-size", "--seed", "--resume", "--out", "--entropy-mode", "--momentum",
                   "--weight-decay", "--dist-backend"):
        assert option in text, option
    assert "torchrun" in text and "per rank" in text and "imp" in text and "digits" in text
