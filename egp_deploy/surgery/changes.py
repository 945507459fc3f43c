"""What a pass gets (Context) and what it gives back (Change records)."""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator


@dataclass(frozen=True)
class Change:
    """One rewrite a pass made.

    ``section`` is the report list it belongs to (``changes[section]`` in the surgery report:
    "canonicalized", "stripped", "merged", ...); ``record`` is that list's entry. ``section=None``
    marks a change with nothing to report (constant folding): the pipeline then only knows that the
    graph's shapes are stale. ``replaces``: the records replace the section (unpin_survivors rewrites
    the strip records); a ``None`` record then just empties it."""

    section: str | None
    record: Any = None
    replaces: bool = False


@dataclass
class Context:
    """Everything a pass may read besides the graph; passes write only through their Changes (and,
    for the merge planner, the candidate log)."""

    options: Any  # SurgeryOptions
    stats: dict[str, Any] | None = None  # activation statistics by node name (None: no data-dependent strips)
    module_of: Callable[[str], str | None] = lambda n: None
    cost_model: Any = None
    merge_candidates: list[dict[str, Any]] = field(default_factory=list)  # every segment the planner priced
    sections: dict[str, list] = field(default_factory=dict)  # the changes so far, by section
    stage: str = "prologue"
    inexact_allowed: frozenset | None = None  # inexact merges (node names) that may be made; None: any

    @property
    def relu_offsets(self) -> bool:
        # the statistics were measured on the input graph: no rewrite may move a ReLU's input
        # before they are applied (the prologue, with statistics)
        return not (self.stage == "prologue" and self.stats)

    def selected(self, name: str) -> bool:
        """``name`` is neither skipped nor left out by ``only``."""
        skip, only = getattr(self.options, "skip", None) or (), getattr(self.options, "only", None)
        return name not in skip and (only is None or name in only)


# Names of the tensors and nodes the passes create are numbered per surgery (not per process), so
# two surgeries of the same model write byte-identical files.
_names: contextvars.ContextVar[Iterator[int] | None] = contextvars.ContextVar("egp_surgery_names", default=None)


@contextlib.contextmanager
def name_scope() -> Iterator[None]:
    """Number the names made inside from 0 (the pipeline opens one per rewrite of the input graph)."""
    token = _names.set(itertools.count())
    try:
        yield
    finally:
        _names.reset(token)


def next_name_index() -> int:
    counter = _names.get()
    if counter is None:  # a pass called on its own (tests): a scope for this call's thread of work
        counter = itertools.count()
        _names.set(counter)
    return next(counter)
