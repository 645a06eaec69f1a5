"""Smoke test of benchmarks/inference.py: its smallest case runs and writes its results."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "inference.py"


def load_benchmark():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("padnet_bench_inference", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_inference_benchmark_quick_resnet(tmp_path: Path) -> None:
    bench = load_benchmark()
    out = bench.main(["--quick", "--threads", "1", "--models", "resnet20", "--sections", "conv",
                      "--batches", "2", "--out", str(tmp_path)])
    assert (tmp_path / "inference.csv").exists()
    text = (tmp_path / "inference.md").read_text()
    assert "## Targets" in text
    # the authors' layer is built from the PAD element model and computes the same function
    assert out["notes"]["checks"]["resnet20"]["authors vs pad_element"] < 1e-4
    variants = {r["variant"] for r in out["rows"] if r["section"] == "inference"}
    assert {"static", "authors", "timm_condconv", "pad_channel/export"} <= variants
    ratios = {r["variant"]: r["ratio"] for r in out["rows"] if r["section"] == "bytes"}
    assert ratios["pad_element"] < 0.5
