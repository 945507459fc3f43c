"""A differential test of the .pt2 check: torch's zip reader and Python's zipfile disagree on
ambiguous member names (of two equal names torch takes the first, zipfile the last; torch finds
names ignoring case), so an archive with such names could show the check a clean member and torch
a payload. Such archives are refused, nothing in them runs, and torch.export.load only ever sees
an archive whose members are byte for byte the ones the check read."""

from __future__ import annotations

import io
import json
import pickle
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from test_reliability import _Payload, _Tiny, _torch_save_payload

import egp_deploy
from egp_deploy.cli._common import invoke
from egp_deploy.errors import InputFileError
from egp_deploy.pt2_archive import UNSAFE_HINT, UnsafeArchive, load_exported_program

CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
PROGRAM = "models/model.json"


@pytest.fixture(scope="module")
def plain_pt2(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "plain.pt2"  # a dynamic batch: the program holds shape expressions
    torch.export.save(torch.export.export(_Tiny().eval(), (torch.randn(2, 4),),
                                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}}), path)
    return path


def _members(path: Path) -> list[tuple[str, bytes]]:
    """(name below the root folder, bytes) of every member, in archive order."""
    with zipfile.ZipFile(path) as zf:
        return [(info.filename.split("/", 1)[1], zf.read(info)) for info in zf.infolist()]


def _write_zip(path: Path, entries: list[tuple[str, bytes]]) -> Path:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as zf:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names these tests write on purpose
        for name, data in entries:
            zf.writestr(name.replace("\x00", "\x7f"), data)  # zipfile cuts a name at a NUL: put it back below
    raw = buf.getvalue()
    for name, _ in entries:
        if "\x00" in name:
            raw = raw.replace(name.replace("\x00", "\x7f").encode(), name.encode())
    path.write_bytes(raw)
    return path


def _pickled_constants_config(members: list[tuple[str, bytes]]) -> bytes:
    """The constants table with its tensor turned into a pickle torch would load with weights_only=False."""
    config = json.loads(dict(members)[CONSTANTS_CONFIG])
    next(iter(config["config"].values())).update(use_pickle=True)
    return json.dumps(config).encode()


def _evaluated_shape_program(members: list[tuple[str, bytes]], marker: Path) -> bytes:
    """The program with a shape expression sympy.sympify would evaluate (and so create ``marker``)."""
    text = dict(members)[PROGRAM].decode()
    start = text.index("Symbol('s")
    end = text.index(")", start) + 1
    return (text[:start] + f"(open({str(marker)!r}, 'w') and {text[start:end]})" + text[end:]).encode()


