"""``padnet tradeoff RUN_DIR`` end to end on a tiny early-exit run trained here (and ``padnet
export`` / ``padnet eval`` of that run): the CSV and plot, the printed table, the errors."""

from __future__ import annotations

import csv

import pytest
import torch

import padnet
from padnet.cli.main import main
from padnet.conditional import EarlyExitModel
from padnet.train.build import load_run
from tiny_data import write_tiny_npz

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny early-exit PAD run (resnet8 width 4, dyconv, exits after layer1 and layer2) and
    a static run without exits, on the same data."""
    tmp = tmp_path_factory.mktemp("tradeoff")
    write_tiny_npz(tmp / "tiny.npz", n=120, test=24)
    base = ["--dataset", "npz", "--data-root", str(tmp / "tiny.npz"), "--model", "resnet8",
            "--width", "4", "--batch-size", "16", "--lr", "0.05", "--quiet"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a module fixture runs before the one_thread fixture
    try:
        assert main(["train", *base, "--epochs", "2", "--method", "dyconv", "--num-kernels",
                     "2", "--dynamic-ratio", "0.5", "--exits", "layer1,layer2",
                     "--exit-distill", "0.3", "--out-dir", str(tmp / "exits")]) == 0
        assert main(["train", *base, "--epochs", "1", "--out-dir", str(tmp / "plain")]) == 0
    finally:
        torch.set_num_threads(threads)
    return tmp


def test_tradeoff_writes_csv_and_plot(tiny, capsys):
    run = tiny / "exits"
    assert main(["tradeoff", str(run), "--values", "0,0.6,2", "--reps", "1",
                 "--latency-batch", "8", "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "threshold (max_prob) on test (24 examples)" in out and "speedup" in out
    rows = list(csv.DictReader((run / "tradeoff_threshold.csv").open()))
    assert [r["value"] for r in rows] == ["full", "0", "0.6", "2"]
    assert list(rows[0]) == ["knob", "value", "accuracy", "flops_per_sample", "latency_ms",
                             "speedup", "flops_ratio", "exit_rates"]
    assert float(rows[0]["speedup"]) == 1.0
    assert rows[1]["exit_rates"] == "1.0000 0.0000 0.0000"  # threshold 0: all leave at once
    assert rows[3]["exit_rates"] == "0.0000 0.0000 1.0000"  # 2: nobody leaves early
    assert rows[3]["accuracy"] == rows[0]["accuracy"]
    assert float(rows[1]["flops_per_sample"]) < float(rows[0]["flops_per_sample"])
    if _has_matplotlib():
        assert (run / "tradeoff_threshold.png").stat().st_size > 0
        assert f"wrote {run / 'tradeoff_threshold.png'}" in out


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_tradeoff_other_criterion_and_output_prefix(tiny, tmp_path, capsys):
    prefix = tmp_path / "sweep"
    assert main(["tradeoff", str(tiny / "exits"), "--criterion", "patience", "--values", "1,2",
                 "--reps", "1", "--latency-batch", "4", "--out", str(prefix),
                 "--no-plot"]) == 0
    rows = list(csv.DictReader(prefix.with_name("sweep.csv").open()))
    assert [r["value"] for r in rows] == ["full", "1", "2"]
    assert not prefix.with_name("sweep.png").exists()
    assert "threshold (patience) on val" in capsys.readouterr().out


@pytest.mark.parametrize("extra,match", [
    (["--values", "a,b"], "--values must be comma-separated numbers"),
    (["--knob", "keep"], "--knob keep needs a run with tokens select"),
    (["--criterion", "patience", "--values", "1.5"], "patience"),
    (["--latency-batch", "0"], "--latency-batch"),
    (["--latency-batches", "0"], "--latency-batches"),
])
def test_tradeoff_errors(tiny, capsys, extra, match):
    assert main(["tradeoff", str(tiny / "exits"), "--reps", "1", *extra]) == 2
    assert match in capsys.readouterr().err


def test_tradeoff_of_a_run_without_exits_or_tokens(tiny, capsys):
    assert main(["tradeoff", str(tiny / "plain")]) == 2
    assert "neither early exits nor dynamic tokens" in capsys.readouterr().err


def test_export_and_eval_of_an_early_exit_run(tiny, capsys):
    run = tiny / "exits"
    assert main(["export", str(run), "--reps", "1", "--batch-sizes", "2"]) == 0
    deployed = padnet.load(run / "deployed.safetensors")
    trained = load_run(run, with_data=False).model
    assert isinstance(deployed, EarlyExitModel) and isinstance(trained, EarlyExitModel)
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        for a, b in zip(deployed(x), trained(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert torch.equal(deployed.infer(x).exit_index, trained.infer(x).exit_index)
    assert main(["eval", str(run), "--split", "test"]) == 0
    assert "test: loss" in capsys.readouterr().out
