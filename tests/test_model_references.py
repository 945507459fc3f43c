"""Models by reference: zoo NAME, torchvision:NAME, timm:NAME, package.module:factory, nn.Module instances.

The user's own models live in tests/user_models.py (on pytest's pythonpath; subprocesses get it
through PYTHONPATH). A module a checkpoint names is imported only with --trust-module: the
refusal is checked with a module whose import leaves a marker file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import egp_deploy as egp
from egp_deploy.archs.references import (IMPORT, TIMM, TORCHVISION, ZOO, build_model, parse_reference, reference_of,
                                         trusting)
from egp_deploy.checkpoint import checkpoint_from_model, load_checkpoint, load_weights, save_checkpoint
from egp_deploy.cli._common import invoke
from egp_deploy.cli.prune import app as prune_app
from egp_deploy.errors import BackendUnavailableError, InputFileError, UnsupportedError, UsageError

import user_models
from zoo_imports import import_timm, import_torchvision

HERE = Path(__file__).parent
ROOT = HERE.parent
QUICK = dict(iterations=1, epochs=0, dense_epochs=0, calibration_batches=1, progress=False)

MARKER_MODULE = '''
from pathlib import Path
Path({marker!r}).write_text("imported")
import torch.nn as nn

def make(num_classes=10, in_channels=1):
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))
'''


def _marker_module(folder: Path, name: str) -> Path:
    """A module ``name`` in ``folder`` whose import writes ``folder/name.imported``; returns that path."""
    marker = folder / f"{name}.imported"
    (folder / f"{name}.py").write_text(MARKER_MODULE.format(marker=str(marker)))
    return marker


def _marker_checkpoint(folder: Path, name: str) -> Path:
    """A checkpoint whose model is ``name:make`` (the weights built here, without importing ``name``)."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    path = folder / f"{name}.pt"
    save_checkpoint(path, checkpoint_from_model(model, f"{name}:make", {"num_classes": 10, "in_channels": 1},
                                                (1, 32, 32), 10, {"data": "digits"}))
    return path


def _cli(capsys, *args) -> tuple[int, list[str]]:
    """egp-prune in-process; (exit code, the non-empty stderr lines)."""
    code = invoke(prune_app, "egp-prune", [str(a) for a in args])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


# ------------------------------------------------------------------------------ parsing, building


@pytest.mark.parametrize("text, kind, name, attr", [
    ("resnet18", ZOO, "resnet18", ""),
    ("torchvision:resnet18", TORCHVISION, "resnet18", ""),
    ("timm:resnet18.a1_in1k", TIMM, "resnet18.a1_in1k", ""),
    ("user_models:tiny_cnn", IMPORT, "user_models", "tiny_cnn"),
    ("pkg.sub:Net.build", IMPORT, "pkg.sub", "Net.build"),
])
def test_reference_forms(text, kind, name, attr):
    ref = parse_reference(text)
    assert (ref.kind, ref.name, ref.attr, str(ref)) == (kind, name, attr, text)


@pytest.mark.parametrize("text", ["res net", "a/b:c", "mod:", ":fn", "torchvision:", "pkg.mod", "m:f(x)"])
def test_malformed_references_exit_8(text):
    with pytest.raises(UnsupportedError, match="model reference|names no model"):
        parse_reference(text)


@pytest.mark.parametrize("text, kwargs, words", [
    ("resnt18", {}, "did you mean resnet18"),
    ("user_models:tiny_cnm", {}, "did you mean tiny_cnn"),
    ("no_such_module_xyz:make", {}, "no module named 'no_such_module_xyz'"),
    ("user_models:NOT_A_FACTORY", {}, "not a class or function"),
    ("user_models:not_a_model", {}, "not a torch.nn.Module"),
    ("user_models:tiny_cnn", {"depth": 3}, "bad arguments for model 'user_models:tiny_cnn'"),
])
def test_what_cannot_be_built_is_one_line_exit_8(text, kwargs, words):
    with trusting(text), pytest.raises(UnsupportedError, match=words) as info:
        build_model(text, kwargs)
    assert info.value.exit_code == 8 and "\n" not in str(info.value)


