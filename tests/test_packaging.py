"""Packaging a user can trust: one onnxruntime, every import declared, one version, license files."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest

import egp_deploy

ROOT = Path(__file__).resolve().parents[1]
DIST = "egp-deploy"
# import name -> distribution name, where they differ
IMPORT_TO_DIST = {"sklearn": "scikit-learn", "PIL": "pillow", "onnx_graphsurgeon": "onnx-graphsurgeon",
                  "onnxruntime": "onnxruntime", "tensorrt": "tensorrt",
                  # cli/_common falls back to click only under the typer releases that depend on it
                  "click": "typer"}
# optional backends, imported only behind a probe: declared as extras, not as dependencies
OPTIONAL = {"onnxruntime", "tensorrt", "onnxsim", "onnxslim"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _norm(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0])


def _requires(dist: str, extra: str | None = None) -> set[str]:
    out = set()
    for req in md.distribution(dist).requires or []:
        marker = req.split(";", 1)[1] if ";" in req else ""
        wanted = f'extra == "{extra}"' in marker if extra else "extra ==" not in marker
        if wanted:
            out.add(_requirement_name(req))
    return out


def _closure(names: set[str]) -> set[str]:
    """Every installed distribution the given ones pull in (unconditional requirements)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo.extend(_requires(name) - seen)
        except md.PackageNotFoundError:
            pass
    return seen


def test_exactly_one_distribution_provides_the_onnxruntime_module():
    providers = sorted(
        d.metadata["Name"] for d in md.distributions()
        if any(str(f).replace("\\", "/") == "onnxruntime/__init__.py" for f in (d.files or []))
    )
    assert len(providers) == 1, f"onnxruntime installed by {providers}: uninstalling one breaks the other"
    names = sorted({_norm(d.metadata["Name"]) for d in md.distributions()
                    if _norm(d.metadata["Name"]) in ("onnxruntime", "onnxruntime-gpu")})
    assert len(names) == 1, names


def test_test_extra_brings_no_onnxruntime_so_gpu_test_stays_single():
    assert _requires(DIST, "cpu") == {"onnxruntime"}
    assert _requires(DIST, "gpu") == {"onnxruntime-gpu"}
    pulled = _closure(_requires(DIST) | _requires(DIST, "test"))
    assert not {n for n in pulled if n.startswith("onnxruntime")}, sorted(pulled)


def test_one_version_and_license_metadata():
    dist = md.distribution(DIST)
    assert dist.version == egp_deploy.__version__
    assert dist.metadata["License-Expression"] == "Apache-2.0"
    assert "LICENSE" in (dist.metadata.get_all("License-File") or [])
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert (ROOT / "egp_deploy" / "py.typed").is_file()
    assert f"## {egp_deploy.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def _third_party_imports() -> set[str]:
    stdlib = set(sys.stdlib_module_names)
    found: set[str] = set()
    for path in (ROOT / "egp_deploy").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            found.update(t for t in tops if t not in stdlib and t != "egp_deploy")
    return found


def test_every_imported_package_is_declared():
    declared = _requires(DIST) | set().union(*(_requires(DIST, e) for e in md.distribution(DIST).metadata.get_all("Provides-Extra")))
    missing = {m for m in _third_party_imports()
               if _norm(IMPORT_TO_DIST.get(m, m)) not in declared
               and not (m in OPTIONAL and any(d.startswith(_norm(m)) for d in declared))}
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"


@pytest.mark.parametrize("name", ["onnx", "onnxruntime", "numpy"])
def test_declared_runtime_libraries_import(name):
    __import__(name)


def test_every_package_folder_is_a_regular_package():
    # setuptools' packages.find only ships folders with an __init__.py: a missing one drops a subpackage
    # from a (non-editable) install
    for folder in (ROOT / "egp_deploy").rglob("*"):
        if folder.is_dir() and folder.name != "__pycache__" and any(folder.glob("*.py")):
            assert (folder / "__init__.py").is_file(), folder