def _insert(members: list[tuple[str, bytes]], before: str, extra: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    at = [name for name, _ in members].index(before)
    return members[:at] + extra + members[at:]


def _rooted(entries: list[tuple[str, bytes]], root: str = "plain") -> list[tuple[str, bytes]]:
    return [(f"{root}/{name}", data) for name, data in entries]


# Each builder returns the raw zip entries of an archive that shows zipfile one thing and torch another.
def _duplicate_config_first(m, marker):  # torch reads the first of two equal names, zipfile the last
    hidden = [(CONSTANTS_CONFIG, _pickled_constants_config(m)), ("data/constants/tensor_0", _torch_save_payload(marker))]
    return _rooted(_insert(m, "data/constants/tensor_0", hidden))


def _case_colliding_config(m, marker):  # torch finds names ignoring case
    hidden = [(CONSTANTS_CONFIG.upper().replace("DATA/CONSTANTS", "data/constants"), _pickled_constants_config(m)),
              ("data/constants/TENSOR_0", _torch_save_payload(marker))]
    return _rooted(_insert(m, "data/constants/tensor_0", hidden))


def _duplicate_program_last(m, marker):
    return _rooted(m + [(PROGRAM, _evaluated_shape_program(m, marker))])


def _case_colliding_program(m, marker):
    return _rooted(_insert(m, PROGRAM, [("MODELS/model.json", _evaluated_shape_program(m, marker))]))


def _nul_in_name(m, marker):  # zipfile's ZipInfo.filename stops at the NUL
    return _rooted(m + [(PROGRAM + "\x00x", _evaluated_shape_program(m, marker))])


def _backslashes(m, marker):
    return _rooted(m + [("models\\model.json", _evaluated_shape_program(m, marker))])


def _dot_dot(m, marker):
    return _rooted(m + [("data/../models/model.json", _evaluated_shape_program(m, marker))])


def _dot_segment(m, marker):
    return _rooted(m + [("./models/model.json", _evaluated_shape_program(m, marker))])


def _empty_segment(m, marker):
    return _rooted(m + [("models//model.json", _evaluated_shape_program(m, marker))])


def _absolute_first(m, marker):
    return [("/plain/" + PROGRAM, _evaluated_shape_program(m, marker))] + _rooted(m)


def _outside_the_root(m, marker):
    return _rooted(m) + [("other/" + PROGRAM, _evaluated_shape_program(m, marker))]


def _root_differing_in_case(m, marker):
    return _rooted(m) + _rooted([(PROGRAM, _evaluated_shape_program(m, marker))], root="PLAIN")


def _top_level_and_rooted(m, marker):
    return _rooted(m) + [(PROGRAM.split("/")[1], _evaluated_shape_program(m, marker))]


def _non_ascii(m, marker):  # 'K' and the Kelvin sign fold to the same letter
    return _rooted(m + [("models/mode\u212a.json", _evaluated_shape_program(m, marker))])


AMBIGUOUS = {
    "duplicate config, first": (_duplicate_config_first, "two members named"),
    "config differing in case": (_case_colliding_config, "differ only in case"),
    "duplicate program, last": (_duplicate_program_last, "two members named"),
    "program differing in case": (_case_colliding_program, "differ only in case"),
    "NUL in a name": (_nul_in_name, "control or non-ASCII"),
    "backslashes": (_backslashes, "backslash"),
    "'..' segment": (_dot_dot, "'..' path segment"),
    "'.' segment": (_dot_segment, "'..' path segment"),
    "empty segment": (_empty_segment, "'..' path segment"),
    "absolute path": (_absolute_first, "not a plain folder name"),
    "member outside the root": (_outside_the_root, "outside the root folder"),
    "root differing in case": (_root_differing_in_case, "outside the root folder"),
    "top-level and rooted members": (_top_level_and_rooted, "outside the root folder"),
    "non-ASCII name": (_non_ascii, "control or non-ASCII"),
}
EXPLOITS = ["duplicate config, first", "config differing in case", "duplicate program, last"]


@pytest.fixture
def torch_loads(monkeypatch) -> list[bytes]:
    """Every archive torch.export.load is handed, as bytes (the real load still runs)."""
    seen: list[bytes] = []
    real = torch.export.load

    def recording(f, *args, **kwargs):
        seen.append(f.getvalue() if isinstance(f, io.BytesIO) else Path(f).read_bytes())
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch.export, "load", recording)
    return seen


def _evil(plain_pt2: Path, tmp_path: Path, case: str) -> tuple[Path, Path]:
    marker = tmp_path / "PAYLOAD_RAN"
    entries = AMBIGUOUS[case][0](_members(plain_pt2), marker)
    return _write_zip(tmp_path / "evil.pt2", entries), marker


@pytest.mark.parametrize("case", EXPLOITS)
def test_plain_torch_export_load_runs_the_hidden_member(case, plain_pt2, tmp_path):
    # guards the tests below: these archives are real exploits of the disagreement between readers
    evil, marker = _evil(plain_pt2, tmp_path, case)
    try:
        torch.export.load(evil)
    except Exception:
        pass
    assert marker.exists()


@pytest.mark.parametrize("case", list(AMBIGUOUS))
def test_ambiguous_member_names_are_refused_before_torch_reads_them(case, plain_pt2, tmp_path, torch_loads):
    evil, marker = _evil(plain_pt2, tmp_path, case)
    with pytest.raises(UnsafeArchive) as info:
        load_exported_program(evil)
    message = str(info.value)
    assert AMBIGUOUS[case][1] in message and UNSAFE_HINT in message and "\n" not in message
    assert info.value.exit_code == 3
    assert torch_loads == [] and not marker.exists()