def test_a_factory_gets_the_data_knobs_it_names():
    with trusting("user_models:tiny_cnn"):
        model = build_model("user_models:tiny_cnn", {"num_classes": 3, "width": 6})
    assert isinstance(model, user_models.TinyNet) and model.head.out_features == 3 and model.stem.out_channels == 6
    from egp_deploy.archs.references import data_kwargs

    with trusting(["user_models:tiny_cnn", "user_models:three_channel_cnn"]):
        assert data_kwargs("user_models:tiny_cnn", 10, 1) == {"num_classes": 10, "in_channels": 1}
        assert data_kwargs("user_models:three_channel_cnn", 10, 1) == {"num_classes": 10}
    assert data_kwargs("resnet18", 10, 1) == {"num_classes": 10, "in_channels": 1}
    with pytest.raises(InputFileError, match="--trust-module"):  # reading a signature imports the module
        data_kwargs("user_models:tiny_cnn", 10, 1)


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_a_missing_library_is_exit_5_naming_the_extra(library, monkeypatch):
    monkeypatch.setitem(sys.modules, library, None)  # `import library` raises ImportError
    monkeypatch.delitem(sys.modules, f"{library}.models", raising=False)
    with pytest.raises(BackendUnavailableError, match=rf"{library} is not installed: pip install 'egp-deploy\[zoo\]'"):
        build_model(f"{library}:resnet18")


def test_torchvision_names_and_no_download():
    import_torchvision()
    model = build_model("torchvision:resnet18", {"num_classes": 7})
    assert model.fc.out_features == 7
    with pytest.raises(UnsupportedError, match="did you mean resnet18"):
        build_model("torchvision:resnet19")
    with pytest.raises(UnsupportedError, match="weights would fetch weights"):
        build_model("torchvision:resnet18", {"weights": "DEFAULT"})


def test_timm_names_and_no_download():
    import_timm()
    model = build_model("timm:resnet18", {"num_classes": 5, "in_chans": 1})
    assert model.get_classifier().out_features == 5 and model.conv1.in_channels == 1
    with pytest.raises(UnsupportedError, match="did you mean"):
        build_model("timm:resnet_18")
    with pytest.raises(UnsupportedError, match="pretrained would fetch weights"):
        build_model("timm:resnet18", {"pretrained": True})


def test_reference_of_an_instance():
    assert reference_of(user_models.TinyNet()) == "user_models:TinyNet"

    class Local(nn.Module):
        pass

    assert reference_of(Local()) is None


# ------------------------------------------------------------------------------------- trust


def test_a_checkpoint_naming_a_module_is_refused_without_trust(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = _marker_module(tmp_path, "marker_mod_api")
    ckpt = load_checkpoint(_marker_checkpoint(tmp_path, "marker_mod_api"))
    with pytest.raises(InputFileError, match="--trust-module") as info:
        ckpt.build_model()
    assert info.value.exit_code == 3 and str(tmp_path / "marker_mod_api.pt") in str(info.value)
    with pytest.raises(InputFileError):
        egp.export(tmp_path / "marker_mod_api.pt")
    assert not marker.exists() and "marker_mod_api" not in sys.modules  # nothing was imported
    with trusting("some_other_module:make"), pytest.raises(InputFileError):
        ckpt.build_model()  # trusting one reference is not trusting another
    assert not marker.exists()
    result = egp.export(tmp_path / "marker_mod_api.pt", trust_module=True)
    assert marker.exists() and result.input_shape == (1, 1, 32, 32)
    monkeypatch.delitem(sys.modules, "marker_mod_api")


def test_the_torch_backend_does_not_import_a_module_a_checkpoint_names(tmp_path, monkeypatch):
    from egp_deploy.runners import get_runner

    monkeypatch.syspath_prepend(str(tmp_path))
    marker = _marker_module(tmp_path, "marker_mod_bench")
    runner = get_runner("torch-cpu", _marker_checkpoint(tmp_path, "marker_mod_bench"))
    with pytest.raises(InputFileError, match="egp-export --trust-module") as info:
        runner.load()
    assert info.value.exit_code == 3 and "\n" not in str(info.value)
    assert not marker.exists() and "marker_mod_bench" not in sys.modules


def test_old_checkpoints_still_load():
    # the shipped models record a zoo name in `arch`, as every checkpoint before references did
    for path in sorted((ROOT / "models").glob("*.pt")):
        ckpt = load_checkpoint(path)
        assert parse_reference(ckpt.arch).kind == ZOO
        assert isinstance(ckpt.build_model(), nn.Module)


# ------------------------------------------------------------------------------------ weights


def test_weights_load_weights_only(tmp_path):
    model = user_models.tiny_cnn()
    sd = tmp_path / "sd.pt"
    torch.save({k: v + 1 for k, v in model.state_dict().items()}, sd)
    other = load_weights(user_models.tiny_cnn(), sd)
    assert torch.equal(other.stem.weight, model.stem.weight + 1)
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "trainer.pt")  # a training script's checkpoint
    assert torch.equal(load_weights(user_models.tiny_cnn(), tmp_path / "trainer.pt").head.bias, model.head.bias)
    torch.save(model, tmp_path / "pickled.pt")
    with pytest.raises(InputFileError, match="pickles Python objects"):
        load_weights(user_models.tiny_cnn(), tmp_path / "pickled.pt")
    with pytest.raises(InputFileError, match="of another shape"):
        load_weights(user_models.tiny_cnn(width=6), sd)
    with pytest.raises(InputFileError, match="not found"):
        load_weights(model, tmp_path / "nope.pt")


