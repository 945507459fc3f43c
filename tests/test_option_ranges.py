"""Every numeric option of every command and of every library call it runs: NaN, the infinities,
negatives, zero where it is invalid and values beyond the range are refused before any work, with
the same exit code from the command and from the Python API.

The options come from the one table (egp_deploy.validation.RANGES and SURGERY_OPTIONS), so a new
entry is covered here without a new test. The first piece of real work of each call is stubbed to
raise: a refusal must come before it, and with valid values it must be reached (so the stub is the
right one and the refusals are the checks', not an accident)."""

from __future__ import annotations

import importlib
import inspect
import math
import re
import typing
from pathlib import Path

import pytest
import torch

from egp_deploy import api
from egp_deploy.cli._common import invoke
from egp_deploy.errors import EgpError, UsageError
from egp_deploy.validation import RANGES, SURGERY_OPTIONS, Range
from test_reliability import _tiny_onnx  # the one tiny single-input ONNX model of the CLI tests


class _ReachedTheWork(BaseException):
    """Raised by the stubbed first piece of real work (a BaseException: egp_deploy.check catches Exception)."""


# the first call that does real work in each library call (its checks all come before it)
WORK = {
    "prune": ("egp_deploy.distributed", "init_distributed"), "export": ("egp_deploy.export", "load_source"),
    "deploy": ("egp_deploy.export", "load_source"), "optimize": ("egp_deploy.api", "_load_onnx"),
    "surgery_file": ("egp_deploy.api", "_load_onnx"), "bench": ("egp_deploy.bench", "benchmark_models"),
    "check": ("egp_deploy.bench", "benchmark_models"), "build_engine": ("egp_deploy.build", "onnx_inputs"),
}

# library call -> (its table, the parameters that take SurgeryOptions fields: "options" or keyword overrides)
CALLS = {
    "prune": ("prune", None), "export": ("export", None), "deploy": ("export", "options"),
    "optimize": ("surgery", "overrides"), "surgery_file": ("surgery", "options"), "bench": ("bench", None),
    "check": ("check", None), "build_engine": ("build", None),
}
ALIASES = {"export": {"export_tolerance": "tolerance"}}  # api.export(tolerance=) is deploy's export_tolerance

# command -> (the library call it runs, whether it takes SurgeryOptions fields as flags / as --set KEY=VALUE)
COMMANDS = {"prune": "prune", "export": "deploy", "surgery": "surgery_file", "bench": "bench", "check": "check",
            "build": "build_engine"}


def _function(call: str):
    if call == "build_engine":
        return importlib.import_module("egp_deploy.build").build_engine
    return getattr(api, call)


def _parameters(call: str) -> dict[str, str]:
    """{table name: parameter name} of the table entries ``call`` takes."""
    params = inspect.signature(_function(call)).parameters
    kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    aliases = ALIASES.get(call, {})
    table = RANGES[CALLS[call][0]]
    return {name: aliases.get(name, name) for name in table
            if aliases.get(name, name) in params or (kwargs and call in ("bench", "check"))}


def invalid_values(rng: Range) -> list[float]:
    """NaN, the infinities, a negative, zero, just outside each bound, a fraction for a count: those ``rng`` refuses."""
    candidates: list[float] = [math.nan, math.inf, -math.inf, -1, 0, -1e-9]
    if rng.low is not None:
        candidates += [rng.low - 1, rng.low - 1e-3]
    if rng.high is not None:
        candidates += [rng.high + 1, rng.high * 10 + 1]
    candidates += [b for b, is_open in ((rng.low, rng.low_open), (rng.high, rng.high_open)) if b is not None and is_open]
    refused = [v for v in candidates if not rng.contains(v)]
    if rng.integer:
        low = rng.low if rng.low is not None else 0
        refused.append(low + 0.5)
    out: list[float] = []
    for v in refused:
        if not any(v == o or (math.isnan(v) and math.isnan(o)) for o in out):
            out.append(int(v) if rng.integer and math.isfinite(v) and float(v).is_integer() else v)
    return out


def _option_cases() -> list[tuple[str, str, str, Range]]:
    """(library call, where the value goes: 'param' or 'surgery', name, range) for every table entry a call takes."""
    cases = []
    for call, (_, surgery) in CALLS.items():
        for name in _parameters(call):
            cases.append((call, "param", name, RANGES[CALLS[call][0]][name][1]))
        if surgery:
            cases += [(call, "surgery", field, rng) for field, (_, rng) in SURGERY_OPTIONS.items()]
    return cases


