"""Pruning in PyTorch: activation entropy per site (entropy), EGP's budget allocation (allocation),
L1 masks (masks), fine-tuning (train), the iterative loop with checkpoints (loop), cut layers
(cuts) and the one EGP-vs-IMP verdict (verdict).

``egp_deploy.prune(...)`` is the API call (egp_deploy.api.prune): this package is callable for
that reason (see egp_deploy/_callable.py), its modules are imported as ever.
"""

from egp_deploy._callable import make_callable

make_callable(__name__)
