"""Pickle-free checkpoints: nested state round trips, optimizer and RNG states, crash safety."""

from __future__ import annotations

import json
import pickle
import random
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from padnet.train import checkpoint as ckpt


def test_nested_state_round_trips_through_json():
    state = {"a": {0: torch.arange(3), 1: (1.5, None, "x")}, "b": [True, torch.ones(2, 2)],
             "__odd": float("inf"), "np": np.float32(2.0)}
    tensors, encoded = ckpt.flatten_state(state)
    back = ckpt.unflatten_state(json.loads(json.dumps(encoded)), tensors)
    assert list(back["a"]) == [0, 1] and torch.equal(back["a"][0], torch.arange(3))
    assert back["a"][1] == (1.5, None, "x") and back["__odd"] == float("inf")
    assert back["b"][0] is True and torch.equal(back["b"][1], torch.ones(2, 2))
    assert back["np"] == 2.0
    with pytest.raises(TypeError, match="cannot store object at 'x'"):
        ckpt.flatten_state({"x": object()})


def _trained(opt_cls, **kw):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = opt_cls(model.parameters(), **kw)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).square().mean().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize(("opt_cls", "kw"), [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
                                             (torch.optim.AdamW, {"lr": 0.01})])
def test_optimizer_state_resumes_exactly_without_pickle(tmp_path, monkeypatch, opt_cls, kw):
    model, opt = _trained(opt_cls, **kw)
    ckpt.save_checkpoint(tmp_path, model.state_dict(), {"optimizer": opt.state_dict(),
                                                        "rng": ckpt.rng_state()}, step=3)

    def forbidden(*args, **kwargs):
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    weights, state, step = ckpt.load_checkpoint(ckpt.find_checkpoint(tmp_path))
    monkeypatch.undo()
    assert step == 3
    model2 = nn.Linear(4, 3)
    model2.load_state_dict(weights)
    opt2 = opt_cls(model2.parameters(), **kw)
    opt2.load_state_dict(state["optimizer"])
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    assert torch.equal(model.weight, model2.weight) and torch.equal(model.bias, model2.bias)


def test_rng_states_round_trip(tmp_path):
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    tensors, encoded = ckpt.flatten_state(ckpt.rng_state())
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(9)
    random.seed(9)
    np.random.seed(9)
    ckpt.set_rng_state(ckpt.unflatten_state(json.loads(json.dumps(encoded)), tensors))
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_newest_complete_checkpoint_survives_a_crash_at_any_point(tmp_path):
    w = {"w": torch.zeros(2)}
    ckpt.save_checkpoint(tmp_path, w, {"n": 1}, step=1)
    assert not (tmp_path / "checkpoint.new").exists()
    # killed while writing the next one: a partial checkpoint.new is ignored
    (tmp_path / "checkpoint.new").mkdir()
    (tmp_path / "checkpoint.new" / "state.json").write_text('{"step": 2, "state": {}}')
    assert ckpt.find_checkpoint(tmp_path) == tmp_path / "checkpoint"
    # killed between the renames: old and new are both complete, the newer one wins
    ckpt.save_checkpoint(tmp_path / "b", w, {"n": 2}, step=2)
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")
    shutil.rmtree(tmp_path / "checkpoint.new")
    (tmp_path / "b" / "checkpoint").rename(tmp_path / "checkpoint.new")
    assert ckpt.find_checkpoint(tmp_path) == tmp_path / "checkpoint.new"
    assert ckpt.load_checkpoint(tmp_path / "checkpoint.new")[1] == {"n": 2}
    # a file from another step makes a directory incomplete
    ckpt.save_checkpoint(tmp_path / "c", w, {"n": 3}, step=3)
    shutil.copy(tmp_path / "checkpoint.new" / "model.safetensors",
                tmp_path / "c" / "checkpoint" / "model.safetensors")
    assert ckpt.find_checkpoint(tmp_path / "c") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(tmp_path / "c" / "checkpoint")


# ---- damaged files, interrupted writes, stale temporaries ----------------------------------
def _two_checkpoints(tmp_path):
    """``tmp_path/run`` with a complete ``checkpoint.old`` (step 1) and ``checkpoint`` (step 2)."""
    w = {"w": torch.zeros(2)}
    for name, step in (("a", 1), ("b", 2)):
        ckpt.save_checkpoint(tmp_path / name, w, {"n": step}, step=step)
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "a" / "checkpoint").rename(run / "checkpoint.old")
    (tmp_path / "b" / "checkpoint").rename(run / "checkpoint")
    return run


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "state.json"])
def test_a_truncated_file_makes_only_its_checkpoint_incomplete(tmp_path, name):
    run = _two_checkpoints(tmp_path)
    truncate(run / "checkpoint" / name)
    assert ckpt.find_checkpoint(run) == run / "checkpoint.old"


def test_a_pickle_in_place_of_a_checkpoint_file_makes_it_incomplete(tmp_path):
    run = _two_checkpoints(tmp_path)
    (run / "checkpoint" / "optimizer.safetensors").write_bytes(pickle.dumps({"x": 1}))
    assert ckpt.find_checkpoint(run) == run / "checkpoint.old"


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
def test_damaged_tensor_bytes_are_detected_on_load(tmp_path, name):
    ckpt.save_checkpoint(tmp_path, {"w": torch.zeros(4)}, {"m": torch.ones(4)}, step=1)
    path = tmp_path / "checkpoint" / name
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{name}.*damaged.*--overwrite"):
        ckpt.load_checkpoint(tmp_path / "checkpoint")