# ---------------------------------------------------------------------------------- egp.prune


def test_prune_a_reference_records_it_and_resumes(tmp_path):
    out = tmp_path / "run"
    egp.prune("user_models:tiny_cnn", out, arch_kwargs={"width": 4}, **{**QUICK, "iterations": 0})
    dense = load_checkpoint(out / "dense.pt")
    assert dense.arch == "user_models:tiny_cnn" and dense.arch_kwargs == {"num_classes": 10, "in_channels": 1, "width": 4}
    # resuming rebuilds the model from the run's own checkpoints: the reference named here is trusted
    res = egp.prune("user_models:tiny_cnn", out, arch_kwargs={"width": 4}, resume=True, **QUICK)
    assert [r["iteration"] for r in res.log["iterations"]] == [0, 1]
    assert res.log["iterations"][1]["sparsity_prunable"] == pytest.approx(0.5, abs=0.01)
    best = load_checkpoint(res.best_path)
    assert best.arch == "user_models:tiny_cnn"
    with trusting(best.arch):
        assert isinstance(best.build_model(), user_models.TinyNet)


def test_prune_from_weights_starts_from_them(tmp_path):
    torch.manual_seed(1)
    sd = user_models.tiny_cnn(width=4).state_dict()
    torch.save(sd, tmp_path / "sd.pt")
    egp.prune("user_models:tiny_cnn", tmp_path / "run", arch_kwargs="width=4", weights=tmp_path / "sd.pt",
              **{**QUICK, "iterations": 0, "dense_epochs": None})
    dense = load_checkpoint(tmp_path / "run" / "dense.pt")  # --weights: no dense training by default
    assert all(torch.equal(dense.state_dict[k], v) for k, v in sd.items())
    assert dense.metadata["weights"] == str(tmp_path / "sd.pt")


def test_data_gets_the_channels_of_the_models_first_convolution(tmp_path):
    res = egp.prune("user_models:three_channel_cnn", tmp_path / "run", **{**QUICK, "iterations": 0})
    assert load_checkpoint(res.best_path).input_shape == (3, 32, 32)


