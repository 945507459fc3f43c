"""Pruning in PyTorch: ``Pruner`` (EGP / IMP inside the user's own training loop: pruner), activation
sites found from the graph (sites), entropy per site (entropy), EGP's budget allocation
(allocation), L1 masks (masks), fine-tuning (train), the iterative loop with checkpoints (loop),
cut layers (cuts) and the one EGP-vs-IMP verdict (verdict).

``egp_deploy.prune(...)`` is the API call (egp_deploy.api.prune): this package is callable for
that reason (see egp_deploy/_callable.py), its modules are imported as ever.
"""

from egp_deploy._callable import make_callable

make_callable(__name__)

__all__ = ["Pruner"]


def __getattr__(name: str):
    if name == "Pruner":  # imported on first use: ``import egp_deploy.prune.X`` stays as light as X
        from egp_deploy.prune.pruner import Pruner

        return Pruner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
