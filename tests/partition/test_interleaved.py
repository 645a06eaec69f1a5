"""Interleaved IMP (``IterativePartition``): schedule, training between iterations, resume."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from padnet.layers import DynamicConv2d, ModeMask
from padnet.partition import IterativePartition

pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(DynamicConv2d(2, 4, 3, padding=1, num_kernels=3), nn.BatchNorm2d(4),
                         nn.ReLU(), DynamicConv2d(4, 6, 3, num_kernels=2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))


def batches(n: int = 5, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 2, 6, 6, generator=g), torch.randint(0, 3, (4,), generator=g))
            for _ in range(n)]


def masks_of(model: nn.Module) -> list[torch.Tensor]:
    return [m.mask.clone() for m in model.modules() if isinstance(m, ModeMask)]


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: tuple) -> None:
    model.train()
    opt.zero_grad()
    nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
    opt.step()


class CountingData:
    """A re-iterable data set that counts how many batches were drawn from it."""

    def __init__(self, items: list) -> None:
        self.items, self.drawn = items, 0

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):  # noqa: ANN204
        for item in self.items:
            self.drawn += 1
            yield item


def stepped_partition():
    """Three iterations over steps 2..8 (two batches each), stepped through steps 1..11.

    Returns the model, its counting data, the partition and the steps that ran an iteration."""
    model, data = small_model(), CountingData(batches(5))
    imp = IterativePartition(model, data, dynamic_ratio=0.3, iterations=3, start_step=2,
                             end_step=8, num_batches=2)
    ran = [step for step in range(1, 12) if imp.step() is not None]
    return model, data, imp, ran


def test_iterations_are_spread_over_the_window():
    imp = IterativePartition(small_model(), batches(5), dynamic_ratio=0.3, iterations=3,
                             start_step=2, end_step=8, num_batches=2)
    assert imp.schedule_steps == [4, 6, 8]


def test_iterations_run_at_their_steps():
    _, _, imp, ran = stepped_partition()
    assert ran == [4, 6, 8] and imp.done and imp.iteration == 3


def test_each_iteration_draws_num_batches_batches():
    _, data, imp, _ = stepped_partition()
    assert data.drawn == 6 and imp.source.consumed == 6  # 3 passes x 2 batches, cycled


def test_masks_freeze_after_the_last_iteration():
    model, _, imp, _ = stepped_partition()
    frozen = masks_of(model)
    for _ in range(3):
        assert imp.step() is None
    assert all(torch.equal(a, b) for a, b in zip(frozen, masks_of(model), strict=True))


def test_run_iteration_after_the_last_raises():
    _, _, imp, _ = stepped_partition()
    with pytest.raises(RuntimeError, match="already ran"):
        imp.run_iteration()


def test_window_of_zero_length_runs_every_iteration_at_once():
    imp = IterativePartition(small_model(), batches(3), dynamic_ratio=0.5, iterations=3,
                             start_step=0, end_step=0, num_batches=1)
    result = imp.step()
    assert imp.done and result.iteration == 3 and len(result.seconds) == 3


def run(stop_at: int | None, total: int = 10, bn_mode: str = "train") -> tuple[list, dict]:
    """Train ``total`` steps with interleaved IMP; optionally checkpoint at ``stop_at`` and
    continue from the checkpoint in a fresh model, optimizer and IMP object."""
    data = batches(5)
    kwargs = dict(dynamic_ratio=0.3, iterations=4, start_step=0, end_step=8, num_batches=2,
                  static_init="mean", bn_mode=bn_mode, seed=3)
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    imp = IterativePartition(model, data, **kwargs)
    for step in range(total):
        if step == stop_at:
            ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(),
                                  "imp": imp.state_dict()})
            model = small_model(seed=99)  # different weights: everything comes from ckpt
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            imp = IterativePartition(model, data, **kwargs)
            imp.load_state_dict(ckpt["imp"])
        train_step(model, opt, data[step % len(data)])
        imp.step()
    assert imp.done
    return masks_of(model) + [p.detach().clone() for p in model.parameters()], imp.state_dict()


def test_resume_in_the_middle_gives_the_same_final_mask():
    full, state = run(stop_at=None)
    resumed, state_resumed = run(stop_at=5)  # after 2 of 4 iterations (steps 2, 4, 6, 8)
    for a, b in zip(full, resumed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert state["history"]["kappas"] == state_resumed["history"]["kappas"]
    assert state["batches_consumed"] == state_resumed["batches_consumed"] == 8
    assert state["history"]["flipped_to_dynamic"] == state_resumed["history"]["flipped_to_dynamic"]


def state_after_one_step() -> dict:
    imp = IterativePartition(small_model(), batches(3), dynamic_ratio=0.3, iterations=2,
                             end_step=2, num_batches=1)
    imp.step()
    return imp.state_dict()


def test_state_dict_is_plain_data():
    state = state_after_one_step()
    masks = state.pop("masks")
    json.dumps(state)  # everything but the masks is JSON-able
    assert all(m.dtype == torch.bool for m in masks.values())


def test_loading_a_state_saved_with_another_ratio_raises():
    state = state_after_one_step()
    other = IterativePartition(small_model(), batches(3), dynamic_ratio=0.4, iterations=2,
                               end_step=2, num_batches=1)
    with pytest.raises(ValueError, match="saved with dynamic_ratio=0.3, this partition has "
                                         "dynamic_ratio=0.4"):
        other.load_state_dict(state)


def test_training_between_iterations_changes_the_scores():
    """IMP is iterative: scoring after training differs from scoring at the start."""
    data = batches(4)
    a, b = small_model(), small_model()
    imp_a = IterativePartition(a, data, dynamic_ratio=0.3, iterations=1, end_step=0,
                               num_batches=2)
    imp_a.step()
    imp_b = IterativePartition(b, data, dynamic_ratio=0.3, iterations=1, end_step=6,
                               num_batches=2)
    opt = torch.optim.SGD(b.parameters(), lr=0.2)
    for step in range(6):
        train_step(b, opt, data[step % 4])
        imp_b.step()
    assert imp_b.done
    assert not all(torch.equal(x, y) for x, y in zip(masks_of(a), masks_of(b), strict=True))
