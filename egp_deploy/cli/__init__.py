"""Thin command-line layer: one module per stage (prune, export, surgery, build, bench, check).

``python -m egp_deploy.cli <stage> ...`` is the same as the ``egp-<stage>`` console script
(handy under ``torchrun``).
"""

STAGES = ("prune", "export", "surgery", "build", "bench", "check")
