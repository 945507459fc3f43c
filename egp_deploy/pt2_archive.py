"""Loading a torch.export ``.pt2`` archive without running anything it carries.

``torch.export.load`` is not a safe loader: it unpickles several members (the sample inputs, with a
silent retry at ``weights_only=False`` when the safe load fails; tensor-subclass weights and
constants; custom and opaque objects), loads AOTInductor shared libraries, passes symbolic-shape
strings to ``sympy.sympify`` (which evaluates them) and ``exec``s the program's guard code.
So before torch sees the bytes, :func:`check_archive` reads the archive itself and refuses

- member names two zip readers could resolve differently (torch's finds names ignoring case and
  takes the first of two equal names, Python's zipfile the last): duplicates, names equal but for
  case, control characters, backslashes, ``..``, members outside the one root folder;
- members that expand far beyond the archive's size (a zip bomb: the check reads every member);
- members torch would unpickle with code (``use_pickle`` payloads, ``custom_obj_*``/``opaque_obj_*``
  constants) and members holding native code (``data/aotinductor/``, anything unknown);
- Python-like strings that are more than the arithmetic of shapes (guard code, ``expr_str``);
- graph nodes whose target is not a registered operator (``torch.ops.*``) or plain arithmetic;

and hands torch a fresh archive of exactly the member bytes it checked (torch's own reader must
list the same members). :func:`load_exported_program` loads that archive with every ``torch.load``
forced to ``weights_only=True`` (the sample inputs, legacy ``.pt`` members), so no fallback can
unpickle code either. ``unsafe=True`` (the CLI's ``--unsafe-pickle``) skips all of it.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
import threading
import zipfile
from pathlib import Path
from typing import Any, Iterator

from egp_deploy.errors import InputFileError

UNSAFE_HINT = "loading it runs arbitrary code: pass --unsafe-pickle only if you trust its origin"

# members (below the archive's root folder) that hold data, not code
_DATA_MEMBER = re.compile(
    r"^(archive_format|archive_version|version|byteorder|\.data/.+|models/[^/]+\.json|extra/.+"
    r"|data/weights/[^/]+|data/constants/[^/]+|data/sample_inputs/[^/]+\.pt"
    r"|serialized_[a-z_]+\.(json|pt))$"  # the torch 2.7 layout
)
_PROGRAM_JSON = re.compile(r"^(models/[^/]+\.json|serialized_exported_program\.json)$")
_PAYLOAD_CONFIG = re.compile(r"^data/(weights|constants)/[^/]+_(weights|constants)_config\.json$")
_PICKLED_CONSTANT_PREFIXES = ("custom_obj_", "opaque_obj_")
# torch.export.save stores members uncompressed; a recompressed archive of pruned (mostly zero)
# weights shrinks a few times, never by more than this
_MAX_EXPANSION, _EXPANSION_SLACK = 64, 64 << 20
_CANONICAL_ROOT = "archive"  # the root folder of the archive handed to torch (the file's own is dropped)

# call targets a graph node may name: registered operators, and arithmetic that cannot reach
# attributes (operator.attrgetter/methodcaller/call would walk to any object's globals)
_SAFE_TARGET = re.compile(
    r"^(torch\.ops\.[A-Za-z0-9_.]+|math\.[a-z0-9_]+|torch\._?sym_[a-z_]+"
    r"|_operator\.(add|sub|mul|truediv|floordiv|mod|pow|neg|pos|abs|eq|ne|lt|le|gt|ge|and_|or_|xor|"
    r"not_|invert|lshift|rshift|getitem|index|floor|ceil|trunc))$"
)
_REFUSED_OPS = re.compile(r"^torch\.ops\.aten\.(from_file|_python_|save)")  # touch files, not tensors

# names a shape expression or guard may use: sympy's shape functions and torch's symbol names
_SAFE_FUNCTIONS = {  # sympy's constructors (as srepr writes them) and torch's shape functions
    "Add", "Mul", "Pow", "Equality", "Unequality", "StrictLessThan", "StrictGreaterThan", "LessThan",
    "GreaterThan", "Xor", "ExprCondPair", "Tuple", "sign", "Infinity", "NegativeInfinity",
    "Symbol", "Integer", "Float", "Rational", "Max", "Min", "Eq", "Ne", "Ge", "Gt", "Le", "Lt", "And", "Or",
    "Not", "Abs", "floor", "ceiling", "Mod", "Piecewise", "ITE", "sqrt", "FloorDiv", "ModularIndexing",
    "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift",
    "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "BitwiseFn_bitwise_and",
    "BitwiseFn_bitwise_or", "OpaqueUnaryFn_sqrt", "OpaqueUnaryFn_exp", "OpaqueUnaryFn_log",
}
_SAFE_CONSTANT_NAMES = {"oo", "zoo", "nan", "true", "false", "True", "False", "None", "inf", "L"}
_SAFE_METHODS = {"size", "stride", "storage_offset", "dim", "numel"}
_SAFE_KEYWORDS = {"positive", "integer", "real", "nonnegative", "negative", "finite", "evaluate"}
_SYMBOL_NAME = re.compile(r"^[a-z]{1,4}[0-9]+$")  # s0, s77, u3, zuf0 ...
_SAFE_NODES = (
    ast.Expression, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Compare, ast.Call, ast.Name, ast.Constant,
    ast.Subscript, ast.Tuple, ast.keyword, ast.Load, ast.operator, ast.unaryop, ast.cmpop, ast.boolop,
    ast.Attribute,
)

_LOAD_LOCK = threading.Lock()  # the torch.load guard is process-wide while it is in place


class UnsafeArchive(InputFileError):
    """The archive carries something that would run code when loaded (refused without --unsafe-pickle)."""


def _refuse(path: Path, what: str) -> UnsafeArchive:
    return UnsafeArchive(f"{path} is a .pt2 archive whose {what}; {UNSAFE_HINT}")


def is_safe_expression(text: str) -> bool:
    """Whether ``text`` is only the arithmetic/comparison of shape symbols, sizes and sympy shape
    functions: no attribute but ``.size()``-like calls, no dunder, no call of anything else."""
    if not isinstance(text, str) or len(text) > 10_000 or "__" in text:
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return False
    for node in ast.walk(tree):
        if not isinstance(node, _SAFE_NODES):
            return False
        if isinstance(node, ast.Name) and not (
            node.id in _SAFE_FUNCTIONS or node.id in _SAFE_CONSTANT_NAMES or _SYMBOL_NAME.match(node.id)
        ):
            return False
        if isinstance(node, ast.Attribute) and node.attr not in _SAFE_METHODS:
            return False
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id not in _SAFE_FUNCTIONS:
                return False
            if not isinstance(func, (ast.Name, ast.Attribute)):
                return False
        if isinstance(node, ast.keyword) and node.arg not in _SAFE_KEYWORDS:
            return False
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and not re.fullmatch(r"[A-Za-z0-9_]{0,64}", node.value):
            return False
    return True


def _walk(obj: Any) -> Iterator[dict]:
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _check_program(path: Path, member: str, program: Any) -> None:
    if not isinstance(program, dict):
        raise InputFileError(f"{path} is a damaged torch.export archive ({member} is not a JSON object)")
    for code in program.get("guards_code") or []:
        if not is_safe_expression(code):
            raise _refuse(path, f"guard code {str(code)[:80]!r} is more than a shape check")
    for key in (program.get("range_constraints") or {}):
        if not is_safe_expression(key):
            raise _refuse(path, f"shape constraint {str(key)[:80]!r} is not a symbol")
    for entry in _walk(program):
        expr = entry.get("expr_str")
        if expr is not None and not is_safe_expression(expr):
            raise _refuse(path, f"shape expression {str(expr)[:80]!r} is more than arithmetic")
        target = entry.get("target") if "inputs" in entry and "outputs" in entry else None
        for name in (target, entry.get("as_operator")):  # a node's call, or an operator passed as an argument
            if isinstance(name, str) and (not _SAFE_TARGET.match(name) or _REFUSED_OPS.match(name)):
                raise _refuse(path, f"graph calls {name[:80]!r}, which is not a tensor operator")


def _check_payload_config(path: Path, member: str, config: Any) -> None:
    entries = (config or {}).get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise InputFileError(f"{path} is a damaged torch.export archive ({member} has no 'config' table)")
    for name, meta in entries.items():
        meta = meta if isinstance(meta, dict) else {}
        file_name = str(meta.get("path_name", ""))
        if meta.get("use_pickle") or file_name.lower().startswith(_PICKLED_CONSTANT_PREFIXES):
            raise _refuse(path, f"entry {name!r} ({file_name}) is a pickled Python object")


def _member_name_problem(rel: str) -> str | None:
    """Why a member name (below the root folder) could be read as another name, or None.

    Torch's zip reader finds names ignoring case and stops at a NUL, Python's zipfile keeps the
    last of two equal names and torch the first: only plain, distinct names mean the same member
    to both."""
    if any(not " " <= ch <= "~" for ch in rel):
        return "holds a control or non-ASCII character"
    if "\\" in rel:
        return "holds a backslash"
    if any(part in ("", ".", "..") for part in rel.split("/")):
        return "has an empty, '.' or '..' path segment"
    return None


def _plain_members(path: Path, zf: zipfile.ZipFile) -> tuple[bool, list[tuple[zipfile.ZipInfo, str]]]:
    """The archive's file members as (entry, name below the root folder), in archive order, and
    whether they sit in a root folder (torch >= 2.8) or at the top (the torch 2.7 layout).

    Refuses (UnsafeArchive) any name torch's reader could resolve to another member than
    zipfile does: duplicates, names equal but for case, odd characters, several root folders."""
    entries = [info for info in zf.infolist() if not (info.orig_filename.endswith("/") and info.file_size == 0)]
    if not entries:
        raise InputFileError(f"{path} is a damaged torch.export archive (no members)")
    rooted = "/" in entries[0].orig_filename
    root = entries[0].orig_filename.split("/", 1)[0] if rooted else ""
    if rooted and (root in ("", ".", "..") or any(ch < " " for ch in root) or "\\" in root):
        raise _refuse(path, f"root folder {root!r} is not a plain folder name")
    members: list[tuple[zipfile.ZipInfo, str]] = []
    seen: dict[str, str] = {}
    for info in entries:
        name = info.orig_filename  # zipfile's .filename stops at a NUL, torch's reader does not
        head, sep, rel = name.partition("/")
        if rooted and (not sep or head != root):
            raise _refuse(path, f"member {name!r} is outside the root folder {root!r}")
        if not rooted:
            rel = name
            if "/" in rel:
                raise _refuse(path, f"member {name!r} is in a folder while others are not")
        problem = _member_name_problem(rel)
        if problem:
            raise _refuse(path, f"member name {name!r} {problem}")
        key = rel.casefold()
        if key in seen:
            twice = f"two members named {rel!r}" if seen[key] == rel else f"members {seen[key]!r} and {rel!r} differ only in case"
            raise _refuse(path, f"member names are ambiguous ({twice})")
        seen[key] = rel
        members.append((info, rel))
    return rooted, members


def _check_member(path: Path, rel: str) -> None:
    lower = rel.lower()  # torch finds members ignoring case: every role is matched the same way
    if lower.startswith(("data/aotinductor/", "data/executorch/", "data/mtia")):
        raise _refuse(path, f"member {rel} holds compiled code")
    if not _DATA_MEMBER.match(lower):
        raise _refuse(path, f"member {rel} is not a part of a plain exported program")
    if lower.startswith("data/constants/") and lower.rsplit("/", 1)[1].startswith(_PICKLED_CONSTANT_PREFIXES):
        raise _refuse(path, f"member {rel} is a pickled Python object")


def _same_records_for_torch(path: Path, archive: bytes, names: list[str]) -> None:
    """Torch's own reader must list exactly the members checked, in the same order."""
    import torch

    records = torch._C.PyTorchFileReader(io.BytesIO(archive)).get_all_records()
    if list(records) != names:
        raise _refuse(path, "members read differently by torch's zip reader than by the check")


