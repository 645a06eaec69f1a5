"""Training runs that go wrong: divergence, a resume with another config, epoch times with
checkpoints inside epochs, paths in the saved config, data that does not fit the model."""

from __future__ import annotations

import math
import os
import shutil
import types

import pytest
import torch
import yaml

from padnet.train import checkpoint as ckpt
from padnet.train import load_config, train
from padnet.train.errors import ConfigMismatch, TrainingDiverged
from padnet.train.state import StepStats
from tiny_data import write_tiny_npz

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--dataset", "npz", "--model", "resnet8", "--width", "4", "--batch-size", "16",
        "--val-fraction", "0.25", "--lr", "0.05", "--epochs", "2"]


@pytest.fixture
def npz(tmp_path):
    """96 grey 8x8 images of 3 classes: 72 training examples, 4 steps per epoch."""
    write_tiny_npz(tmp_path / "tiny.npz")
    return tmp_path / "tiny.npz"


def config(npz, out, *extra):
    return load_config(None, [*TINY, "--data-root", str(npz), "--out-dir", str(out), *extra])


# ---- divergence ------------------------------------------------------------------------------
def test_a_huge_learning_rate_stops_with_advice(npz, tmp_path):
    with pytest.raises(TrainingDiverged) as err:
        train(config(npz, tmp_path / "run", "--lr", "1e6"), quiet=True)
    text = str(err.value)
    assert "diverged at step" in text and "lr" in text and "grad_clip" in text
    assert "data" in text and "1e+06" in text
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_diverged_run_writes_no_non_finite_checkpoint(npz, tmp_path):
    with pytest.raises(TrainingDiverged):
        train(config(npz, tmp_path / "run", "--lr", "1e6", "--save-every", "1"), quiet=True)
    found = ckpt.find_checkpoint(tmp_path / "run")
    if found is not None:
        weights = ckpt.load_checkpoint(found)[0]
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def poison_loss_at(monkeypatch, step):
    """The loss of optimizer step ``step`` (1-based) comes out NaN."""
    import padnet.train.loop as loop

    real, calls = loop.train_step, [0]

    def train_step(*args, **kwargs):
        stats = real(*args, **kwargs)
        calls[0] += 1
        return StepStats(math.nan, *list(vars(stats).values())[1:]) if calls[0] == step else stats

    monkeypatch.setattr(loop, "train_step", train_step)


def poison_weights_at(monkeypatch, step):
    """After optimizer step ``step`` (1-based) one weight is NaN (the step's loss is finite)."""
    import padnet.train.loop as loop

    real, calls = loop.train_step, [0]

    def train_step(model, *args, **kwargs):
        stats = real(model, *args, **kwargs)
        calls[0] += 1
        if calls[0] == step:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = math.nan
        return stats

    monkeypatch.setattr(loop, "train_step", train_step)


def test_a_nan_loss_keeps_the_last_good_checkpoint(npz, tmp_path, monkeypatch):
    train(config(npz, tmp_path / "ref", "--save-every", "1", "--stop-after", "2"), quiet=True)
    poison_loss_at(monkeypatch, 3)
    with pytest.raises(TrainingDiverged, match=r"step 3 .*loss is nan.*checkpoint \(step 2\)"):
        train(config(npz, tmp_path / "run", "--save-every", "1"), quiet=True)
    kept, ref = (ckpt.load_checkpoint(tmp_path / name / "checkpoint") for name in ("run", "ref"))
    assert kept[2] == ref[2] == 2
    assert all(torch.equal(kept[0][k], ref[0][k]) for k in ref[0])


def test_non_finite_weights_are_never_saved(npz, tmp_path, monkeypatch):
    poison_weights_at(monkeypatch, 2)
    with pytest.raises(TrainingDiverged, match=r"step 2 .*weights are not finite"):
        train(config(npz, tmp_path / "run", "--save-every", "1"), quiet=True)
    assert ckpt.load_checkpoint(tmp_path / "run" / "checkpoint")[2] == 1


def test_divergence_before_any_checkpoint_says_so(npz, tmp_path, monkeypatch):
    poison_loss_at(monkeypatch, 1)
    with pytest.raises(TrainingDiverged, match="no checkpoint was written"):
        train(config(npz, tmp_path / "run"), quiet=True)


# ---- epoch time ------------------------------------------------------------------------------
@pytest.fixture
def step_clock(monkeypatch):
    """A clock of the training loop that advances one second per optimizer step."""
    import padnet.train.loop as loop

    now = [0.0]
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    real = loop.train_step

    def train_step(*args, **kwargs):
        now[0] += 1.0
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", train_step)


@pytest.mark.parametrize("save_every", ["0", "1", "3"])
def test_epoch_time_is_the_whole_epoch(npz, tmp_path, step_clock, save_every):
    result = train(config(npz, tmp_path / "run", "--save-every", save_every), quiet=True)
    assert [row["epoch_time_s"] for row in result.history] == [4.0, 4.0]
    assert result.summary["train_time_s"] == 8.0


def test_epoch_time_adds_up_across_a_resume(npz, tmp_path, step_clock):
    train(config(npz, tmp_path / "run", "--stop-after", "3"), quiet=True)
    result = train(config(npz, tmp_path / "run"), resume=True, quiet=True)
    assert [row["epoch_time_s"] for row in result.history] == [4.0, 4.0]


