"""Pure parts of IMP: kappa schedules, iteration steps, score functions and thresholding."""

from __future__ import annotations

import math

import pytest
import torch

from padnet.partition import iteration_steps, kappa_schedule
from padnet.partition import scores as S


def test_exponential_schedule_decreases_geometrically_to_the_target():
    exp = kappa_schedule(0.3, 4, "exponential")
    assert exp == pytest.approx([0.3 ** (t / 4) for t in range(1, 5)])
    assert exp[-1] == 0.3
    assert all(a > b for a, b in zip(exp, exp[1:], strict=False))


def test_linear_schedule_decreases_in_equal_steps():
    lin = kappa_schedule(0.3, 4, "linear")
    assert lin == pytest.approx([1 - 0.7 * t / 4 for t in range(1, 5)])


def test_schedules_at_the_edge_ratios_are_constant():
    assert kappa_schedule(0.0, 3) == [0.0, 0.0, 0.0]
    assert kappa_schedule(1.0, 2, "linear") == [1.0, 1.0]


def test_iteration_steps_spread_over_the_window():
    assert iteration_steps(5, 0, 1000) == [200, 400, 600, 800, 1000]
    assert iteration_steps(3, 10, 20) == [13, 17, 20]
    assert iteration_steps(2, 7, 7) == [7, 7]


@pytest.mark.parametrize("call, match", [
    (lambda: kappa_schedule(1.5, 2), r"dynamic_ratio must be in \[0, 1\], got 1.5"),
    (lambda: kappa_schedule(-0.1, 2), r"dynamic_ratio must be in \[0, 1\], got -0.1"),
    (lambda: kappa_schedule(0.5, 0), "iterations must be an int >= 1, got 0"),
    (lambda: kappa_schedule(0.5, 2, "cosine"), r"schedule must be one of \('exponential', "
                                               r"'linear'\), got 'cosine'"),
    (lambda: iteration_steps(2, 5, 4), "end_step must be >= start_step=5, got 4"),
    (lambda: iteration_steps(2, -1, 4), "start_step must be an int >= 0, got -1"),
])
def test_schedule_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_taylor_score_is_the_absolute_gradient_in_float64():
    g = torch.tensor([[-2.0, 1.0], [0.0, 3.0]])
    assert S.taylor_score(g).tolist() == [[2.0, 1.0], [0.0, 3.0]]
    assert S.taylor_score(g).dtype == torch.float64


def test_moments_from_raw_sums():
    mean, var = S.moments(torch.tensor([2.0, 4.0]), torch.tensor([2.0, 10.0]), 2)
    assert mean.tolist() == [1.0, 2.0] and var.tolist() == [0.0, 1.0]


DYN = torch.tensor([[1.0, 2.0], [3.0, 2.0]])  # K = 2 factors of 2 positions
STATIC = torch.tensor([1.0, 0.0])


def test_magnitude_score_is_the_mean_distance_from_the_static_weight():
    assert S.magnitude_score(DYN, STATIC).tolist() == [1.0, 2.0]


def test_magnitude_score_in_prune_mode_is_the_mean_factor_magnitude():
    assert S.magnitude_score(DYN, STATIC, 1.0, 0.0).tolist() == [2.0, 2.0]  # mean |W_k|


def test_random_score_is_fixed_by_the_generator():
    a = S.random_score((3, 2), torch.Generator().manual_seed(0))
    b = S.random_score((3, 2), torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (3, 2)


def test_channel_scores_sum_each_output_channel():
    scores = torch.arange(24.0).view(2, 3, 4)
    assert S.channel_scores(scores).tolist() == [66.0, 210.0]


def test_expand_channels_repeats_each_channel_decision():
    assert S.expand_channels(torch.tensor([True, False]), (2, 3)).tolist() == [[True] * 3,
                                                                               [False] * 3]


def test_normalize_scores_divides_by_the_mean_and_keeps_zeros():
    norm = S.normalize_scores([torch.tensor([1.0, 3.0]), torch.zeros(2)])
    assert norm[0].tolist() == [0.5, 1.5] and norm[1].tolist() == [0.0, 0.0]


SCORES = [torch.tensor([[0.5, 0.2], [0.5, 0.9]]), torch.tensor([0.5, 0.1, 0.7])]


def test_select_global_exact_count_and_ties():
    masks = S.select_global(SCORES, 0.5)  # round(3.5) = 4 (half to even)
    assert sum(int(m.sum()) for m in masks) == 4
    # 0.9, 0.7, then two of the three 0.5 ties: module order, then lower index
    assert masks[0].tolist() == [[True, False], [True, True]]
    assert masks[1].tolist() == [False, False, True]
    flat = torch.zeros(10)
    assert S.select_global([flat], 0.35)[0].tolist() == [True] * 4 + [False] * 6


def test_select_layerwise_exact_counts():
    per_layer = S.select_layerwise(SCORES, 0.5)
    assert [int(m.sum()) for m in per_layer] == [2, 2]


def channel_rule_oracle(scores, sizes, target):
    """Slow obvious version of the documented global channel rule."""
    items = [(float(s), li, ci, sizes[li]) for li, layer in enumerate(scores)
             for ci, s in enumerate(layer.tolist())]
    items.sort(key=lambda it: (-it[0], it[1], it[2]))
    best_m, best_gap, count = 0, abs(target), 0
    for m, it in enumerate(items, start=1):
        count += it[3]
        if abs(count - target) < best_gap:
            best_m, best_gap = m, abs(count - target)
    chosen = {(it[1], it[2]) for it in items[:best_m]}
    return [[(li, ci) in chosen for ci in range(len(layer))] for li, layer in enumerate(scores)]


@pytest.mark.parametrize("seed", range(5))
def test_select_channels_global_follows_the_documented_rule(seed):
    g = torch.Generator().manual_seed(seed)
    scores = [torch.randint(0, 4, (n,), generator=g).double() for n in (3, 5, 2)]  # many ties
    sizes = [18, 4, 45]
    total = sum(len(s) * n for s, n in zip(scores, sizes, strict=True))
    for kappa in (0.0, 0.13, 0.3, 0.5, 0.77, 1.0):
        target = round(kappa * total)
        masks = S.select_channels_global(scores, sizes, target)
        assert [m.tolist() for m in masks] == channel_rule_oracle(scores, sizes, target)
        count = sum(int(m.sum()) * n for m, n in zip(masks, sizes, strict=True))
        assert abs(count - target) <= math.ceil(max(sizes) / 2)