def check_archive(path: str | Path, data: bytes) -> bytes:
    """Refuse (UnsafeArchive, an InputFileError) an archive that would run code when torch loads it;
    otherwise return the archive to hand torch: a fresh zip of exactly the member bytes checked,
    under one canonical root folder (so no reader can find a member the check did not read)."""
    path = Path(path)
    rebuilt = io.BytesIO()
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            rooted, members = _plain_members(path, zf)
            expanded = sum(info.file_size for info, _ in members)  # zipfile never yields more than this
            if expanded > _MAX_EXPANSION * len(data) + _EXPANSION_SLACK:
                raise InputFileError(f"{path} is a .pt2 archive whose members expand to {expanded} bytes from "
                                     f"{len(data)}: a zip bomb, not a model")
            for _, rel in members:
                _check_member(path, rel)
            with zipfile.ZipFile(rebuilt, "w", zipfile.ZIP_STORED) as out:
                for info, rel in members:
                    content = zf.read(info)  # this entry, not the last one of its name
                    lower = rel.lower()
                    if _PROGRAM_JSON.match(lower) or _PAYLOAD_CONFIG.match(lower):
                        try:
                            parsed = json.loads(content)
                        except (ValueError, UnicodeDecodeError) as e:
                            raise InputFileError(f"{path} is a damaged torch.export archive ({rel}: {e})") from None
                        if _PROGRAM_JSON.match(lower):
                            _check_program(path, rel, parsed)
                        else:
                            _check_payload_config(path, rel, parsed)
                    out.writestr(zipfile.ZipInfo(f"{_CANONICAL_ROOT}/{rel}" if rooted else rel), content)
    except (zipfile.BadZipFile, OSError, RuntimeError, EOFError) as e:
        raise InputFileError(f"{path} is a corrupt zip archive ({e})") from None
    archive = rebuilt.getvalue()
    if rooted:  # the torch 2.7 layout is read with zipfile itself
        _same_records_for_torch(path, archive, [rel for _, rel in members])
    return archive


