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


def test_result_table_dict_and_model_report_agree():
    model, data = model_and_data()
    result = partition_model(model, data, dynamic_ratio=0.25, iterations=2, scope="layer")
    assert isinstance(result, PartitionResult)
    assert result.layers == ["1", "2.0"] and result.numel == [108, 8]
    assert result.num_dynamic == [27, 2] and result.dynamic_ratios == [0.25, 0.25]
    assert result.iteration == result.iterations == 2 and result.done
    assert result.kappas == pytest.approx([0.5, 0.25])
    d = result.to_dict()
    json.dumps(d)
    assert d["layers"][0]["name"] == "1" and set(d["layers"][0]["score"]) == {"min", "mean",
                                                                                 "max"}
    assert d["total_ratio"] == pytest.approx(29 / 116)
    text = str(result)
    assert "IMP iteration 2/2" in text and "2.0" in text and "total" in text
    report = layer_ratio_report(model)
    assert report.layers == result.layers and report.num_dynamic == result.num_dynamic
    assert "0.250" in str(report)
    assert layer_ratio_report(result) is result
    with pytest.raises(TypeError, match="expects a PartitionResult or an nn.Module"):
        layer_ratio_report("model")


def test_plot_ratios_writes_a_file(tmp_path):
    pytest.importorskip("matplotlib")
    model, data = model_and_data()
    result = partition_model(model, data, dynamic_ratio=0.5)
    for source, name in ((result, "result.png"), (model, "model.svg")):
        path = plot_ratios(source, tmp_path / name, title="test")
        assert path.is_file() and path.stat().st_size > 1000
