"""Iterative Mode Partition (IMP, PADNET.md §3): choose which positions of every PAD weight stay
dynamic.

    >>> from padnet.partition import IterativePartition, partition
    >>> result = partition(model, batches, dynamic_ratio=0.3, iterations=5)  # one shot
    >>> print(result)  # per-layer ratios and score summary
    >>> imp = IterativePartition(model, loader, dynamic_ratio=0.3, end_step=3000)  # in training
    >>> for step in ...: ...; optimizer.step(); imp.step()
"""

from padnet.partition.data import PadWeight, default_loss, find_pad_weights
from padnet.partition.imp import OPTIONS, IterativePartition, partition
from padnet.partition.report import (
    PartitionResult,
    RatioReport,
    layer_ratio_report,
    plot_ratios,
)
from padnet.partition.schedule import SCHEDULES, iteration_steps, kappa_schedule
from padnet.partition.scores import SCORES

__all__ = [
    "OPTIONS",
    "SCHEDULES",
    "SCORES",
    "IterativePartition",
    "PadWeight",
    "PartitionResult",
    "RatioReport",
    "default_loss",
    "find_pad_weights",
    "iteration_steps",
    "kappa_schedule",
    "layer_ratio_report",
    "partition",
    "plot_ratios",
]
