"""padnet sweep: a suite expands into variants x seeds, finished runs are skipped, an
interrupted run resumes, and results.csv has one row per finished run."""

from __future__ import annotations

import csv

import pytest

from padnet.cli.main import main
from padnet.train import train
from padnet.train.sweep import load_suite
from tiny_data import write_tiny_npz

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def suite(tmp_path):
    npz = write_tiny_npz(tmp_path / "tiny.npz")
    path = tmp_path / "suite.yaml"
    path.write_text(
        "name: tiny\n"
        f"out_dir: {tmp_path / 'out'}\n"
        "config: {dataset: npz, data_root: " + str(npz) + ", model: resnet8, width: 4, "
        "batch_size: 16, epochs: 1, lr: 0.05, method: dyconv, num_kernels: 2}\n"
        "seeds: [0, 1]\n"
        "variants:\n"
        "  static: {method: none}\n"
        "  pad: {dynamic_ratio: 0.5, imp_mode: interleaved, imp_iterations: 1}\n")
    return path


def test_a_suite_expands_into_variants_times_seeds(suite, tmp_path) -> None:
    runs = load_suite(suite)
    assert [r.name for r in runs] == ["static-seed0", "static-seed1", "pad-seed0", "pad-seed1"]
    assert [r.cfg.seed for r in runs] == [0, 1, 0, 1]
    assert runs[0].cfg.method == "none" and runs[2].cfg.dynamic_ratio == 0.5
    assert runs[3].run_dir == tmp_path / "out" / "pad-seed1"
    moved = load_suite(suite, {"out_dir": str(tmp_path / "elsewhere"), "threads": 1})
    assert moved[3].run_dir == tmp_path / "elsewhere" / "pad-seed1" and moved[3].cfg.threads == 1


def test_the_sweep_resumes_and_skips_finished_runs(suite, tmp_path, capsys) -> None:
    runs = load_suite(suite)
    train(runs[2].cfg.replace(stop_after=2), quiet=True)  # interrupted earlier
    assert runs[2].status() == "resume"
    assert main(["sweep", str(suite), "--only", "pad-*"]) == 0
    out = capsys.readouterr().out
    assert "pad-seed0: resume" in out and "pad-seed1: new" in out and "static" not in out
    finished = (tmp_path / "out" / "pad-seed0" / "summary.json").stat().st_mtime_ns
    assert main(["sweep", str(suite)]) == 0
    out = capsys.readouterr().out
    assert "pad-seed0: done (skipped)" in out and "static-seed0: new" in out
    assert (tmp_path / "out" / "pad-seed0" / "summary.json").stat().st_mtime_ns == finished
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert sorted(r["run"] for r in rows) == ["pad-seed0", "pad-seed1", "static-seed0",
                                              "static-seed1"]
    assert all(r["test_acc"] or r["val_acc"] for r in rows)


def test_a_run_stopped_before_its_first_checkpoint_starts_over(suite, tmp_path, capsys) -> None:
    runs = load_suite(suite)
    run_dir = runs[0].run_dir
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(runs[0].cfg.to_yaml())  # killed while loading data
    assert runs[0].status() == "restart"
    assert main(["sweep", str(suite), "--only", "static-seed0"]) == 0
    assert "static-seed0: restart" in capsys.readouterr().out
    assert runs[0].status() == "done"


@pytest.mark.parametrize(("text", "message"), [
    ("variants: {}\n", "'variants' must map names"),
    ("seeds: [a]\nvariants: {x: {}}\n", "'seeds' must be a non-empty list of ints"),
    ("variant: {x: {}}\n", "unknown suite key"),
    ("variants: {x: {lr: -1}}\n", "variant 'x': lr must be"),
])
def test_bad_suites_are_clear_errors(tmp_path, text, message) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_suite(path)


