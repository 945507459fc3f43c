"""What every console script shares: one-line errors with distinct exit codes, a console, a help
page that says what the command does and how it exits, ``--version``, ``--verbose``, and choices
that are checked by the parser.

:func:`invoke` is the one entry point (console scripts and in-process tests alike): it returns the
exit code instead of calling ``sys.exit``, turns every argument error into ONE line (the message
and a pointer to ``--help``, never click's box), every EgpError into ``error: ...`` with its exit
code, and keeps library warnings (torch's UserWarnings, exporter chatter) out of the terminal
unless ``--verbose`` (they go to the log, which ``--verbose`` prints on stderr).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import inspect
import logging
import os
import sys
import warnings
from typing import Any, Callable, Iterator, Sequence

import typer
import typer.core
from rich.console import Console
from rich.markup import escape

from egp_deploy.errors import EXIT_CODES_HELP, EgpError, first_words, output_error
from egp_deploy.validation import flag_names

try:  # typer >= 0.2x vendors click; older typer raises the click package's exceptions
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException, NoArgsIsHelpError  # type: ignore[no-redef]

# soft_wrap: a line (a warning, an error, a path) stays one line; rich would otherwise cut it at the
# terminal width, or at 80 columns when the output is not a terminal (tables still fit the width)
console = Console(stderr=True, highlight=False, soft_wrap=True)
stdout = Console(highlight=False, soft_wrap=True)
log = logging.getLogger("egp_deploy")

# loggers whose warnings are chatter for a command-line user (kept for --verbose)
_LIBRARY_LOGGERS = ("torch", "torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir", "onnxruntime",
                    "onnx_graphsurgeon", "py.warnings")


def version() -> str:
    """The installed distribution's version (the one source), else the package's."""
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        return dist_version("egp-deploy")
    except (ImportError, PackageNotFoundError):
        from egp_deploy import __version__

        return __version__


# ---------------------------------------------------------------- choices


class Choice(str, enum.Enum):
    """A choice the parser checks (typos are refused with the valid values listed, and --help lists
    them); behaves as its plain string everywhere (==, hashing, f-strings, JSON)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


def choices(name: str, values: Sequence[str]) -> type[Choice]:
    return Choice(name, [(v, v) for v in values])  # type: ignore[return-value]


BACKEND_CHOICES = ("auto", "ort-cpu", "ort-cuda", "ort-trt", "trt", "torch-cpu", "torch-cuda")
Backend = choices("Backend", BACKEND_CHOICES)
Precision = choices("Precision", ("fp32", "fp16"))


# ---------------------------------------------------------------- the app