@contextlib.contextmanager
def _weights_only_torch_load() -> Iterator[None]:
    """While in place, ``torch.load`` only ever loads weights-only: a caller asking for
    ``weights_only=False`` (torch.export's fallback) gets an UnpicklingError instead."""
    import pickle

    import torch

    original = torch.load

    def guarded(f: Any, *args: Any, weights_only: Any = None, **kwargs: Any) -> Any:
        if weights_only is False:
            raise pickle.UnpicklingError("a member of the archive is a pickle that is not plain weights")
        return original(f, *args, weights_only=True, **kwargs)

    with _LOAD_LOCK:
        torch.load = guarded
        try:
            yield
        finally:
            torch.load = original


def load_exported_program(path: str | Path, unsafe: bool = False) -> Any:
    """``torch.export.load`` of ``path`` that cannot run code from the file unless ``unsafe``.

    Raises UnsafeArchive (exit 3, naming --unsafe-pickle) for an archive that would, and
    InputFileError for a damaged one."""
    import pickle

    import torch

    path = Path(path)
    data = path.read_bytes()
    if unsafe:
        return torch.export.load(io.BytesIO(data))
    checked = check_archive(path, data)  # torch reads only the member bytes the check read
    try:
        with _weights_only_torch_load():
            return torch.export.load(io.BytesIO(checked))
    except pickle.UnpicklingError:
        raise _refuse(path, "members hold pickled Python objects, not plain weights") from None
