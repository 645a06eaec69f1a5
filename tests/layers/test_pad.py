"""The shared PAD mechanism: mask counts, tie breaking, scale factors, state tracking."""

from __future__ import annotations

import pytest
import torch

from padnet.layers import ModeMask, mask_from_scores, set_scale_mode
from padnet.layers.dynamic_conv import DynamicConv2d


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.3, 0.5, 0.77, 1.0])
def test_set_ratio_gives_exact_counts(ratio):
    pad = ModeMask((6, 5, 3), 4)
    pad.set_ratio(ratio, generator=torch.Generator().manual_seed(0))
    assert pad.num_dynamic == round(ratio * 90)
    assert pad.mask.dtype == torch.bool and pad.mask.shape == (6, 5, 3)


def test_mask_from_scores_keeps_highest_and_breaks_ties_by_index():
    scores = torch.tensor([[0.5, 0.9, 0.5], [0.1, 0.5, 0.9]])
    mask = mask_from_scores(scores, 3)
    # both 0.9 stay; of the three 0.5 ties the lowest flat index (0) wins
    assert mask.tolist() == [[True, True, False], [False, False, True]]
    assert mask_from_scores(torch.zeros(7), 4).tolist() == [True] * 4 + [False] * 3


def test_mask_from_scores_rejects_more_dynamic_positions_than_scores():
    with pytest.raises(ValueError, match="num_dynamic must be in \\[0, 7\\], got 8"):
        mask_from_scores(torch.zeros(7), 8)


def test_state_follows_in_place_mask_changes():
    pad = ModeMask((4, 4), 2)
    assert pad.state() == "dynamic"
    pad.set_ratio(0.0)
    assert pad.state() == "static"


def test_state_dict_loads_a_float_mask():
    pad = ModeMask((4, 4), 2)
    pad.load_state_dict({"mask": torch.eye(4), "phi": torch.tensor(0.0)})  # float 0/1 accepted
    assert pad.state() == "mixed" and pad.num_dynamic == 4


def test_state_is_mixed_while_a_probe_override_is_set():
    pad = ModeMask((4, 4), 2)  # all positions dynamic: the override alone makes it "mixed"
    pad.mask_override = torch.ones(4, 4, requires_grad=True)
    assert pad.state() == "mixed"


def probed_layer() -> tuple[DynamicConv2d, torch.Tensor, torch.Tensor]:
    """A layer, an input and its output before ``mask_override`` is set to a float probe."""
    layer = DynamicConv2d(2, 3, 3, padding=1, num_kernels=2, dynamic_ratio=0.5).double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    y0 = layer(x)
    layer.mode_mask.mask_override = layer.mode_mask.mask.double().requires_grad_(True)
    return layer, x, y0


def test_probe_leaves_the_output_unchanged():
    layer, x, y0 = probed_layer()
    torch.testing.assert_close(layer(x), y0)


def test_probe_carries_the_gradient_with_respect_to_the_mask():
    layer, x, _ = probed_layer()
    layer(x).sum().backward()
    assert layer.mode_mask.mask_override.grad.shape == layer.mode_mask.mask.shape
    assert layer.mode_mask.mask_override.grad.abs().sum() > 0


def test_set_scale_mode_on_a_model_counts_the_layers_and_freezes_phi():
    model = torch.nn.Sequential(DynamicConv2d(2, 2, 1), DynamicConv2d(2, 2, 1))
    assert set_scale_mode(model, "none") == 2
    assert all(not m.mode_mask.phi.requires_grad for m in model)


def test_only_scale_mode_prune_marks_a_mask_pruned_and_drops_the_static_part():
    mm = ModeMask((4,), 2, dynamic_ratio=0.5, generator=torch.Generator().manual_seed(0))
    for mode in ("both", "static_only", "dynamic_only", "none"):
        mm.set_scale_mode(mode)
        assert not mm.pruned and mm.has_static()
    mm.set_scale_mode("prune")
    assert mm.pruned and not mm.has_static()


def test_set_scale_mode_rejects_an_unknown_mode():
    model = torch.nn.Sequential(DynamicConv2d(2, 2, 1), DynamicConv2d(2, 2, 1))
    with pytest.raises(ValueError, match="scale_mode must be one of .*'x'"):
        set_scale_mode(model, "x")


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: ModeMask((2,), 0), ValueError, "num_factors must be an int >= 1, got 0"),
        (lambda: ModeMask((2,), 1).set_mask(torch.ones(3)), ValueError,
         r"mask must have shape \(2,\), got \(3,\)"),
        (lambda: ModeMask((2,), 1, dynamic_ratio="half"), TypeError,
         "dynamic_ratio must be a number"),
    ],
    ids=["zero-factors", "mask-shape", "ratio-not-a-number"],
)
def test_mode_mask_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
