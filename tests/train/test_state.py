"""The loop's state as plain data, and the run directory's files (no training)."""

from __future__ import annotations

import json

import pytest
import torch

from padnet.train.config import TrainConfig
from padnet.train.rundir import METRIC_COLUMNS, RunDir
from padnet.train.state import LoopState, StepStats


def test_loop_state_counts_steps_and_epochs():
    state = LoopState()
    state.add_step(StepStats(loss=0.5, aux=0.1, correct=3.0, count=4))
    state.add_step(StepStats(loss=1.0, aux=0.0, correct=1.0, count=2))
    assert (state.global_step, state.step_in_epoch) == (2, 2)
    assert state.sums == {"loss": 4.0, "aux": 0.4, "correct": 4.0, "count": 6.0}
    assert state.mean_loss() == pytest.approx(4 / 6)
    state.end_epoch({"epoch": 1})
    assert (state.epoch, state.step_in_epoch, state.history) == (1, 0, [{"epoch": 1}])
    assert state.sums["count"] == 0 and state.global_step == 2


def test_loop_state_round_trips_through_json_exactly():
    state = LoopState(global_step=7, epoch=1, step_in_epoch=3,
                      sums={"loss": 0.1 + 0.2, "aux": 0.0, "correct": 5.0, "count": 9.0},
                      history=[{"epoch": 1, "val_acc": 1 / 3, "temperature": None}],
                      oneshot_done=True, train_time_s=1.25)
    back = LoopState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert back == state
    data = state.to_dict()
    del data["history"]
    with pytest.raises(ValueError, match="lacks \\['history'\\]"):
        LoopState.from_dict(data)


def test_run_dir_writes_atomically_on_the_main_process(tmp_path):
    run = RunDir(tmp_path / "run")
    cfg = TrainConfig().replace(stop_after=3)
    run.write_config(cfg)
    run.write_metrics([{"epoch": 1, "lr": 0.1, "val_acc": None}])
    run.write_weights({"w": torch.ones(2)}, {"k": "v"})
    run.write_summary({"steps": 1})
    assert "stop_after: 0" in run.config_file.read_text()  # a way to stop, not the experiment
    lines = run.metrics_file.read_text().splitlines()
    assert lines[0] == ",".join(METRIC_COLUMNS) and lines[1].startswith("1,,0.1,")
    assert json.loads(run.summary_file.read_text()) == {"steps": 1}
    assert run.weights_file.is_file() and not list(run.path.glob(".*"))


def test_run_dir_of_another_rank_writes_nothing(tmp_path):
    run = RunDir(tmp_path / "run", is_main=False)
    run.write_config(TrainConfig())
    run.write_metrics([])
    run.write_weights({"w": torch.ones(2)}, {})
    run.write_summary({})
    run.write_checkpoint({"w": torch.ones(2)}, {}, step=1, metadata={})
    assert not (tmp_path / "run").exists()


def test_run_dir_guards_an_existing_run(tmp_path):
    run = RunDir(tmp_path)
    assert run.prepare(resume=False, overwrite=False) is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint to resume"):
        run.prepare(resume=True, overwrite=False)
    run.write_checkpoint({"w": torch.ones(2)}, {"x": 1}, step=4, metadata={})
    assert run.prepare(resume=True, overwrite=False) == run.checkpoint_dir
    with pytest.raises(ValueError, match="already holds a run"):
        run.prepare(resume=False, overwrite=False)
    assert run.prepare(resume=False, overwrite=True) is None
    run.clear()
    assert run.find_checkpoint() is None


def _damage(path):
    path.write_bytes(path.read_bytes()[:10])


def test_a_fresh_run_keeps_a_run_whose_checkpoint_is_damaged(tmp_path):
    run = RunDir(tmp_path)
    run.write_checkpoint({"w": torch.ones(2)}, {"x": 1}, step=4, metadata={})
    _damage(run.checkpoint_dir / "state.json")
    with pytest.raises(ValueError, match="already holds a run"):
        run.prepare(resume=False, overwrite=False)
    assert sorted(p.name for p in run.checkpoint_dir.iterdir()) == [
        "model.safetensors", "optimizer.safetensors", "state.json"]


@pytest.mark.parametrize("name", ["config.yaml", "metrics.csv", "summary.json",
                                  "model.safetensors", "checkpoint.new/", "checkpoint.damaged/"])
def test_any_run_file_makes_a_directory_an_existing_run(tmp_path, name):
    target = tmp_path / name.rstrip("/")
    target.mkdir() if name.endswith("/") else target.write_text("x")
    with pytest.raises(ValueError, match="already holds a run"):
        RunDir(tmp_path).prepare(resume=False, overwrite=False)
    assert target.exists()


def test_other_files_do_not_make_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert RunDir(tmp_path).prepare(resume=False, overwrite=False) is None
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_a_run_with_a_truncated_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    run.write_checkpoint({"w": torch.ones(2)}, {"x": 1}, step=4, metadata={})
    run.write_config(TrainConfig())
    run.write_summary({"old": True})
    _damage(run.checkpoint_dir / "optimizer.safetensors")
    assert run.prepare(resume=False, overwrite=True) is None
    run.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_resume_finds_a_complete_checkpoint_past_a_truncated_one(tmp_path):
    run = RunDir(tmp_path)
    run.write_checkpoint({"w": torch.ones(2)}, {"x": 1}, step=4, metadata={})
    (tmp_path / "checkpoint").rename(tmp_path / "keep")
    run.write_checkpoint({"w": torch.ones(2)}, {"x": 2}, step=6, metadata={})
    (tmp_path / "keep").rename(tmp_path / "checkpoint.old")  # an older complete copy
    _damage(run.checkpoint_dir / "model.safetensors")
    with pytest.warns(UserWarning, match="kept as"):
        assert run.prepare(resume=True, overwrite=False) == run.checkpoint_dir
    assert (tmp_path / "checkpoint.damaged").is_dir()


def test_an_out_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    for resume in (False, True):
        with pytest.raises(ValueError, match=r"out_dir .*run is a file, not a directory"):
            RunDir(tmp_path / "run").prepare(resume=resume, overwrite=True)


@pytest.mark.parametrize("resume", [False, True])
def test_the_next_start_removes_stale_temporaries(tmp_path, resume):
    run = RunDir(tmp_path)
    run.write_checkpoint({"w": torch.ones(2)}, {"x": 1}, step=4, metadata={})
    stale = [tmp_path / ".metrics.csv.abcdefgh.tmp",
             tmp_path / "checkpoint" / ".state.json.12345678.tmp"]
    for path in stale:
        path.write_text("half")
    run.prepare(resume=resume, overwrite=True)
    assert not any(p.exists() for p in stale)


def test_another_rank_removes_nothing(tmp_path):
    (tmp_path / ".metrics.csv.abcdefgh.tmp").write_text("half")
    RunDir(tmp_path, is_main=False).prepare(resume=False, overwrite=True)
    assert (tmp_path / ".metrics.csv.abcdefgh.tmp").exists()