# ---- resuming with a config ------------------------------------------------------------------
def test_a_resume_with_a_different_experiment_is_refused_with_the_differences(npz, tmp_path):
    train(config(npz, tmp_path / "run", "--stop-after", "2"), quiet=True)
    files = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    with pytest.raises(ConfigMismatch) as err:
        train(config(npz, tmp_path / "run", "--batch-size", "8", "--lr", "0.1"), resume=True,
              quiet=True)
    text = str(err.value)
    assert "batch_size: 16 in the run, 8 now" in text and "lr: 0.05 in the run, 0.1 now" in text
    assert files == {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}


def test_a_resume_may_change_harmless_keys_and_keeps_config_yaml(npz, tmp_path):
    train(config(npz, tmp_path / "run", "--stop-after", "2"), quiet=True)
    before = (tmp_path / "run" / "config.yaml").read_bytes()
    result = train(config(npz, tmp_path / "other", "--save-every", "1", "--eval-every", "2",
                          "--device", "cpu", "--num-workers", "0", "--eval-batch-size", "7"),
                   resume=tmp_path / "run", quiet=True)
    assert not result.stopped
    assert (tmp_path / "run" / "config.yaml").read_bytes() == before
    assert not (tmp_path / "other").exists()


def test_a_resume_with_another_world_size_is_refused(npz, tmp_path):
    train(config(npz, tmp_path / "run", "--stop-after", "2"), quiet=True)
    path = tmp_path / "run" / "checkpoint" / "state.json"
    text = path.read_text().replace('"world_size": 1', '"world_size": 2')
    path.write_text(text)
    with pytest.raises(ConfigMismatch, match="2 processes.*1 now"):
        train(config(npz, tmp_path / "run"), resume=True, quiet=True)


def test_a_moved_data_file_may_be_given_anew_on_resume(npz, tmp_path):
    train(config(npz, tmp_path / "run", "--stop-after", "2"), quiet=True)
    moved = npz.rename(tmp_path / "moved.npz")
    result = train(config(moved, tmp_path / "run"), resume=True, quiet=True)
    assert not result.stopped


def test_other_data_is_refused_on_resume(npz, tmp_path):
    train(config(npz, tmp_path / "run", "--stop-after", "2"), quiet=True)
    other = tmp_path / "other.npz"
    other.write_bytes(npz.read_bytes())
    with pytest.raises(ConfigMismatch, match="data_root"):
        train(config(other, tmp_path / "run"), resume=True, quiet=True)


# ---- paths in the saved config ---------------------------------------------------------------
def test_data_root_is_stored_absolute(npz, tmp_path, monkeypatch):
    monkeypatch.chdir(npz.parent)
    train(load_config(None, [*TINY, "--data-root", npz.name, "--out-dir", "run",
                             "--epochs", "1"]), quiet=True)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data_root"] == str(npz.resolve()) and os.path.isabs(saved["data_root"])


# ---- data that does not fit the model --------------------------------------------------------
def test_text_data_with_an_image_model_says_which_models_fit(tmp_path):
    data = tmp_path / "t.csv"
    data.write_text("text,label\n" + "".join(f"film {i},{i % 2}\n" for i in range(20)))
    cfg = load_config(None, ["--dataset", "csv", "--data-root", str(data), "--model", "resnet8",
                             "--out-dir", str(tmp_path / "run")])
    with pytest.raises(ValueError, match=r"'csv' holds text.*'resnet8' is an image model.*"
                                         r"minilm"):
        train(cfg, quiet=True)
    assert not (tmp_path / "run").exists()


def test_image_data_with_a_text_model_says_which_models_fit(npz, tmp_path):
    cfg = load_config(None, ["--dataset", "npz", "--data-root", str(npz), "--model", "minilm",
                             "--out-dir", str(tmp_path / "run")])
    with pytest.raises(ValueError, match=r"'npz' holds images.*'minilm' is a text model"):
        train(cfg, quiet=True)


# ---- damaged checkpoints and file modes ------------------------------------------------------
def test_resume_past_a_truncated_checkpoint_file_uses_the_other_complete_one(npz, tmp_path):
    full = train(config(npz, tmp_path / "full"), quiet=True)
    run = tmp_path / "run"
    train(config(npz, run, "--stop-after", "2"), quiet=True)
    shutil.copytree(run / "checkpoint", tmp_path / "step2")
    train(config(npz, run, "--stop-after", "3"), resume=True, quiet=True)
    (tmp_path / "step2").rename(run / "checkpoint.old")  # an older complete copy
    path = run / "checkpoint" / "optimizer.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.warns(UserWarning, match="not a complete checkpoint"):
        done = train(config(npz, run), resume=True, quiet=True)
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, done.model.state_dict()[key]), key
    assert (run / "checkpoint.damaged" / "optimizer.safetensors").is_file()


def test_overwrite_replaces_a_run_with_a_truncated_checkpoint_file(npz, tmp_path):
    run = tmp_path / "run"
    train(config(npz, run, "--stop-after", "2"), quiet=True)
    path = run / "checkpoint" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="already holds a run"):
        train(config(npz, run), quiet=True)
    assert path.stat().st_size == 50
    assert not train(config(npz, run), overwrite=True, quiet=True).stopped


def test_every_file_of_a_run_gets_the_usual_permissions(npz, tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    train(config(npz, tmp_path / "run", "--epochs", "1"), quiet=True)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert len(files) == 7
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~mask)}
