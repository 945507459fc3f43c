"""Hardening (issue 13): a careless or malicious user gets one line and an exit code, never a
traceback, a hang, a payload that runs, or a lost file."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from egp_deploy.errors import InputFileError
from egp_deploy.pt2_archive import UNSAFE_HINT, is_safe_expression, load_exported_program

# ---------------------------------------------------------------- 1. a .pt2 cannot run code


class _Payload:
    """Unpickling this creates ``marker``: proof that the loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _torch_save_payload(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"x": _Payload(marker)}, buf)
    return buf.getvalue()


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) + torch.tensor([1.0, 2.0, 3.0])  # a lifted constant: a constants member


@pytest.fixture(scope="module")
def plain_pt2(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "plain.pt2"
    torch.export.save(torch.export.export(_Tiny().eval(), (torch.randn(2, 4),),
                                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}}), path)
    return path


def _rewrite(src: Path, dst: Path, edit) -> Path:
    with zipfile.ZipFile(src) as zin:
        items = {n: zin.read(n) for n in zin.namelist()}
    root = next(iter(items)).split("/")[0]
    members = {n.split("/", 1)[1]: v for n, v in items.items()}
    edit(members)
    with zipfile.ZipFile(dst, "w") as zout:
        for name, data in members.items():
            zout.writestr(f"{root}/{name}", data)
    return dst


def _edit_config(members: dict, which: str, change) -> None:
    key = f"data/{which}/model_{which}_config.json"
    config = json.loads(members[key])
    change(next(iter(config["config"].values())))
    members[key] = json.dumps(config).encode()


def _sample_inputs(m, marker):
    m["data/sample_inputs/model.pt"] = _torch_save_payload(marker)


def _pickled_weight(m, marker):
    _edit_config(m, "weights", lambda e: e.update(use_pickle=True))
    m["data/weights/weight_0"] = _torch_save_payload(marker)


def _pickled_constant(m, marker):
    _edit_config(m, "constants", lambda e: e.update(use_pickle=True))
    m["data/constants/tensor_0"] = _torch_save_payload(marker)


def _opaque_constant(m, marker):
    _edit_config(m, "constants", lambda e: e.update(path_name="opaque_obj_0", use_pickle=True))
    m["data/constants/opaque_obj_0"] = pickle.dumps(_Payload(marker))


def _custom_constant(m, marker):
    _edit_config(m, "constants", lambda e: e.update(path_name="custom_obj_0", use_pickle=True))
    m["data/constants/custom_obj_0"] = pickle.dumps(_Payload(marker))


def _legacy_weights(m, marker):
    m["data/weights/model.pt"] = _torch_save_payload(marker)


def _legacy_constants(m, marker):
    m["data/constants/model.pt"] = _torch_save_payload(marker)


def _guard_code(m, marker):
    program = json.loads(m["models/model.json"])
    program["guards_code"] = [f"open({str(marker)!r}, 'w') is not None"]
    m["models/model.json"] = json.dumps(program).encode()


def _shape_expression(m, marker):  # sympy.sympify evaluates these strings
    text = m["models/model.json"].decode()
    symbol = "Symbol('s"
    start = text.index(symbol)
    end = text.index(")", start) + 1
    m["models/model.json"] = (text[:start] + f"(open({str(marker)!r}, 'w') and {text[start:end]})"
                              + text[end:]).encode()


def _graph_target(m, marker):
    program = json.loads(m["models/model.json"])
    program["graph_module"]["graph"]["nodes"][0]["target"] = "_operator.attrgetter"
    m["models/model.json"] = json.dumps(program).encode()


def _compiled_code(m, marker):
    m["data/aotinductor/model/model.so"] = b"\x7fELF"


PAYLOADS = {
    "sample_inputs": _sample_inputs, "pickled weight": _pickled_weight, "pickled constant": _pickled_constant,
    "opaque object": _opaque_constant, "custom object": _custom_constant, "legacy weights": _legacy_weights,
    "legacy constants": _legacy_constants, "guard code": _guard_code, "shape expression": _shape_expression,
    "graph target": _graph_target, "compiled code": _compiled_code,
}


@pytest.mark.parametrize("member", list(PAYLOADS))
def test_pt2_payload_in_any_member_does_not_run(member, plain_pt2, tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    evil = _rewrite(plain_pt2, tmp_path / "evil.pt2", lambda m: PAYLOADS[member](m, marker))
    with pytest.raises(InputFileError) as info:
        load_exported_program(evil)
    assert not marker.exists(), f"the {member} payload ran"
    assert UNSAFE_HINT in str(info.value) and "\n" not in str(info.value)
    assert InputFileError.exit_code == 3


@pytest.mark.parametrize("member", ["sample_inputs", "pickled weight", "opaque object", "shape expression"])
def test_plain_torch_export_load_would_run_those_payloads(member, plain_pt2, tmp_path):
    # guards the test above: the crafted archives are real exploits of torch.export.load
    marker = tmp_path / "PAYLOAD_RAN"
    evil = _rewrite(plain_pt2, tmp_path / "evil.pt2", lambda m: PAYLOADS[member](m, marker))
    try:
        torch.export.load(str(evil))
    except Exception:
        pass
    assert marker.exists()


def test_plain_pt2_still_loads_and_runs(plain_pt2):
    ep = load_exported_program(plain_pt2)
    out = ep.module()(torch.ones(3, 4))
    assert out.shape == (3, 3)


def test_egp_export_refuses_payload_pt2_with_one_line_exit_3(plain_pt2, tmp_path, capsys):
    from egp_deploy.cli import export as cli

    from egp_deploy.cli._common import invoke

    marker = tmp_path / "PAYLOAD_RAN"
    evil = _rewrite(plain_pt2, tmp_path / "evil.pt2", lambda m: _sample_inputs(m, marker))
    out = tmp_path / "out.onnx"
    code = invoke(cli.app, "egp-export", [str(evil), "-o", str(out), "--no-surgery"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 3 and not marker.exists() and not out.exists()
    assert len(err) == 1 and err[0].startswith("error:") and "--unsafe-pickle" in err[0], err


@pytest.mark.parametrize("text", [
    "Symbol('s77', positive=True, integer=True)", "2*s0 + 1", "Max(1, s0)", "Eq(Mod(s0, 2), 0)",
    "L['x'].size()[0] <= 1024", "FloorDiv(s1, 4) >= 2",
])
def test_shape_expressions_torch_writes_are_accepted(text):
    assert is_safe_expression(text)


@pytest.mark.parametrize("text", [
    "open('/x', 'w')", "__import__('os').system('true')", "s0.__class__", "exec(bytes((1, 2)))",
    "(lambda: 1)()", "L['x'].size.__self__", "getattr(s0, 'x')", "[s0 for s0 in s1]", "Symbol('a; b')",
])
def test_shape_expressions_that_reach_code_are_refused(text):
    assert not is_safe_expression(text)
