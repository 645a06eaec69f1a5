"""Data-parallel helpers: process-group set-up from torchrun's variables, rank-0-only writes,
a resumable distributed sampler, and small collectives.

``torchrun --nproc_per_node=N -m padnet train ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them and
starts a process group (gloo on CPU, nccl on GPU). Without them everything runs in one process
and every helper is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Sampler

__all__ = [
    "DistInfo",
    "EpochSampler",
    "all_reduce_sum",
    "barrier",
    "check_same_across_ranks",
    "cleanup_distributed",
    "init_distributed",
    "is_main",
    "resolve_device",
    "sync_buffers",
    "unwrap",
    "wrap_ddp",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    started_here: bool = False  # this call created the process group

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``'auto'`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Start (or join) the process group described by torchrun's environment variables.

    Returns a single-process :class:`DistInfo` when ``WORLD_SIZE`` is unset or 1.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if world <= 1:
        return DistInfo(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    started = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world)
        started = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev, started)


def cleanup_distributed(info: DistInfo) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if info.started_here and dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """True in a single process and on rank 0 of a process group."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over ranks in place and return it (no-op without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def check_same_across_ranks(tensors: list[Tensor], what: str) -> None:
    """Raise RuntimeError unless every rank holds the same values (compared by checksums)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1) or not tensors:
        return
    dev = tensors[0].device
    sums = torch.stack([t.detach().double().sum() for t in tensors]).to(dev)
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"{what} differ across ranks")


@torch.no_grad()
def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (normalisation statistics, masks) to every rank.

    DDP broadcasts them before each forward, so after the last training step each rank holds
    the statistics of its own last batch; this makes evaluation and the saved model agree.
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """``model`` in DistributedDataParallel when ``info`` is distributed, else ``model``. A model
    with PAD layers is wrapped with ``find_unused_parameters`` (they skip unused weights: W_s at
    kappa = 1, experts no token chose)."""
    if not info.distributed:
        return model
    from padnet.layers import mode_masks

    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=ids, find_unused_parameters=bool(mode_masks(model)))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class EpochSampler(Sampler[int]):
    """Shuffled indices, reproducible per epoch and resumable mid-epoch, sharded over ranks.

    The order of epoch ``e`` is ``randperm(n, generator=Generator().manual_seed(seed + e))``,
    padded by wrapping around to a multiple of ``world_size``; rank r takes every
    ``world_size``-th index starting at r (like ``DistributedSampler``). :meth:`set_epoch`
    chooses the epoch and how many of this rank's indices to skip (resuming mid-epoch).
    """

    def __init__(self, size: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1) -> None:
        if size < 1:
            raise ValueError(f"cannot sample from an empty data set (size {size})")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.num_samples = -(-size // world_size)  # per rank, ceil
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Use the order of ``epoch`` and leave out this rank's first ``skip`` indices."""
        self.epoch, self.skip = int(epoch), int(skip)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=gen)
        else:
            order = torch.arange(self.size)
        total = self.num_samples * self.world_size
        if total > self.size:  # pad by wrapping around
            order = torch.cat([order, order[: total - self.size]])
        mine = order[self.rank : total : self.world_size]
        return iter(mine[self.skip :].tolist())

    def __len__(self) -> int:
        return max(self.num_samples - self.skip, 0)
