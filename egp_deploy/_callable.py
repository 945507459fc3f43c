"""``egp_deploy.prune(...)``, ``egp_deploy.export(...)`` and ``egp_deploy.bench(...)`` are API calls,
yet ``egp_deploy.prune``, ``.export`` and ``.bench`` are also stage modules (Python's import
system binds a submodule onto its package, whatever was there). So those modules are made
callable: calling one runs the API function of the same name in :mod:`egp_deploy.api`;
attribute access is the module as ever."""

from __future__ import annotations

import sys
import types
from typing import Any


class CallableModule(types.ModuleType):
    """A module whose call is ``egp_deploy.api.<its short name>(...)``."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from egp_deploy import api

        return getattr(api, self.__name__.rsplit(".", 1)[-1])(*args, **kwargs)


def make_callable(module_name: str) -> None:
    sys.modules[module_name].__class__ = CallableModule
