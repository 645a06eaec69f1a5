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
