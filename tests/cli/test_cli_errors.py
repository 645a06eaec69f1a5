"""User mistakes and accidents on the command line: one message, the right exit status, nothing
lost. Status 2: a problem the user fixes (config, data, files, command); 1: the system (disk
full); 130: Ctrl-C. ``--debug`` shows the traceback."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from padnet.cli.main import main
from padnet.train import checkpoint as ckpt
from tiny_data import write_tiny_npz

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ("dataset: npz\nmodel: resnet8\nwidth: 4\nbatch_size: 16\nval_fraction: 0.25\n"
        "epochs: 2\nlr: 0.05\n")


@pytest.fixture
def config(tmp_path):
    """A tiny config (4 steps per epoch, 2 epochs) writing to ``tmp_path/run``."""
    write_tiny_npz(tmp_path / "tiny.npz")
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY + f"data_root: {tmp_path / 'tiny.npz'}\nout_dir: {tmp_path / 'run'}\n")
    return path


def run_main(argv, capsys):
    """``(status, stdout, stderr)`` of ``padnet ARGV``."""
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_message(status, err, expected_status, *parts):
    assert status == expected_status, err
    assert "Traceback" not in err
    for part in parts:
        assert part in err, err


def weights(path):
    from safetensors.torch import load_file

    return load_file(path)


# ---- training --------------------------------------------------------------------------------
def test_a_diverging_run_exits_2_with_advice(config, tmp_path, capsys):
    status, out, err = run_main(["train", "-c", config, "--lr", "1e6", "--quiet"], capsys)
    assert_one_message(status, err, 2, "padnet train: error: training diverged", "lower lr",
                       "grad_clip", "data")
    assert "done" not in out and not (tmp_path / "run" / "model.safetensors").exists()


def test_an_out_dir_that_is_a_file_exits_2(config, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    status, _, err = run_main(["train", "-c", config, "--out-dir", tmp_path / "file"], capsys)
    assert_one_message(status, err, 2, "is a file, not a directory")
    assert (tmp_path / "file").read_text() == "x"


def test_a_yaml_syntax_error_exits_2_naming_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model: resnet8\nlr: [0.1\n")
    status, _, err = run_main(["train", "-c", path], capsys)
    assert_one_message(status, err, 2, "bad.yaml: line 3", "YAML error")


def test_text_data_with_an_image_model_exits_2(tmp_path, capsys):
    data = tmp_path / "t.csv"
    data.write_text("text,label\n" + "".join(f"film {i},{i % 2}\n" for i in range(20)))
    status, _, err = run_main(["train", "--dataset", "csv", "--data-root", data, "--model",
                               "resnet8", "--out-dir", tmp_path / "run"], capsys)
    assert_one_message(status, err, 2, "holds text", "image model", "minilm")


def fill_disk_at(monkeypatch, name, nth):
    """The ``nth`` write (1-based) of a file called ``name`` fails half-way with ENOSPC."""
    from padnet.utils import io

    real, calls = io.atomic_write, [0]

    def atomic_write(path, write):
        if Path(path).name == name:
            calls[0] += 1
            if calls[0] == nth:
                def half(tmp):
                    with open(tmp, "wb") as f:
                        f.write(b"half")
                    raise OSError(errno.ENOSPC, "No space left on device")

                return real(path, half)
        return real(path, write)

    monkeypatch.setattr(io, "atomic_write", atomic_write)


def test_a_full_disk_exits_1_and_loses_nothing(config, tmp_path, capsys, monkeypatch):
    fill_disk_at(monkeypatch, "optimizer.safetensors", 2)  # in the checkpoint of step 4
    status, _, err = run_main(["train", "-c", config, "--save-every", "2", "--quiet"], capsys)
    run = tmp_path / "run"
    assert_one_message(status, err, 1, "No space left on device", "free some space",
                       "checkpoint (step 2)", f"padnet train --resume {run}")
    assert ckpt.load_checkpoint(ckpt.find_checkpoint(run))[2] == 2
    assert not list(run.rglob("*.tmp")) and not (run / "model.safetensors").exists()
    monkeypatch.undo()
    status, out, err = run_main(["train", "--resume", run, "--quiet"], capsys)
    assert status == 0 and "done" in out, err


def interrupt_at(monkeypatch, step):
    import padnet.train.loop as loop

    real, calls = loop.train_step, [0]

    def train_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", train_step)


def test_ctrl_c_exits_130_naming_the_checkpoint_and_the_resume_command(config, tmp_path, capsys,
                                                                        monkeypatch):
    interrupt_at(monkeypatch, 4)
    status, _, err = run_main(["train", "-c", config, "--save-every", "2", "--quiet"], capsys)
    run = tmp_path / "run"
    assert_one_message(status, err, 130, "interrupted at step 3", "checkpoint (step 2)",
                       f"padnet train --resume {run}")
    monkeypatch.undo()
    status, out, err = run_main(["train", "--resume", run, "--quiet"], capsys)
    assert status == 0 and "done" in out, err


def test_ctrl_c_before_the_first_checkpoint_says_there_is_nothing_to_resume(config, capsys,
                                                                          monkeypatch):
    interrupt_at(monkeypatch, 1)
    status, _, err = run_main(["train", "-c", config, "--quiet"], capsys)
    assert_one_message(status, err, 130, "before the first checkpoint", "--overwrite")


# ---- resuming --------------------------------------------------------------------------------
def test_resume_without_config_uses_the_runs_own_and_ends_like_an_uninterrupted_run(
        config, tmp_path, capsys):
    assert main(["train", "-c", str(config), "--out-dir", str(tmp_path / "full"),
                 "--quiet"]) == 0
    assert main(["train", "-c", str(config), "--stop-after", "3", "--quiet"]) == 0
    before = (tmp_path / "run" / "config.yaml").read_bytes()
    # bare --resume: the run in --out-dir, with its own config.yaml
    assert main(["train", "--resume", "--out-dir", str(tmp_path / "run"), "--quiet"]) == 0
    assert (tmp_path / "run" / "config.yaml").read_bytes() == before
    full, resumed = (weights(tmp_path / n / "model.safetensors") for n in ("full", "run"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    capsys.readouterr()


@pytest.mark.parametrize("how", ["flags", "config"])
def test_resume_with_another_experiment_exits_2_listing_the_differences(config, tmp_path, capsys,
                                                                        how):
    assert main(["train", "-c", str(config), "--stop-after", "2", "--quiet"]) == 0
    run = tmp_path / "run"
    if how == "flags":
        argv = ["train", "--resume", run, "--lr", "0.5", "--batch-size", "8"]
    else:
        other = tmp_path / "other.yaml"
        other.write_text(config.read_text().replace("lr: 0.05", "lr: 0.5").replace(
            "batch_size: 16", "batch_size: 8"))
        argv = ["train", "-c", other, "--resume", run]
    status, _, err = run_main(argv, capsys)
    assert_one_message(status, err, 2, "another experiment", "lr: 0.05 in the run, 0.5 now",
                       "batch_size: 16 in the run, 8 now")


def test_resume_with_harmless_flags_runs(config, tmp_path, capsys):
    assert main(["train", "-c", str(config), "--stop-after", "2", "--quiet"]) == 0
    status, out, err = run_main(["train", "--resume", tmp_path / "run", "--device", "cpu",
                                 "--save-every", "1", "--quiet"], capsys)
    assert status == 0 and "done" in out, err


def test_resume_of_a_directory_without_a_run_exits_2(tmp_path, capsys):
    status, _, err = run_main(["train", "--resume", tmp_path / "nothing"], capsys)
    assert_one_message(status, err, 2, "no run to resume")


# ---- evaluating damaged files ----------------------------------------------------------------
@pytest.fixture
def trained(config, tmp_path):
    assert main(["train", "-c", str(config), "--epochs", "1", "--quiet"]) == 0
    return tmp_path / "run"


def flip_a_tensor_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x55
    path.write_bytes(bytes(data))


def test_eval_of_damaged_weights_exits_2_naming_the_file_and_the_checkpoint_flag(trained,
                                                                                capsys):
    flip_a_tensor_byte(trained / "model.safetensors")
    status, out, err = run_main(["eval", trained], capsys)
    assert_one_message(status, err, 2, f"{trained / 'model.safetensors'} is damaged",
                       "--checkpoint")
    assert "acc" not in out
    status, out, err = run_main(["eval", trained, "--checkpoint"], capsys)
    assert status == 0 and "val: loss" in out, err


def test_eval_of_truncated_weights_exits_2(trained, capsys):
    path = trained / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    status, _, err = run_main(["eval", trained], capsys)
    assert_one_message(status, err, 2, "model.safetensors is not a readable safetensors file",
                       "--checkpoint")


def test_eval_of_a_damaged_checkpoint_exits_2(trained, capsys):
    flip_a_tensor_byte(trained / "checkpoint" / "model.safetensors")
    status, _, err = run_main(["eval", trained, "--checkpoint"], capsys)
    assert_one_message(status, err, 2, "checkpoint/model.safetensors is damaged")


def test_eval_from_another_working_directory(trained, tmp_path, capsys, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    status, out, err = run_main(["eval", trained], capsys)
    assert status == 0 and "val: loss" in out, err


def test_a_relative_data_root_is_resolved_when_the_run_starts(config, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = config.read_text().replace(f"data_root: {tmp_path / 'tiny.npz'}", "data_root: tiny.npz")
    config.write_text(text)
    assert main(["train", "-c", str(config), "--stop-after", "2", "--quiet"]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data_root"] == str(tmp_path / "tiny.npz")
    monkeypatch.chdir(tmp_path / "run")
    status, out, err = run_main(["train", "--resume", tmp_path / "run", "--quiet"], capsys)
    assert status == 0 and "done" in out, err


# ---- partition outputs -----------------------------------------------------------------------
@pytest.fixture
def trained_pad(config, tmp_path):
    assert main(["train", "-c", str(config), "--epochs", "1", "--method", "condconv",
                 "--quiet"]) == 0
    return tmp_path / "run"


def test_partition_of_a_copied_run_writes_into_the_copy(trained_pad, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(trained_pad, copy)
    before = sorted(p.name for p in trained_pad.iterdir())
    status, _, err = run_main(["partition", "--run", copy, "--dynamic-ratio", "0.5",
                               "--imp-iterations", "1"], capsys)
    assert status == 0, err
    assert (copy / "partition" / "model.safetensors").is_file()
    assert sorted(p.name for p in trained_pad.iterdir()) == before


def test_partition_into_the_trained_run_needs_overwrite(trained_pad, capsys):
    files = {p.name: p.read_bytes() for p in trained_pad.iterdir() if p.is_file()}
    argv = ["partition", "--run", trained_pad, "--out", trained_pad, "--dynamic-ratio", "0.5",
            "--imp-iterations", "1"]
    status, _, err = run_main(argv, capsys)
    assert_one_message(status, err, 2, "already holds the trained run itself", "--overwrite")
    assert files == {p.name: p.read_bytes() for p in trained_pad.iterdir() if p.is_file()}
    status, _, err = run_main([*argv, "--overwrite"], capsys)
    assert status == 0, err
    assert (trained_pad / "masks.safetensors").is_file()


def test_partition_refuses_an_earlier_partition_without_overwrite(trained_pad, capsys):
    argv = ["partition", "--run", trained_pad, "--dynamic-ratio", "0.5", "--imp-iterations", "1"]
    assert run_main(argv, capsys)[0] == 0
    status, _, err = run_main(argv, capsys)
    assert_one_message(status, err, 2, "already holds", "--overwrite")
    assert run_main([*argv, "--overwrite"], capsys)[0] == 0


# ---- --debug ---------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path, capsys, where):
    argv = ["train", "-c", str(tmp_path / "missing.yaml")]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    status, _, err = run_main(argv, capsys)
    assert status == 2 and "Traceback" in err and "missing.yaml does not exist" in err


def test_without_debug_a_usage_error_has_no_traceback(tmp_path, capsys):
    status, _, err = run_main(["train", "-c", tmp_path / "missing.yaml"], capsys)
    assert_one_message(status, err, 2, "missing.yaml does not exist")
