"""Progress bars that show signs of life in a terminal AND in a log file.

``progress_bar`` is tqdm.auto's bar (a notebook widget in Jupyter, a live bar in a terminal). When
stderr is not a terminal (a log, CI, ``| tee``), tqdm would rewrite one line with carriage
returns that a log keeps as a single unreadable line; there every refresh becomes its own line,
at most every ``LOG_INTERVAL_S`` seconds, with the same iteration count, rate and ETA (transient
inner bars, ``leave=False``, appear only once they have run that long).
"""

from __future__ import annotations

import re
import sys
from typing import Any, TextIO

LOG_INTERVAL_S = 15.0
_CURSOR_MOVES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # how tqdm stacks nested bars in a terminal


class _LineWriter:
    """A file for tqdm that turns its in-place redraws into one line per refresh."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> int:
        parts = [p.rstrip() for p in _CURSOR_MOVES.sub("", text).replace("\r", "\n").split("\n")]
        lines = [p for p in parts if p.strip()]
        if lines and lines[-1] == self.last:  # tqdm redraws the final state on close
            lines.pop()
        if lines:
            self.last = lines[-1]
            self.stream.write("\n".join(lines) + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(iterable: Any = None, *, desc: str | None = None, disable: bool = False, **kw: Any) -> Any:
    """tqdm.auto.tqdm(iterable, desc=..., **kw), log-friendly when stderr is not a terminal."""
    from tqdm.auto import tqdm

    kw.setdefault("dynamic_ncols", True)
    if disable or "file" in kw or _is_terminal(sys.stderr) or _in_notebook():
        return tqdm(iterable, desc=desc, disable=disable, **kw)
    kw.update(file=_LineWriter(sys.stderr), mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S,
              dynamic_ncols=False, ncols=100, ascii=True)
    if kw.get("leave") is False:  # a transient (inner) bar: in a log only when it runs for a while
        kw.setdefault("delay", LOG_INTERVAL_S)
    return _log_bar_class(tqdm)(iterable, desc=desc, **kw)


def _log_bar_class(base: type) -> type:
    class LogBar(base):  # type: ignore[misc, valid-type]
        """A bar whose postfix updates wait for the next timed refresh (tqdm redraws on each by default)."""

        def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
            super().set_postfix(ordered_dict, refresh=False, **kwargs)

    return LogBar


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    try:
        return shell is not None and type(shell.get_ipython()).__name__ == "ZMQInteractiveShell"  # type: ignore[attr-defined]
    except Exception:
        return False