def test_prune_an_instance(tmp_path):
    torch.manual_seed(0)
    model = user_models.TinyNet(width=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = egp.prune(model, tmp_path / "run", arch_kwargs={"width": 4}, **QUICK)
    best = load_checkpoint(res.best_path)
    assert best.arch == "user_models:TinyNet" and best.arch_kwargs == {"width": 4}
    dense = load_checkpoint(tmp_path / "run" / "dense.pt")  # the instance's weights are the dense model
    assert all(torch.equal(dense.state_dict[k], v) for k, v in before.items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # the caller's model is untouched

    class Local(user_models.TinyNet):
        pass

    with pytest.raises(UnsupportedError, match="cannot be imported again"):
        egp.prune(Local(), tmp_path / "local", **QUICK)
    with pytest.raises(UnsupportedError, match="builds other weights"):
        egp.prune(user_models.TinyNet(width=6), tmp_path / "other", **QUICK)  # rebuilt with width 4
    with pytest.raises(UsageError, match="--weights applies to a model reference"):
        egp.prune(model, tmp_path / "w", weights=tmp_path / "sd.pt", **QUICK)
    assert not (tmp_path / "local").exists() and not (tmp_path / "other").exists()


# --------------------------------------------------------------------------------- egp-prune


def test_option_errors_are_one_line_each(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = _marker_module(tmp_path, "marker_mod_cli")
    ckpt = _marker_checkpoint(tmp_path, "marker_mod_cli")
    model = user_models.tiny_cnn()
    torch.save(model, tmp_path / "pickled.pt")
    torch.save(user_models.tiny_cnn(width=6).state_dict(), tmp_path / "wide.pt")
    q = ["-q", "-n", "1", "--epochs", "0", "--dense-epochs", "0"]
    cases = [
        (["user_models:tiny_cnm"], 8, "did you mean tiny_cnn"),
        (["nosuch_arch"], 8, "neither a checkpoint file nor a model reference"),
        (["user_models:tiny_cnn", "--arch-kwargs", "depth=3"], 8, "bad arguments"),
        (["user_models:tiny_cnn", "--arch-kwargs", "num_classes=3"], 8, "outputs [2, 3]"),
        (["user_models:tiny_cnn", "--weights", tmp_path / "nope.pt"], 3, "weights file not found"),
        (["user_models:tiny_cnn", "--weights", tmp_path / "pickled.pt"], 3, "pickles Python objects"),
        (["user_models:tiny_cnn", "--weights", tmp_path / "wide.pt"], 3, "of another shape"),
        (["torchvision:resnet18", "--arch-kwargs", "weights='DEFAULT'"], 8, "would fetch weights"),
        ([ckpt, "--weights", tmp_path / "wide.pt"], 2, "--weights applies to a model reference"),
        ([ckpt], 3, "--trust-module"),
    ]
    import_torchvision()
    for i, (args, code, words) in enumerate(cases):
        out = tmp_path / f"out{i}"
        got, lines = _cli(capsys, *args, "-o", out, *q)
        assert got == code and len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], (args, got, lines)
        assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()], args
    assert not marker.exists() and "marker_mod_cli" not in sys.modules
    got, lines = _cli(capsys, ckpt, "--trust-module", "-o", tmp_path / "trusted", *q)
    assert got == 0 and marker.exists() and (tmp_path / "trusted" / "best.pt").is_file(), lines
    monkeypatch.delitem(sys.modules, "marker_mod_cli")


@pytest.mark.slow
def test_egp_prune_and_export_a_factory_end_to_end(tmp_path):
    """The real commands, as a user runs them: the factory's folder on PYTHONPATH."""
    env = dict(os.environ, PYTHONPATH=str(HERE), OMP_NUM_THREADS="1")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "egp_deploy.cli", *map(str, args)], capture_output=True,
                              text=True, env=env, timeout=300)

    r = run("prune", "user_models:tiny_cnn", "--arch-kwargs", "width=4", "-o", tmp_path / "run", "-q",
            "--dense-epochs", "0", "-n", "1", "--epochs", "1", "--calibration-batches", "1")
    assert r.returncode == 0, r.stderr
    best = tmp_path / "run" / "best.pt"
    assert load_checkpoint(best).arch == "user_models:tiny_cnn"
    r = run("export", best, "-o", tmp_path / "m.egp.onnx")
    assert r.returncode == 3 and "--trust-module" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not list(tmp_path.glob("m*"))
    r = run("export", best, "-o", tmp_path / "m.egp.onnx", "--trust-module", "--samples", "64", "--threads", "1")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "m.egp.json").read_text())
    assert report["source"]["arch"] == "user_models:tiny_cnn" and report["export"]["max_rel_error_vs_torch"] < 1e-4
    check = report["surgery"]["verification"]["held_out"]  # the surgery verified its rewrite before writing
    assert check["problem"] is None and check["rel_error"] <= report["surgery"]["verification"]["tolerance"]


@pytest.mark.slow
def test_egp_prune_a_torchvision_model(tmp_path, capsys):
    import_torchvision()
    got, lines = _cli(capsys, "torchvision:resnet18", "-o", tmp_path / "run", "-q", "-n", "1", "--epochs", "0",
                      "--dense-epochs", "0", "--calibration-batches", "1")
    assert got == 0, lines
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    # digits are grey: they were given the 3 channels of resnet18's stem; num_classes followed the data
    assert best.arch == "torchvision:resnet18" and best.arch_kwargs == {"num_classes": 10}
    assert best.input_shape == (3, 32, 32) and best.metadata["sparsity_prunable"] == pytest.approx(0.5, abs=0.01)
    assert isinstance(best.build_model(), nn.Module)  # a registry name needs no --trust-module


# ---------------------------------------------------------------------------------------- docs


def _pruner_snippet(doc: str) -> str:
    import re

    match = re.search(r"<!-- snippet:pruner -->\s*```python\n(.*?)```", (ROOT / doc).read_text(), re.S)
    assert match, f"{doc} lost its Bring-your-own-model snippet"
    return match.group(1)


def test_readme_and_prune_docs_show_the_same_pruner_snippet():
    assert _pruner_snippet("README.md") == _pruner_snippet("docs/prune.md")


def test_pruner_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(_pruner_snippet("docs/prune.md"), "docs/prune.md", "exec"), {"__name__": "snippet"})
    assert (tmp_path / "pruner.pt").is_file() and (tmp_path / "model.pt2").is_file()