@pytest.mark.parametrize("case", EXPLOITS)
def test_api_refuses_ambiguous_archives(case, plain_pt2, tmp_path, torch_loads):
    evil, marker = _evil(plain_pt2, tmp_path, case)
    with pytest.raises(UnsafeArchive) as info:
        egp_deploy.export(evil, tmp_path / "out.onnx")
    assert info.value.exit_code == 3
    with pytest.raises(UnsafeArchive):
        egp_deploy.deploy(evil, tmp_path / "out.egp.onnx", calibration="random")
    assert torch_loads == [] and not marker.exists() and list(tmp_path.glob("out*")) == []


@pytest.mark.parametrize("case", EXPLOITS)
def test_egp_export_refuses_ambiguous_archives_with_one_line_exit_3(case, plain_pt2, tmp_path, torch_loads, capsys):
    from egp_deploy.cli import export as cli

    evil, marker = _evil(plain_pt2, tmp_path, case)
    code = invoke(cli.app, "egp-export", [str(evil), "-o", str(tmp_path / "out.onnx"), "--no-surgery"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 3 and len(err) == 1 and err[0].startswith("error:") and "--unsafe-pickle" in err[0], err
    assert torch_loads == [] and not marker.exists() and not (tmp_path / "out.onnx").exists()


def test_torch_gets_exactly_the_members_the_check_read(plain_pt2, torch_loads):
    ep = load_exported_program(plain_pt2)
    assert ep.module()(torch.ones(3, 4)).shape == (3, 3)
    (given,) = torch_loads
    with zipfile.ZipFile(io.BytesIO(given)) as zf:
        handed = [(info.filename.split("/", 1)[1], zf.read(info)) for info in zf.infolist()]
    assert handed == _members(plain_pt2)
    records = torch._C.PyTorchFileReader(io.BytesIO(given)).get_all_records()
    assert list(records) == [name for name, _ in handed]


def test_folder_entries_of_a_repacked_archive_are_no_members(plain_pt2, tmp_path):
    # `zip -r` writes an entry per folder: they hold nothing and are dropped, the archive loads
    members = _members(plain_pt2)
    folders = sorted({"plain/" + name.rsplit("/", 1)[0] + "/" for name, _ in members if "/" in name})
    repacked = _write_zip(tmp_path / "repacked.pt2", [(f, b"") for f in ["plain/"] + folders] + _rooted(members))
    assert load_exported_program(repacked).module()(torch.ones(2, 4)).shape == (2, 3)


def test_pickled_member_named_in_capitals_is_refused(plain_pt2, tmp_path):
    # torch would find data/constants/opaque_obj_0 as OPAQUE_OBJ_0: roles are matched ignoring case
    marker = tmp_path / "PAYLOAD_RAN"
    entries = _rooted(_members(plain_pt2) + [("data/constants/OPAQUE_OBJ_0", pickle.dumps(_Payload(marker)))])
    with pytest.raises(UnsafeArchive, match="pickled Python object"):
        load_exported_program(_write_zip(tmp_path / "evil.pt2", entries))
    assert not marker.exists()


def test_a_deflate_bomb_is_refused_before_it_is_expanded(plain_pt2, tmp_path, torch_loads):
    # 128 MiB of zeros deflate to an eighth of a MiB: the check reads every member, so it bounds them first
    path = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in _rooted(_members(plain_pt2)):
            zf.writestr(name, data)
        with zf.open("plain/extra/zeros", "w", force_zip64=True) as member:
            for _ in range(128):
                member.write(bytes(1 << 20))
    assert path.stat().st_size < 1 << 20
    with pytest.raises(InputFileError, match="zip bomb"):
        load_exported_program(path)
    assert torch_loads == []


def test_a_recompressed_archive_still_loads(plain_pt2, tmp_path):
    path = tmp_path / "deflated.pt2"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in _rooted(_members(plain_pt2)):
            zf.writestr(name, data)
    assert load_exported_program(path).module()(torch.ones(2, 4)).shape == (2, 3)
