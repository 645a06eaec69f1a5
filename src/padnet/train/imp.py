"""Iterative mode partition in a run: the config's ``imp_*`` group handed to
:mod:`padnet.partition`, in one place for training (one-shot and interleaved) and for
``padnet partition``.

IMP scores positions on training batches in one fixed shuffled order: the epoch order of seed
``cfg.seed + IMP_SEED_OFFSET``, which differs from the order training uses and stays the same
across resumes. Interleaved IMP keeps BatchNorm in train mode while scoring (running statistics
are poor early in training); one-shot IMP scores in eval mode.

The scores are computed from the loss the run trains on, without auxiliary losses: the
cross-entropy, or for a model with early exits the joint loss of its exits (the ``exit_*``
keys, without label smoothing), so that a position's importance counts for every
exit that depends on it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from padnet.train.build import batch_inputs, build_loader, model_outputs
from padnet.train.config import TrainConfig
from padnet.train.distributed import EpochSampler

__all__ = ["IMP_SEED_OFFSET", "build_partition", "imp_loss", "partition_options",
           "run_partition", "scoring_loader"]

#: added to the run's seed for the order of the scoring batches
IMP_SEED_OFFSET = 7919


def imp_loss(model: nn.Module, batch: Any, cfg: TrainConfig | None = None) -> torch.Tensor:
    """The loss IMP's scores are computed from, of ``model`` on an image batch ``(x, y)`` or a
    text batch (a dict with ``labels``), on the model's device: cross-entropy; for an early-exit
    model the joint loss of its exits with ``cfg``'s ``exit_*`` keys (without ``cfg``: the
    final exit's cross-entropy)."""
    from padnet.conditional import exit_loss

    inputs, targets = batch_inputs(batch, next(model.parameters()).device)
    outputs = model_outputs(model, inputs)
    if cfg is None or len(outputs) == 1:
        return F.cross_entropy(outputs[-1], targets)
    ex = cfg.exit
    return exit_loss(outputs, targets, weights=ex.weights, distill=ex.distill,
                     temperature=ex.temperature)


def scoring_loader(
    dataset: Any, *, batch_size: int, collate: Any, seed: int, rank: int = 0,
    world_size: int = 1, num_workers: int = 0, pin_memory: bool = False,
) -> DataLoader:
    """The scoring batches of ``dataset`` (this rank's shard), in the order of seed
    ``seed + IMP_SEED_OFFSET``; batches of one are dropped when a full batch exists."""
    sampler = EpochSampler(len(dataset), seed=seed + IMP_SEED_OFFSET, rank=rank,
                           world_size=world_size)
    return build_loader(dataset, batch_size=batch_size, sampler=sampler, collate=collate,
                        drop_last=sampler.num_samples >= batch_size, num_workers=num_workers,
                        seed=seed, pin_memory=pin_memory)


def partition_options(cfg: TrainConfig) -> dict[str, Any]:
    """The keyword arguments that :func:`~padnet.partition.partition_model` and
    :class:`~padnet.partition.IterativePartition` share, from the config."""
    imp = cfg.imp
    loss_fn = imp_loss if cfg.exits is None else functools.partial(imp_loss, cfg=cfg)
    return {"dynamic_ratio": cfg.dynamic_ratio, "loss_fn": loss_fn,
            "iterations": imp.iterations, "num_batches": imp.num_batches,
            "schedule": imp.schedule, "scope": imp.scope, "granularity": imp.granularity,
            "score": imp.score, "static_init": imp.static_init, "seed": cfg.seed}


def build_partition(model: nn.Module, data: Any, cfg: TrainConfig, *,
                    total_steps: int) -> Any:
    """Interleaved IMP (:class:`~padnet.partition.IterativePartition`) over the first
    ``imp_warmup_fraction`` of ``total_steps`` optimizer steps."""
    from padnet.partition import IterativePartition

    end = max(1, round(cfg.imp.warmup_fraction * total_steps))
    return IterativePartition(model, data, start_step=0, end_step=end, bn_mode="train",
                              **partition_options(cfg))


def run_partition(model: nn.Module, data: Any, cfg: TrainConfig) -> Any:
    """One-shot IMP now (:func:`~padnet.partition.partition_model`); the PartitionResult."""
    from padnet.partition import partition_model

    return partition_model(model, data, bn_mode="eval", **partition_options(cfg))
