"""Shared test settings: deterministic, single-threaded torch so the suite is stable on 2 cores.

Property tests (hypothesis) run derandomized by default: the same examples on every run and every
machine, no example database, so the suite passes or fails the same way each time. Random
exploration is a separate, opt-in run: ``HYPOTHESIS_PROFILE=explore bash tools/test.sh`` (new
examples each run, failures saved to ``.hypothesis/`` and replayed first next time).
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("deterministic", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded_rngs():
    """Every test starts from the same random state, whatever ran before it (order-independent)."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return 0
