"""ODConv builds the heads the original builds: no spatial attention for 1x1 kernels, no filter
attention for depthwise layers (those attentions are 1); conversion stays function-preserving."""

import pytest
import torch
from torch import nn

from padnet.layers import ODConv2d


def heads(layer: ODConv2d) -> set[str]:
    return {n for n, _ in layer.router.named_children() if n.endswith("_fc")}


def test_a_3x3_convolution_has_all_four_heads() -> None:
    assert heads(ODConv2d(8, 8, 3)) == {"kernel_fc", "channel_fc", "filter_fc", "spatial_fc"}


def test_a_1x1_convolution_has_no_spatial_attention() -> None:
    layer = ODConv2d(8, 16, 1)
    assert "spatial_fc" not in heads(layer)
    assert torch.equal(layer.router(torch.randn(2, 8, 4, 4)).spatial, torch.ones(2, 1))


def test_a_depthwise_convolution_has_no_filter_attention() -> None:
    layer = ODConv2d(8, 8, 3, groups=8)
    assert "filter_fc" not in heads(layer)
    assert torch.equal(layer.router(torch.randn(2, 8, 4, 4)).filter, torch.ones(2, 8))


@pytest.mark.parametrize(("kernel", "groups"), [(1, 1), (3, 8), (1, 8), (3, 2)])
def test_conversion_is_function_preserving_whatever_the_heads(kernel, groups) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, kernel, padding=kernel // 2, groups=groups).double()
    layer = ODConv2d.from_conv(conv, num_kernels=3)
    x = torch.randn(3, 8, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x))