def _print_version(ctx: typer.Context, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        stdout.print(f"{ctx.info_name or 'egp-deploy'} {version()}")
        raise typer.Exit(0)


def _set_verbose(ctx: typer.Context, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        _configure_logging(verbose=True)


def _with_common_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` with --version and --verbose appended (declared the way typer reads parameters,
    so every typer version and typer.testing see them)."""
    sig = inspect.signature(func, eval_str=True)
    extra = [
        inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
            False, "--verbose", callback=_set_verbose, is_eager=True,
            help="Print library warnings and log messages on stderr (otherwise kept off the terminal).")),
        inspect.Parameter("version", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
            False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit.")),
    ]

    @functools.wraps(func)
    def command(*args: Any, verbose: bool = False, version: bool = False, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt:
            raise _Interrupted from None  # typer would turn it into a silent exit 130

    del command.__wrapped__  # typer must read the signature below, not func's
    command.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])  # type: ignore[attr-defined]
    command.__annotations__ = {name: p.annotation for name, p in command.__signature__.parameters.items()}
    return command


class _Interrupted(BaseException):
    """Ctrl-C inside a command, carried past typer (which catches KeyboardInterrupt and exits 130
    without a word) to :func:`invoke`, which says ``interrupted``."""


class EgpTyper(typer.Typer):
    """A single-command app whose ``help`` reaches the command (typer shows a single command's own
    help, not the app's) followed by the command's docstring, with the exit codes as epilog, and
    --version and --verbose on the command."""

    def __init__(self, help_text: str, epilog: str, **kwargs: Any) -> None:
        super().__init__(help=help_text, **kwargs)
        self._help_text = help_text
        self._epilog = epilog

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        register = super().command

        def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
            doc = (func.__doc__ or "").strip()
            text = "\n\n".join([self._help_text, *_paragraphs(doc)])
            kwargs.setdefault("help", text)
            kwargs.setdefault("epilog", self._epilog)
            kwargs.setdefault("no_args_is_help", True)
            register(*args, **kwargs)(_with_common_options(func))
            return func

        return decorator


def _paragraphs(doc: str) -> list[str]:
    return [" ".join(line.strip() for line in p.splitlines()) for p in doc.split("\n\n") if p.strip()]


def new_app(help_text: str, epilog: str = EXIT_CODES_HELP) -> typer.Typer:
    """A single-command Typer app; pretty tracebacks off because errors are one line."""
    return EgpTyper(
        help_text, epilog,
        add_completion=False,
        pretty_exceptions_enable=False,
        no_args_is_help=True,
        context_settings={"help_option_names": ["-h", "--help"]},
    )


# ---------------------------------------------------------------- running it


_VERBOSE_HANDLER = "_egp_verbose"


def _configure_logging(verbose: bool) -> None:
    """Library warnings (captured from the warnings module) and log records: printed on stderr with
    --verbose (or EGP_DEBUG=1), dropped otherwise, so nothing lands in front of a one-line error."""
    logging.captureWarnings(True)
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if verbose else logging.CRITICAL)
    log.setLevel(logging.DEBUG if verbose else logging.ERROR)
    root = logging.getLogger()
    if verbose and not any(getattr(h, _VERBOSE_HANDLER, False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        setattr(handler, _VERBOSE_HANDLER, True)
        root.addHandler(handler)
    if verbose:
        warnings.simplefilter("default")


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """The logging/warnings set-up of one command, undone afterwards (commands also run in-process)."""
    saved = {name: logging.getLogger(name).level for name in (*_LIBRARY_LOGGERS, "egp_deploy")}
    with warnings.catch_warnings():
        _configure_logging(verbose=bool(os.environ.get("EGP_DEBUG")))
        try:
            yield
        finally:
            logging.captureWarnings(False)
            for name, level in saved.items():
                logging.getLogger(name).setLevel(level)
            root = logging.getLogger()
            for handler in [h for h in root.handlers if getattr(h, _VERBOSE_HANDLER, False)]:
                root.removeHandler(handler)


def argument_error_line(e: Exception, prog_name: str) -> str:
    """click's usage error as one line: the message and where help is."""
    text = e.format_message() if hasattr(e, "format_message") else str(e)
    text = " ".join(part.strip() for part in text.splitlines() if part.strip()).rstrip(".")
    text = text.replace(": Value error, ", ": ")  # typer's validator prefix says nothing
    return f"{text} (see {prog_name} --help)"


def invoke(app: typer.Typer, prog_name: str, argv: Sequence[str] | None = None,
           error_exit: Callable[[EgpError], int] | None = None,
           on_argument_error: Callable[[list[str], str], None] | None = None) -> int:
    """Run ``app`` as ``prog_name`` on ``argv`` (default: sys.argv[1:]) and return its exit code.

    The name is explicit because click would otherwise derive it from how Python was started
    (``python -m egp_deploy.cli.egp-prune`` under the dispatcher)."""
    args = list(sys.argv[1:] if argv is None else argv)
    with _quiet_libraries(), flag_names():  # the library's range errors name the flags
        try:
            code = app(prog_name=prog_name, args=args, standalone_mode=False)
            return code if isinstance(code, int) else 0
        except NoArgsIsHelpError as e:  # the help page, but still a command line that did nothing
            e.show()
            return 2
        except ClickException as e:  # bad command line: one line, exit 2
            line = argument_error_line(e, prog_name)
            console.print(f"[bold red]error:[/] {escape(line)}", soft_wrap=True)
            if on_argument_error is not None:
                on_argument_error(args, line)
            return 2
        except typer.Abort:
            console.print("[bold red]interrupted[/]")
            return 130
        except EgpError as e:
            console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
            return error_exit(e) if error_exit else e.exit_code
        except (KeyboardInterrupt, _Interrupted):
            console.print("[bold red]interrupted[/]")
            return 130
        except Exception as e:  # a bug, not a user error: keep it one line unless debugging
            full = output_error(e, output=False) if isinstance(e, OSError) else None
            if full is not None:  # a full disk or a read-only file system met outside the writers
                console.print(f"[bold red]error:[/] {escape(str(full))}", soft_wrap=True)
                return error_exit(full) if error_exit else full.exit_code
            if os.environ.get("EGP_DEBUG"):
                raise
            log.debug("internal error", exc_info=True)
            first = first_words(e, 400)
            console.print(
                f"[bold red]internal error:[/] {type(e).__name__}: {escape(first)} (rerun with EGP_DEBUG=1 for the traceback)",
                soft_wrap=True,
            )
            return 1


def run_app(app: typer.Typer, prog_name: str, error_exit: Callable[[EgpError], int] | None = None,
            on_argument_error: Callable[[list[str], str], None] | None = None) -> None:
    """Console-script entry: :func:`invoke` on sys.argv, then exit with its code."""
    sys.exit(invoke(app, prog_name, None, error_exit, on_argument_error))


def pass_selection(skip: list[str], only: list[str]) -> dict[str, list[str]]:
    """--skip / --only (repeatable, or comma-separated) as SurgeryOptions fields; the names are
    checked against the pass registry by the surgery before any work."""
    def names(items: list[str]) -> list[str]:
        return [n.strip() for item in items for n in item.split(",") if n.strip()]

    chosen: dict[str, list[str]] = {}
    if skip:
        chosen["skip"] = names(skip)
    if only:
        chosen["only"] = names(only)
    return chosen
