"""The config's IMP group handed to padnet.partition (padnet.train.imp)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

import padnet
from padnet.models import create_model
from padnet.train.config import load_config
from padnet.train.distributed import EpochSampler
from padnet.train.imp import (
    IMP_SEED_OFFSET,
    build_partition,
    imp_loss,
    partition_options,
    run_partition,
    scoring_loader,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ["--method", "condconv", "--dynamic-ratio", "0.5", "--imp-iterations", "2",
        "--imp-num-batches", "1", "--imp-score", "magnitude", "--imp-granularity", "channel",
        "--imp-schedule", "linear", "--imp-scope", "layer", "--imp-static-init", "mean",
        "--imp-warmup-fraction", "0.5", "--seed", "3", "--batch-size", "4"]


def _model():
    torch.manual_seed(0)
    return padnet.dynamize(create_model("resnet8", num_classes=3, in_chans=1, width=4),
                           "condconv", num_kernels=2, init="copy_noise")


def _data(n=10):
    return TensorDataset(torch.randn(n, 1, 8, 8), torch.randint(0, 3, (n,)))


def _collate(items):
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def test_every_option_of_the_group_reaches_the_partition():
    cfg = load_config(None, ARGS)
    opts = partition_options(cfg)
    assert opts["loss_fn"] is imp_loss
    assert {k: opts[k] for k in ("dynamic_ratio", "iterations", "num_batches", "score",
                                 "granularity", "schedule", "scope", "static_init", "seed")} == {
        "dynamic_ratio": 0.5, "iterations": 2, "num_batches": 1, "score": "magnitude",
        "granularity": "channel", "schedule": "linear", "scope": "layer",
        "static_init": "mean", "seed": 3}
    loader = scoring_loader(_data(), batch_size=4, collate=_collate, seed=cfg.seed)
    imp = build_partition(_model(), loader, cfg, total_steps=10)
    assert imp.config["end_step"] == 5 and imp.config["bn_mode"] == "train"
    assert imp.config["score"] == "magnitude" and imp.config["scope"] == "layer"


def test_scoring_batches_follow_the_offset_seed_and_drop_a_short_last_batch():
    data = _data()
    loader = scoring_loader(data, batch_size=4, collate=_collate, seed=3)
    order = list(EpochSampler(len(data), seed=3 + IMP_SEED_OFFSET))
    batches = [x for x, _ in loader]
    assert len(batches) == 2  # 10 examples: two full batches, the last two dropped
    assert torch.equal(batches[0], torch.stack([data[i][0] for i in order[:4]]))


def test_one_shot_partition_reaches_the_ratio():
    cfg = load_config(None, ARGS)
    model = _model()
    loader = scoring_loader(_data(16), batch_size=4, collate=_collate, seed=cfg.seed)
    result = run_partition(model, loader, cfg)
    assert result.iteration == 2
    assert abs(padnet.stats(model).dynamic_ratio - 0.5) < 0.05
