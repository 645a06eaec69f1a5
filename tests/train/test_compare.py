"""The comparison's pieces: variant configs, interleaved latency, table files (no training)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from padnet.train.compare import (
    CompareResult,
    measure_latency,
    variant_config,
    write_outputs,
)
from padnet.train.config import load_config


def test_variants_share_everything_but_method_ratio_and_imp(tmp_path):
    cfg = load_config(None, ["--method", "dyconv", "--dynamic-ratio", "0.3", "--imp-mode",
                             "interleaved", "--lr", "0.02"])
    static, dynamic, pad = (variant_config(cfg, v, tmp_path) for v in ("static", "dynamic",
                                                                        "pad"))
    assert (static.method, static.imp.mode) == ("none", "none")
    assert (dynamic.method, dynamic.dynamic_ratio, dynamic.imp.mode) == ("dyconv", 1.0, "none")
    assert pad.replace(out_dir=cfg.out_dir) == cfg
    assert {static.lr, dynamic.lr, pad.lr} == {0.02}
    assert pad.out_dir == str(tmp_path / "pad")
    with pytest.raises(ValueError, match="variant must be one of"):
        variant_config(cfg, "huge", tmp_path)


def test_latency_is_measured_for_every_model_and_restores_modes():
    models = {"a": nn.Linear(8, 2), "b": nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))}
    models["b"].train()
    ms = measure_latency(models, torch.randn(4, 8), reps=3, warmup=1)
    assert set(ms) == {"a", "b"} and all(v > 0 for v in ms.values())
    assert models["b"].training


def test_outputs_are_written(tmp_path):
    rows = [{"variant": v, "method": "dyconv", "val_acc": 0.5, "test_acc": None,
             "stored_params": p, "dynamic_ratio": r, "latency_ratio_b1": l1,
             "latency_ratio_bN": l1, "latency_ms_b1": 1.0, "latency_ms_bN": 2.0, "batch_N": 8,
             "train_time_s": 1.0}
            for v, p, r, l1 in (("static", 10, 0.0, 1.0), ("dynamic", 40, 1.0, 2.0),
                                ("pad", 19, 0.3, 1.8))]
    result = CompareResult(rows, tmp_path)
    write_outputs(result)
    assert (tmp_path / "compare.csv").read_text().splitlines()[2].startswith("dynamic,dyconv,0.5,,")
    assert (tmp_path / "compare.png").stat().st_size > 1000
    table = result.table()
    assert "latency b=8" in table and "1.80x" in table and table.count("\n") == 4
