"""Iterative Mode Partition (IMP, docs/method.md §4): choose which positions of every PAD weight
stay dynamic.

    >>> import padnet.partition as imp
    >>> result = imp.partition_model(model, batches, dynamic_ratio=0.3, iterations=5)  # one shot
    >>> print(result)  # per-layer ratios and score summary
    >>> p = imp.IterativePartition(model, loader, dynamic_ratio=0.3, end_step=3000)  # in training
    >>> for step in ...: ...; optimizer.step(); p.step()
"""

from padnet.partition.data import check_loss, default_loss
from padnet.partition.imp import OPTIONS, IterativePartition, partition_model
from padnet.partition.observe import PassResult, ThetaObserver, scoring_pass
from padnet.partition.report import (
    PartitionResult,
    RatioReport,
    layer_ratio_report,
    plot_ratios,
)
from padnet.partition.schedule import SCHEDULES, iteration_steps, kappa_schedule
from padnet.partition.scores import SCORES, Score, ScoreInputs, register_score

__all__ = [
    "OPTIONS",
    "SCHEDULES",
    "SCORES",
    "IterativePartition",
    "PartitionResult",
    "PassResult",
    "RatioReport",
    "Score",
    "ScoreInputs",
    "ThetaObserver",
    "check_loss",
    "default_loss",
    "iteration_steps",
    "kappa_schedule",
    "layer_ratio_report",
    "partition_model",
    "plot_ratios",
    "register_score",
    "scoring_pass",
]
