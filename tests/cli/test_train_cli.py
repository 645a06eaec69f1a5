"""The training subcommands (train, eval, partition, bench, compare, list), run in-process on
tiny generated data in a temporary directory."""

from __future__ import annotations

import csv
import json

import pytest
from safetensors.torch import load_file

from padnet.cli.main import main
from tiny_data import write_tiny_npz

TINY = ("dataset: npz\nmodel: resnet8\nwidth: 4\nbatch_size: 16\nval_fraction: 0.25\n"
        "test_fraction: 0.0\nepochs: 1\nlr: 0.05\nnum_kernels: 2\n"
        "temperature_anneal_epochs: 1\n")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def config(tmp_path):
    """A tiny YAML config over 96 generated 8x8 images of 3 classes (with an own test split)."""
    write_tiny_npz(tmp_path / "tiny.npz", 128, test=32)
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY + f"data_root: {tmp_path / 'tiny.npz'}\nout_dir: {tmp_path / 'run'}\n"
                    "method: dyconv\ndynamic_ratio: 0.5\nimp_mode: interleaved\n"
                    "imp_iterations: 2\nimp_num_batches: 1\n")
    return path


def test_train_stops_and_resumes_from_its_own_config(config, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "-c", str(config), "--epochs", "2", "--stop-after", "3",
                 "--quiet"]) == 0
    assert "stopped early" in capsys.readouterr().out
    assert main(["train", "--resume", str(run), "--quiet"]) == 0  # the run's own config.yaml
    out = capsys.readouterr().out
    assert "done: val_acc" in out and "test_acc" in out and "dynamic ratio 0.500" in out
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[-1]["test_acc"]


def test_eval_reproduces_the_summary(config, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "-c", str(config), "--quiet"]) == 0
    assert main(["eval", str(run), "--out", str(tmp_path / "eval.json")]) == 0
    out = capsys.readouterr().out
    assert "val: loss" in out and "test: loss" in out
    result = json.loads((tmp_path / "eval.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert result["val"]["acc"] == pytest.approx(summary["final"]["val_acc"])
    # the loss is continuous: it differs if anything that changes the function (e.g. the router
    # temperature reached by the annealing) did not travel with the weights
    assert result["val"]["loss"] == pytest.approx(summary["final"]["val_loss"], rel=1e-6)
    assert main(["eval", str(run), "--split", "val", "--checkpoint", "--device", "cpu"]) == 0


def test_partition_of_a_trained_run(config, tmp_path, capsys):
    assert main(["train", "-c", str(config), "--method", "condconv", "--imp-mode", "none",
                 "--dynamic-ratio", "1.0", "--quiet"]) == 0
    out = tmp_path / "part"
    assert main(["partition", "--run", str(tmp_path / "run"), "--dynamic-ratio", "0.25",
                 "--imp-iterations", "2", "--out", str(out), "--eval"]) == 0
    text = capsys.readouterr().out
    assert "IMP iteration 2/2" in text and "validation accuracy" in text
    masks = load_file(out / "masks.safetensors")
    dynamic = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert abs(dynamic - 0.25) < 0.01
    assert json.loads((out / "partition.json").read_text())["iteration"] == 2
    assert main(["eval", str(out), "--split", "test"]) == 0  # the output is a run directory


def test_partition_of_a_model_built_from_a_config(config, tmp_path, capsys):
    assert main(["partition", "-c", str(config), "--imp-granularity", "channel",
                 "--out", str(tmp_path / "fresh")]) == 0
    assert "granularity=channel" in capsys.readouterr().out
    assert "imp_mode: none" in (tmp_path / "fresh" / "config.yaml").read_text()


def test_bench_of_a_model_given_by_flags(tmp_path, capsys, one_thread):
    assert main(["bench", "--model", "resnet8", "--width", "4", "--method", "dyconv",
                 "--dynamic-ratio", "0.3", "--batch-sizes", "1,4", "--reps", "2",
                 "--image-size", "8", "--threads", "2", "--out", str(tmp_path / "bench.csv")]) == 0
    out = capsys.readouterr().out
    assert ", 2 threads," in out  # the config key --threads (one_thread restores the count)
    for name in ("static", "dynamic", "pad"):
        assert name in out
    assert len((tmp_path / "bench.csv").read_text().splitlines()) == 1 + 2 * 3


def test_bench_of_a_trained_run(config, tmp_path, capsys):
    assert main(["train", "-c", str(config), "--quiet"]) == 0
    assert main(["bench", "--run", str(tmp_path / "run"), "--batch-sizes", "2",
                 "--reps", "1"]) == 0
    assert "1.00x" in capsys.readouterr().out


def test_compare_prints_one_table_and_writes_files(config, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "-c", str(config), "--out", str(out), "--reps", "2",
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "stored params" in text and "latency b=1" in text
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["variant"] for r in rows] == ["static", "dynamic", "pad"]
    static, dynamic, pad = rows
    assert float(static["latency_ratio_b1"]) == 1.0 and float(static["dynamic_ratio"]) == 0
    assert float(dynamic["dynamic_ratio"]) == 1.0 and abs(float(pad["dynamic_ratio"]) - .5) < .01
    assert int(static["stored_params"]) < int(pad["stored_params"]) < int(
        dynamic["stored_params"])
    assert "FLOPs/sample" in text
    # the static model runs no router: fewer FLOPs than the trained dynamic and PAD models,
    # which are never cheaper exported than as they run (batch 16: grouped path, element mask)
    assert float(static["flops"]) == float(static["flops_export"])
    assert float(static["flops"]) < float(dynamic["flops"]) == float(pad["flops"])
    assert float(pad["flops_export"]) <= float(pad["flops"])
    assert rows[0]["test_acc"] and (out / "compare.md").read_text().startswith("| variant")
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    for variant in ("static", "dynamic", "pad"):
        assert (out / variant / "model.safetensors").is_file()


def test_list_shows_data_sets_and_configs(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "data sets:" in out and "npz" in out and "demo.yaml" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--learning-rate", "0.1"], "unknown config key 'learning-rate'; valid keys:"),
        (["train", "--dynamic-ratio", "2"], "dynamic_ratio must be in [0, 1], got 2.0"),
        (["train", "-c", "missing.yaml"], "config file missing.yaml does not exist"),
        (["compare", "-c", "{config}", "--method", "none", "--imp-mode", "none"],
         "compare needs a dynamic method"),
        (["eval", "{tmp}"], "is not a run directory"),
        (["partition", "-c", "{config}", "--method", "none", "--imp-mode", "none"],
         "partition needs a dynamic method"),
        (["bench", "--batch-sizes", "x"], "--batch-sizes must be comma-separated ints"),
    ],
)
def test_user_errors_are_one_line_messages(argv, message, config, tmp_path, capsys):
    argv = [a.format(config=config, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_flags_of_other_commands_are_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["list", "--bogus"])
    assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
