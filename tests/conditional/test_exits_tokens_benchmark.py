"""Smoke test of benchmarks/exits_tokens.py: its Fashion-MNIST setting runs in --quick mode and
writes its results (slow: it trains a run; skipped without the Fashion-MNIST files)."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "exits_tokens.py"


def load_benchmark():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("padnet_bench_exits_tokens", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_exits_tokens_benchmark_quick_fashion_mnist(tmp_path, monkeypatch) -> None:
    if not (ROOT / "data" / "fashion-mnist").is_dir():
        pytest.skip("Fashion-MNIST is not in ./data (make data)")
    monkeypatch.chdir(ROOT)
    bench = load_benchmark()
    rows = bench.main(["--quick", "--threads", "1", "--settings", "fmnist_resnet8_exits",
                       "--out", str(tmp_path)])
    assert {r["split"] for r in rows} == {"val", "test"}
    written = list(csv.DictReader((tmp_path / "exits_tokens.csv").open()))
    assert [r["value"] for r in written if r["split"] == "val"][0] == "full"
    text = (tmp_path / "exits_tokens.md").read_text()
    assert "## Summary (test split)" in text and "- device: " in text


def test_the_cheapest_value_within_one_point_is_chosen() -> None:
    from padnet.conditional.tradeoff import TradeoffRow

    bench = load_benchmark()

    def row(value, acc, flops):  # noqa: ANN001, ANN202
        return TradeoffRow("threshold", value, acc, flops, 1.0, 1.0, flops / 100)

    full = row(None, 0.90, 100)
    assert bench.choose([full, row(0.5, 0.85, 40), row(0.9, 0.895, 70),
                         row(0.99, 0.9, 90)]).value == 0.9
    assert bench.choose([full, row(0.5, 0.85, 40)]) is full
    assert bench.choose([full, row(0.9, 0.9, 101)]) is full  # no cheaper value
