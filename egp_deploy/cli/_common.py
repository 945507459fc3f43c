"""What every console script shares: one-line errors with distinct exit codes, a console."""

from __future__ import annotations

import os
import sys
from typing import Callable

import typer
from rich.console import Console
from rich.markup import escape

from egp_deploy.errors import EgpError

console = Console(stderr=True, highlight=False)
stdout = Console(highlight=False)


def new_app(help_text: str) -> typer.Typer:
    """A single-command Typer app; pretty tracebacks off because errors are one line."""
    return typer.Typer(
        help=help_text,
        add_completion=False,
        pretty_exceptions_enable=False,
        no_args_is_help=True,
        context_settings={"help_option_names": ["-h", "--help"]},
    )


def run_app(app: typer.Typer, prog_name: str, error_exit: Callable[[EgpError], int] | None = None) -> None:
    """Run ``app`` as ``prog_name``; turn EgpError into ``error: ...`` + its exit code, anything else
    into exit 1. The name is explicit because click would otherwise derive it from how Python was
    started (``python -m egp_deploy.cli.egp-prune`` under the dispatcher)."""
    try:
        app(prog_name=prog_name)
    except EgpError as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        sys.exit(error_exit(e) if error_exit else e.exit_code)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]")
        sys.exit(130)
    except Exception as e:  # a bug, not a user error: keep it one line unless debugging
        if os.environ.get("EGP_DEBUG"):
            raise
        console.print(
            f"[bold red]internal error:[/] {type(e).__name__}: {escape(str(e))} (rerun with EGP_DEBUG=1 for the traceback)",
            soft_wrap=True,
        )
        sys.exit(1)
