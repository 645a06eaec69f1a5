"""MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", 2018).

Module and parameter names follow torchvision exactly (``features.0.0`` stem conv,
``features.N.conv.*`` inverted residual blocks, ``features.18`` last 1x1 conv, ``classifier.1``),
so torchvision's official ImageNet checkpoint loads with ``strict=True``
(see :mod:`padnet.models.pretrained`). 3,504,872 parameters with 1000 classes.
"""

from __future__ import annotations

import torch
from torch import nn

from padnet.models.registry import register_model
from padnet.utils.checks import check_number

__all__ = ["INVERTED_RESIDUAL_SETTING", "InvertedResidual", "MobileNetV2", "make_divisible"]

#: (expand ratio t, output channels c, repeats n, first stride s) per stage
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``divisor``), never going
    more than 10 % below ``value`` (torchvision's ``_make_divisible``)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def conv_bn_relu6(
    in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """Conv (no bias, "same" padding) -> BatchNorm -> ReLU6, keys ``0``, ``1``, ``2``."""
    padding = (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups,
                  bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when ``expand_ratio == 1``) -> 3x3 depthwise -> 1x1 linear projection.

    The residual connection is used when ``stride == 1`` and ``in_channels == out_channels``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        hidden = int(round(in_channels * expand_ratio))
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_relu6(in_channels, hidden, kernel_size=1))
        layers += [
            conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 classifier: (B, in_chans, H, W) -> (B, num_classes).

    Args:
        num_classes: classifier outputs.
        in_chans: input channels of the stem conv.
        width_mult: channel multiplier; channel counts are rounded to multiples of 8.
        dropout: dropout probability before the classifier.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        *,
        width_mult: float = 1.0,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        check_number(width_mult, "width_mult", minimum=0, strict=True)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        channels = make_divisible(32 * width_mult)
        last_channels = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [conv_bn_relu6(in_chans, channels, stride=2)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out_channels = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(channels, out_channels, s if i == 0 else 1, t))
                channels = out_channels
        features.append(conv_bn_relu6(channels, last_channels, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(last_channels, num_classes)
        )
        self.last_channels = last_channels

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, last_channels, H/32, W/32)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)  # (B, last_channels)
        return self.classifier(x)


@register_model
def mobilenet_v2(
    *, num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0, dropout: float = 0.2
) -> MobileNetV2:
    """MobileNetV2 (torchvision layout); ImageNet weights with ``pretrained=True``."""
    return MobileNetV2(num_classes, in_chans, width_mult=width_mult, dropout=dropout)
