"""dynamize says when it converts nothing: a model converted before, or one without candidates."""

import pytest
from torch import nn

import padnet


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1))


def test_a_model_converted_before_is_refused_with_the_method_it_has() -> None:
    model = padnet.dynamize(cnn(), "dyconv")
    with pytest.raises(ValueError, match=r"already has PAD layers \(DynamicConv2d"):
        padnet.dynamize(model, "condconv")


def test_a_model_without_candidates_is_refused() -> None:
    with pytest.raises(ValueError, match="found no nn.Conv2d module to convert"):
        padnet.dynamize(nn.Sequential(nn.Linear(2, 2)), "dyconv")


def test_subclasses_of_conv2d_that_keep_its_forward_are_converted() -> None:
    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(nn.Conv2d(3, 8, 3), MyConv(8, 8, 3), nn.Conv2d(8, 8, 3))
    report = padnet.dynamize(model, "dyconv").padnet_report
    assert [(e.name, e.reason) for e in report.skipped] == [("0", "stem")]
    assert report.names == ["1", "2"]


def test_a_model_whose_ffns_are_all_moe_already_is_refused() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)))
    padnet.dynamize(model, "moe", num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="is a MoE already"):
        padnet.dynamize(model, "moe", num_experts=2, top_k=1)