OPTION_CASES = _option_cases()


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _tiny_onnx(tmp_path / "m.onnx")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "m.pt")  # a torch.save file: deploy's model check passes it
    return tmp_path


@pytest.fixture
def stubbed(monkeypatch):
    """Stub the first work of every call; returns the list of calls that reached it."""
    reached: list[str] = []

    def stub(name):
        def work(*_a, **_k):
            reached.append(name)
            raise _ReachedTheWork(name)
        return work

    for module, name in set(WORK.values()):
        monkeypatch.setattr(importlib.import_module(module), name, stub(f"{module}.{name}"))
    return reached


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _api_call(call: str, workdir: Path, where: str, name: str, value) -> typing.Callable[[], object]:
    """``call`` on the work folder's files with ``value`` for option ``name`` (None: all defaults)."""
    onnx_model, torch_model = workdir / "m.onnx", workdir / "m.pt"
    kwargs: dict = {}
    if where == "param":
        kwargs[_parameters(call)[name]] = value
    elif where == "surgery":
        kwargs.update({name: value} if CALLS[call][1] == "overrides" else {"options": {name: value}})
    fn = _function(call)
    args = {
        "prune": ("resnet18", workdir / "run"), "export": (torch_model,), "deploy": (torch_model, workdir / "o.egp.onnx"),
        "optimize": (onnx_model,), "surgery_file": (onnx_model, workdir / "o.onnx"), "bench": (onnx_model,),
        "check": (onnx_model, kwargs.pop("budget_ms", 5.0)), "build_engine": (onnx_model,),
    }[call]
    if call == "prune":
        kwargs.setdefault("progress", False)
    return lambda: fn(*args, **kwargs)


def _api_exit_code(call: str, run) -> int:
    """The exit code the library call gives: its exception's, or egp_deploy.check's verdict code."""
    if call == "check":
        result = run()
        assert result.verdict == "could_not_measure", result.message
        return result.exit_code
    with pytest.raises(EgpError) as refused:
        run()
    assert isinstance(refused.value, UsageError), refused.value
    return refused.value.exit_code


def _cli_args(command: str, workdir: Path, flag: str | None, value) -> list[str]:
    base = {"prune": ["resnet18", "-o", workdir / "run"], "export": [workdir / "m.pt", "-o", workdir / "o.egp.onnx"],
            "surgery": [workdir / "m.onnx", workdir / "o.onnx"], "bench": [workdir / "m.onnx"],
            "check": [workdir / "m.onnx", "--budget-ms", "5"], "build": [workdir / "m.onnx"]}[command]
    return [str(a) for a in base] + ([f"{flag}={_text(value)}"] if flag else [])


def _text(value) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


def _run_cli(command: str, args: list[str], capsys) -> tuple[int, list[str]]:
    app = importlib.import_module(f"egp_deploy.cli.{command}").app
    code = invoke(app, f"egp-{command}", args, error_exit=(lambda e: 2) if command == "check" else None)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _cli_spellings(call: str, where: str, name: str) -> list[tuple[str, str]]:
    """(command, flag) pairs that set option ``name`` of library call ``call`` on a command line."""
    command = next(c for c, target in COMMANDS.items() if CALLS[target][0] == CALLS[call][0])  # the same table
    if where == "param":
        flag = RANGES[CALLS[call][0]][name][0]
        return [(command, flag)] if flag else []
    spellings = [("export", f"--set {name}")]
    flag = SURGERY_OPTIONS[name][0]
    if flag:
        spellings.append(("surgery", flag))
    return spellings


# ---------------------------------------------------------------- the table covers every option


def _numeric(annotation) -> bool:
    """A scalar number (int, float, optionally None), from the annotation's text."""
    words = set(re.findall(r"\w+", annotation if isinstance(annotation, str) else str(annotation)))
    return bool(words & {"int", "float"}) and words <= {"int", "float", "None", "Optional"}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_every_numeric_parameter_of_a_library_call_is_in_its_table(call):
    params = inspect.signature(_function(call)).parameters
    aliases = {v: k for k, v in ALIASES.get(call, {}).items()}
    numeric = {aliases.get(n, n) for n, p in params.items()
               if p.kind is not inspect.Parameter.VAR_KEYWORD and _numeric(p.annotation)}
    assert numeric <= set(RANGES[CALLS[call][0]]), numeric - set(RANGES[CALLS[call][0]])


