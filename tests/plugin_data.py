"""Data plugins used by the tests (loaded as plugin:plugin_data:<function> with tests/ on sys.path)."""

import os

from torch.utils.data import Dataset, Subset

from egp_deploy.data import load_digits_bundle
from egp_deploy.errors import DataError


def small_digits():
    """A small slice of digits so multi-process tests stay fast."""
    b = load_digits_bundle()
    return {"train": Subset(b.train, range(192)), "val": Subset(b.val, range(96)),
            "test": Subset(b.test, range(96)), "num_classes": 10}


class _FailsOnRank1(Dataset):
    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        if os.environ.get("RANK") == "1":
            raise DataError("simulated unreadable sample on rank 1")
        return self.inner[i]


def small_digits_failing_on_rank1():
    d = small_digits()
    d["val"] = _FailsOnRank1(d["val"])
    return d


def not_a_tuple():
    return 42
