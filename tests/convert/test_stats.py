"""padnet.stats equals the storage formula K*kappa*N + (1 - kappa)*N for hand-set masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import padnet
from padnet.layers import DynamicConv2d, ODConv2d


@pytest.fixture
def hand_set_model() -> nn.Sequential:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),  # static: counted as "other"
        DynamicConv2d(4, 6, 3, num_kernels=4),  # N = 6*4*9 = 216
        ODConv2d(6, 6, 1, groups=3, num_kernels=2, bias=False),  # N = 6*2 = 12
    )
    m1 = torch.zeros(6, 4, 3, 3, dtype=torch.bool)
    m1[:2] = True  # 72 of 216 dynamic
    model[1].mode_mask.set_mask(m1)
    m2 = torch.zeros(6, 2, 1, 1, dtype=torch.bool)
    m2[0, 0] = m2[5, 1] = m2[3, 0] = True  # 3 of 12
    model[2].mode_mask.set_mask(m2)
    return model


def test_layer_rows_match_count_formula_for_hand_set_masks(hand_set_model):
    a, b = padnet.stats(hand_set_model).layers
    assert (a.name, a.kind) == ("1", "DynamicConv2d")
    assert (a.num_factors, a.numel, a.num_dynamic) == (4, 216, 72)
    assert a.dynamic_params == 4 * 72 and a.static_params == 216 - 72
    assert a.stored_params == 4 * 72 + 144 and a.fully_dynamic_params == 864
    assert (b.num_factors, b.numel, b.num_dynamic, b.stored_params) == (2, 12, 3, 2 * 3 + 9)
    assert abs(a.dynamic_ratio - 1 / 3) < 1e-12


def test_totals_add_the_other_parameters(hand_set_model):
    s = padnet.stats(hand_set_model)
    total_params = sum(p.numel() for p in hand_set_model.parameters())
    pad_params = (4 + 1) * 216 + (2 + 1) * 12
    assert s.other_params == total_params - pad_params
    assert s.stored_params == 4 * 72 + 144 + 2 * 3 + 9 + s.other_params
    assert s.dynamic_ratio == 75 / 228


def test_dict_and_table_show_the_counts(hand_set_model):
    s = padnet.stats(hand_set_model)
    d = s.to_dict()
    assert d["total"]["stored_params"] == s.stored_params
    assert d["layers"][0]["dynamic_params"] == 288
    table = str(s)
    assert "DynamicConv2d" in table and "total" in table and f"{s.stored_params:,}" in table


def test_a_fully_dynamic_layer_stores_every_factor():
    layer = DynamicConv2d(2, 2, 3, num_kernels=3)
    assert padnet.stats(layer).layers[0].stored_params == 3 * 2 * 2 * 9


def test_a_static_layer_stores_one_weight():
    layer = DynamicConv2d(2, 2, 3, num_kernels=3)
    layer.mode_mask.set_ratio(0.0)
    assert padnet.stats(layer).layers[0].stored_params == 2 * 2 * 9


def test_a_model_without_pad_layers_has_only_other_parameters():
    static = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Linear(2, 2))
    s = padnet.stats(static)
    assert s.layers == [] and s.stored_params == sum(p.numel() for p in static.parameters())
    assert s.dynamic_ratio == 0.0