def test_every_numeric_surgery_option_is_in_the_table():
    from egp_deploy.surgery import SurgeryOptions

    hints = typing.get_type_hints(SurgeryOptions)
    numeric = {n for n, t in hints.items() if int in typing.get_args(t) + (t,) or float in typing.get_args(t) + (t,)}
    assert numeric and numeric == set(SURGERY_OPTIONS), numeric ^ set(SURGERY_OPTIONS)


def test_every_numeric_bench_setting_is_in_the_table():
    from egp_deploy.bench import BenchSettings

    hints = typing.get_type_hints(BenchSettings)
    numeric = {n for n, t in hints.items() if t is not bool and {int, float} & set(typing.get_args(t) + (t,))}
    assert numeric and numeric <= set(RANGES["bench"]), numeric - set(RANGES["bench"])


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_numeric_flag_of_a_command_is_checked_by_its_library_call(command):
    func = getattr(importlib.import_module(f"egp_deploy.cli.{command}"), command)
    call = COMMANDS[command]
    known = set(RANGES[CALLS[call][0]]) | (set(SURGERY_OPTIONS) if command == "surgery" else set())
    numeric = set()
    for name, param in inspect.signature(func, eval_str=True).parameters.items():
        kinds = typing.get_args(param.annotation) or (param.annotation,)
        if any(k in (int, float) for k in kinds):
            numeric.add(name)
    assert numeric and numeric <= known, numeric - known


def test_the_invalid_values_are_invalid_and_cover_the_kinds_the_issue_names():
    for _, _, name, rng in OPTION_CASES:
        values = invalid_values(rng)
        assert any(isinstance(v, float) and math.isnan(v) for v in values), name
        assert math.inf in values and -math.inf in values and any(v < 0 for v in values), name
        assert all(not rng.contains(v) or (rng.integer and not float(v).is_integer()) for v in values), name


# ---------------------------------------------------------------- refused before any work, same exit code


@pytest.mark.parametrize("call", sorted(CALLS))
def test_valid_options_reach_the_work(call, workdir, stubbed):
    run = _api_call(call, workdir, "none", "", None)
    with pytest.raises(_ReachedTheWork):
        run()
    assert stubbed == [".".join(WORK[call])]


@pytest.mark.parametrize("call,where,name,rng", OPTION_CASES,
                         ids=[f"{c}-{n}" for c, _, n, _ in OPTION_CASES])
def test_an_out_of_range_option_is_refused_before_any_work_by_the_api_and_the_command(
        call, where, name, rng, workdir, stubbed, capsys):
    before = _tree(workdir)
    spellings = _cli_spellings(call, where, name)
    for value in invalid_values(rng):
        api_code = _api_exit_code(call, _api_call(call, workdir, where, name, value))
        assert stubbed == [] and _tree(workdir) == before, (call, name, value)
        assert api_code == 2, (call, name, value)
        for command, flag in spellings:
            if flag.startswith("--set "):
                args = _cli_args(command, workdir, None, value) + ["--set", f"{name}={_text(value)}"]
            else:
                args = _cli_args(command, workdir, flag, value)
            code, err = _run_cli(command, args, capsys)
            assert code == api_code, (args, code, err)
            assert len(err) == 1 and err[0].startswith("error:"), (args, err)
            assert stubbed == [] and _tree(workdir) == before, (args, stubbed)


@pytest.mark.parametrize("call,where,name,rng", [c for c in OPTION_CASES if c[0] in ("prune", "optimize")],
                         ids=[f"{c}-{n}" for c, _, n, _ in OPTION_CASES if c in ("prune", "optimize")])
def test_the_api_message_names_the_parameter_and_the_command_names_the_flag(call, where, name, rng, workdir, stubbed, capsys):
    with pytest.raises(UsageError, match=rf"^{name} must be"):
        _api_call(call, workdir, where, name, math.nan)()
    for command, flag in _cli_spellings(call, where, name):
        if flag.startswith("--set"):
            continue
        parsed = next(v for v in invalid_values(rng) if math.isfinite(v) and float(v).is_integer())  # the parser takes it
        code, err = _run_cli(command, _cli_args(command, workdir, flag, parsed), capsys)
        assert code == 2 and err[0].startswith(f"error: {flag} must be"), err
