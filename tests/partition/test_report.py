"""The partition result, the per-layer ratio report and the bar-chart helper."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from padnet.layers import DynamicConv2d
from padnet.partition import PartitionResult, layer_ratio_report, partition_model, plot_ratios


def model_and_data() -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), DynamicConv2d(3, 4, 3, num_kernels=2),
                          nn.Sequential(DynamicConv2d(4, 2, 1, num_kernels=2)),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return model, [(torch.randn(3, 1, 7, 7), torch.randint(0, 2, (3,)))]


@pytest.fixture
def partitioned() -> tuple[nn.Module, PartitionResult]:
    model, data = model_and_data()
    return model, partition_model(model, data, dynamic_ratio=0.25, iterations=2, scope="layer")


def test_result_fields(partitioned):
    _, result = partitioned
    assert isinstance(result, PartitionResult)
    assert result.layers == ["1", "2.0"] and result.numel == [108, 8]
    assert result.num_dynamic == [27, 2] and result.dynamic_ratios == [0.25, 0.25]
    assert result.iteration == result.iterations == 2 and result.done
    assert result.kappas == pytest.approx([0.5, 0.25])


def test_result_dict_is_json_with_score_summaries(partitioned):
    _, result = partitioned
    d = result.to_dict()
    json.dumps(d)
    assert d["layers"][0]["name"] == "1" and set(d["layers"][0]["score"]) == {"min", "mean",
                                                                                 "max"}
    assert d["total_ratio"] == pytest.approx(29 / 116)


def test_result_text_is_a_table(partitioned):
    _, result = partitioned
    text = str(result)
    assert "IMP iteration 2/2" in text and "2.0" in text and "total" in text


def test_model_report_agrees_with_the_result(partitioned):
    model, result = partitioned
    report = layer_ratio_report(model)
    assert report.layers == result.layers and report.num_dynamic == result.num_dynamic
    assert "0.250" in str(report)


def test_report_of_a_result_is_the_result(partitioned):
    _, result = partitioned
    assert layer_ratio_report(result) is result


def test_report_of_something_else_raises():
    with pytest.raises(TypeError, match="expects a PartitionResult or an nn.Module"):
        layer_ratio_report("model")


@pytest.mark.parametrize(("source", "name"), [("result", "result.png"), ("model", "model.svg")])
def test_plot_ratios_writes_a_file(tmp_path, source, name):
    pytest.importorskip("matplotlib")
    model, data = model_and_data()
    result = partition_model(model, data, dynamic_ratio=0.5)
    path = plot_ratios(result if source == "result" else model, tmp_path / name, title="test")
    assert path.is_file() and path.stat().st_size > 1000
