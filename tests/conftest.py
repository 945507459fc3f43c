"""Shared test settings: deterministic, single-threaded torch so the suite is stable on 2 cores."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return 0
