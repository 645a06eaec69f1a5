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
