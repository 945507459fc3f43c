"""Data-parallel plumbing for ``torchrun``: process group, sharding, reductions, rank-0 writes.

Everything degrades to a no-op in a single process, so the pruning code calls these helpers
unconditionally. Batch semantics follow PyTorch DDP: ``--batch-size`` is per rank; the global
batch is batch_size x world_size (scale the learning rate yourself if you want the same recipe).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from egp_deploy.errors import BackendUnavailableError, UsageError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(backend: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join the process group torchrun set up (env://); single process when not under torchrun.

    ``backend='auto'`` picks NCCL when CUDA is available, gloo otherwise.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistContext()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo", "mpi", "ucc"):
        raise UsageError(f"unknown distributed backend {backend!r}: use auto, nccl or gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        raise BackendUnavailableError("distributed backend nccl needs CUDA GPUs; use --dist-backend gloo on CPU")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank, world, local_rank, backend)


def current_context() -> DistContext:
    """The process group this process has already joined (the user's own torchrun/DDP set-up), or a
    single process when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return DistContext()
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                       str(dist.get_backend()))


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def all_reduce_sum(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place, returned). Counts are int64, so sums are exact."""
    if ctx.enabled:
        moved = tensor.to(ctx.device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        if moved is not tensor:
            tensor.copy_(moved.to(tensor.device))
    return tensor


def broadcast_tensors(ctx: DistContext, tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` with rank ``src``'s values (masks never diverge)."""
    if not ctx.enabled:
        return
    for t in tensors:
        moved = t.to(ctx.device)
        dist.broadcast(moved, src=src)
        if moved is not t:
            t.copy_(moved.to(t.device))


class ShardSampler(Sampler[int]):
    """Strided shard of a data set WITHOUT padding: statistics summed over ranks then equal a
    single-process pass exactly (DistributedSampler repeats samples to even out the shards)."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, len(dataset), world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_loader(ctx: DistContext, ds: Dataset, batch_size: int, seed: int) -> DataLoader:
    """Shuffled training loader; under DDP each rank draws its shard of one shared permutation.
    Call ``set_epoch(loader, epoch)`` every epoch."""
    if not ctx.enabled:
        g = torch.Generator().manual_seed(seed)
        return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g)
    sampler = DistributedSampler(ds, ctx.world_size, ctx.rank, shuffle=True, seed=seed)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler)


def eval_loader(ctx: DistContext, ds: Dataset, batch_size: int) -> DataLoader:
    """Unshuffled loader over this rank's shard (the whole set in a single process)."""
    if not ctx.enabled:
        return DataLoader(ds, batch_size=batch_size, shuffle=False)
    return DataLoader(ds, batch_size=batch_size, sampler=ShardSampler(ds, ctx.rank, ctx.world_size))


def set_epoch(loader: DataLoader, epoch: int) -> None:
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
