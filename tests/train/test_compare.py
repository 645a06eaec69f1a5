"""The comparison's pieces: variant configs, interleaved latency, table files (no training)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import padnet
from padnet.train.compare import (
    CompareResult,
    count_flops,
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


def test_flops_columns_are_written_and_tolerate_rows_without_them(tmp_path):
    rows = [{"variant": v, "method": "dyconv", "val_acc": 0.5, "test_acc": 0.4,
             "stored_params": 10, "dynamic_ratio": 0.0, "latency_ratio_b1": 1.0,
             "latency_ratio_bN": 1.0, "latency_ms_b1": 1.0, "latency_ms_bN": 2.0, "batch_N": 8,
             "train_time_s": 1.0, **extra}
            for v, extra in (("static", {"flops": 1234567.0, "flops_export": 1234567.0}),
                             ("pad", {}))]
    result = CompareResult(rows, tmp_path)
    write_outputs(result)
    lines = (tmp_path / "compare.csv").read_text().splitlines()
    head = lines[0].split(",")
    assert head[6:8] == ["flops", "flops_export"]
    assert lines[1].split(",")[6:8] == ["1234567.0", "1234567.0"]
    assert lines[2].split(",")[6:8] == ["", ""]
    assert "| 1,234,567 | 1,234,567 |" in (tmp_path / "compare.md").read_text()
    table = result.table()
    assert "FLOPs/sample" in table and "1.23M" in table


def test_count_flops_of_a_trained_static_and_pad_model(capsys):
    torch.manual_seed(0)
    static = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(),
                           nn.Linear(4 * 4 * 4, 2))
    x = torch.randn(2, 3, 8, 8)
    conv = 2 * 4 * 4 * 9 * 4 * 4
    base = 2 * 3 * 4 * 9 * 6 * 6 + conv + 2 * 64 * 2
    assert count_flops(static, x) == (base, base)
    pad = padnet.dynamize(static, "dyconv", num_kernels=2, dynamic_ratio=0.5, path="grouped")
    ran, exported = count_flops(pad, x)
    assert ran == exported == base + (2 * 4 * 4 + 2 * 4 * 2) + 2 * 2 * 144 + 2 * 2 * 4
    assert count_flops(pad, "not a batch") == (None, None)
    assert "FLOPs not counted for Sequential: inputs must be" in capsys.readouterr().out