def test_a_damaged_state_json_is_detected_on_load(tmp_path):
    ckpt.save_checkpoint(tmp_path, {"w": torch.zeros(4)}, {"m": torch.ones(4)}, step=1)
    path = tmp_path / "checkpoint" / "state.json"
    data = json.loads(path.read_text())
    data["state"] = {"m": {"__tensor__": "gone"}}
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"state\.json.*damaged.*'gone'"):
        ckpt.load_checkpoint(tmp_path / "checkpoint")


def test_the_newest_loadable_checkpoint_is_loaded_past_a_damaged_one(tmp_path):
    run = _two_checkpoints(tmp_path)
    path = run / "checkpoint" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"checkpoint/model\.safetensors is damaged"):
        directory, _, state, step = ckpt.load_latest_checkpoint(run)
    assert (directory, state, step) == (run / "checkpoint.old", {"n": 1}, 1)


def test_without_a_loadable_checkpoint_the_damage_is_reported(tmp_path):
    ckpt.save_checkpoint(tmp_path, {"w": torch.zeros(4)}, {}, step=1)
    truncate(tmp_path / "checkpoint" / "state.json")
    with pytest.raises(ValueError, match=r"no complete checkpoint.*checkpoint/state\.json is "
                       r"unreadable.*--overwrite"):
        ckpt.load_latest_checkpoint(tmp_path)


def test_settling_after_a_kill_between_the_renames_keeps_the_newest(tmp_path):
    run = _two_checkpoints(tmp_path)
    (run / "checkpoint").rename(run / "checkpoint.new")  # killed before new -> checkpoint
    assert ckpt.settle_checkpoints(run) == run / "checkpoint"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint"]
    assert ckpt.load_checkpoint(run / "checkpoint")[2] == 2


def test_saving_after_a_kill_between_the_renames_never_drops_below_the_newest(tmp_path):
    run = _two_checkpoints(tmp_path)
    (run / "checkpoint").rename(run / "checkpoint.new")
    ckpt.save_checkpoint(run, {"w": torch.ones(2)}, {"n": 3}, step=3)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint"]
    assert ckpt.load_checkpoint(run / "checkpoint")[1:] == ({"n": 3}, 3)


def test_a_damaged_checkpoint_is_moved_aside_not_deleted(tmp_path):
    run = _two_checkpoints(tmp_path)
    truncate(run / "checkpoint" / "state.json")
    with pytest.warns(UserWarning, match="kept as .*checkpoint.damaged"):
        assert ckpt.settle_checkpoints(run) == run / "checkpoint"
    assert ckpt.load_checkpoint(run / "checkpoint")[2] == 1
    assert (run / "checkpoint.damaged" / "state.json").is_file()


def test_settling_leaves_a_run_without_a_complete_checkpoint_alone(tmp_path):
    ckpt.save_checkpoint(tmp_path, {"w": torch.zeros(4)}, {}, step=1)
    truncate(tmp_path / "checkpoint" / "state.json")
    before = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert ckpt.settle_checkpoints(tmp_path) is None
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == before


def test_settling_removes_stale_temporaries_of_a_killed_write(tmp_path):
    ckpt.save_checkpoint(tmp_path, {"w": torch.zeros(4)}, {}, step=1)
    stale = tmp_path / "checkpoint" / ".optimizer.safetensors.abcd1234.tmp"
    stale.write_bytes(b"half")
    ckpt.settle_checkpoints(tmp_path)
    assert not stale.exists() and ckpt.find_checkpoint(tmp_path) == tmp_path / "checkpoint"


KILL_SCRIPT = """
import sys, torch
from padnet.train import checkpoint as ckpt
run = sys.argv[1]
ckpt.save_checkpoint(run, {"w": torch.zeros(3)}, {"m": torch.zeros(2), "n": 1}, step=1)
ckpt.save_checkpoint(run, {"w": torch.ones(3)}, {"m": torch.ones(2), "n": 2}, step=2)
"""


@pytest.mark.parametrize("point", ["atomic_write@4", "atomic_write@6", "checkpoint_written@2",
                                   "checkpoint_swapped@2"])
def test_a_kill_inside_a_checkpoint_write_leaves_a_complete_checkpoint(tmp_path, point):
    """SIGKILL inside the second save (PADNET_FAULT): a file written but not renamed, the last
    file not renamed, all files written, the old checkpoint moved aside: a checkpoint of step
    1 or 2 loads, and the next save settles the directory."""
    import os
    import subprocess
    import sys

    from padnet.utils.io import FAULT_ENV

    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(run)], capture_output=True,
                          env={**os.environ, FAULT_ENV: point}, timeout=120)
    assert done.returncode == -9, done.stderr
    found = ckpt.find_checkpoint(run)
    weights, state, step = ckpt.load_checkpoint(found)
    assert step in (1, 2) and state["n"] == step and torch.equal(weights["w"],
                                                                  torch.full((3,), step - 1.0))
    ckpt.save_checkpoint(run, {"w": torch.ones(3)}, {"n": 3}, step=3)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint"]
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == [
        "model.safetensors", "optimizer.safetensors", "state.json"]
