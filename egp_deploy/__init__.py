"""egp-deploy: Entropy-Guided Pruning turned into a physically shallower deployed graph.

Stages, each a module or subpackage, data flowing one way:
    archs/data/checkpoint (foundation) -> prune -> export -> surgery -> build -> bench
"""

__version__ = "0.1.0"
