"""ResNets (He et al., "Deep Residual Learning for Image Recognition", 2016).

Two families sharing one ``ResNet`` class and torchvision's module names (``conv1``, ``bn1``,
``layerN.i.conv1``, ``layerN.i.downsample.0``, ``fc``):
- CIFAR ResNets: 3x3 stride-1 stem, no max-pool, BasicBlocks, 1x1 conv + BN projection shortcut
  when the shape changes. ``resnet8/20/32`` have 3 stages of widths (w, 2w, 4w) with w = 16;
  ``resnet18_cifar`` has 4 stages of widths (64, ..., 512).
- ImageNet ResNets ``resnet18`` and ``resnet50``: 7x7 stride-2 stem + 3x3 max-pool; the Bottleneck
  puts the stride on its 3x3 conv (torchvision's "ResNet v1.5"). Parameter names and counts match
  torchvision, so its checkpoints load with ``strict=True``.
The stem conv is always the first ``nn.Conv2d`` in ``model.modules()`` order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from padnet.models.registry import register_model
from padnet.utils.checks import check_int

__all__ = ["BasicBlock", "Bottleneck", "ResNet"]


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs; the first carries the stride. Output channels = ``planes``."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _shortcut(in_channels, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (with the stride), 1x1 expand to ``4 * planes`` channels."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv1x1(in_channels, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    """1x1 conv + BN projection when the shape changes, else None (identity)."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


class ResNet(nn.Module):
    """Stem, ``len(layers)`` stages (stage i has width ``widths[i]``, stride 1 then 2), pool, fc.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: number of blocks per stage.
        widths: ``planes`` per stage (the stem has ``widths[0]`` channels).
        stem: ``"cifar"`` (3x3 stride 1, no pool) or ``"imagenet"`` (7x7 stride 2, max-pool).
    Maps (B, in_chans, H, W) to (B, num_classes).
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        widths: Sequence[int],
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        stem: str = "imagenet",
    ) -> None:
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        if len(layers) != len(widths):
            raise ValueError(f"layers {list(layers)} and widths {list(widths)} differ in length")
        channels = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, channels, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = conv3x3(in_chans, channels)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        if stem == "imagenet":
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.maxpool = nn.Identity()
        for i, (num_blocks, planes) in enumerate(zip(layers, widths, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(num_blocks):
                blocks.append(block(channels, planes, stride if j == 0 else 1))
                channels = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = torch.flatten(self.avgpool(x), 1)  # (B, C)
        return self.fc(x)


def _check_width(width: int) -> None:
    check_int(width, "width", 1)


def _cifar_resnet(depth_blocks: int, num_classes: int, in_chans: int, width: int) -> ResNet:
    _check_width(width)
    widths = (width, 2 * width, 4 * width)
    return ResNet(BasicBlock, [depth_blocks] * 3, widths, num_classes=num_classes,
                  in_chans=in_chans, stem="cifar")


@register_model
def resnet8(*, num_classes: int = 1000, in_chans: int = 3, width: int = 16) -> ResNet:
    """CIFAR ResNet-8: 3 stages x 1 BasicBlock, widths (w, 2w, 4w)."""
    return _cifar_resnet(1, num_classes, in_chans, width)


@register_model
def resnet20(*, num_classes: int = 1000, in_chans: int = 3, width: int = 16) -> ResNet:
    """CIFAR ResNet-20: 3 stages x 3 BasicBlocks, widths (w, 2w, 4w)."""
    return _cifar_resnet(3, num_classes, in_chans, width)


@register_model
def resnet32(*, num_classes: int = 1000, in_chans: int = 3, width: int = 16) -> ResNet:
    """CIFAR ResNet-32: 3 stages x 5 BasicBlocks, widths (w, 2w, 4w)."""
    return _cifar_resnet(5, num_classes, in_chans, width)


@register_model
def resnet18_cifar(*, num_classes: int = 1000, in_chans: int = 3, width: int = 64) -> ResNet:
    """ResNet-18 for 32x32 inputs: 3x3 stem, no max-pool, [2, 2, 2, 2] BasicBlocks, w..8w."""
    _check_width(width)
    widths = (width, 2 * width, 4 * width, 8 * width)
    return ResNet(BasicBlock, [2, 2, 2, 2], widths, num_classes=num_classes, in_chans=in_chans,
                  stem="cifar")


@register_model
def resnet18(*, num_classes: int = 1000, in_chans: int = 3, width: int = 64) -> ResNet:
    """ImageNet ResNet-18 (torchvision layout, 11.7 M parameters with 1000 classes)."""
    _check_width(width)
    widths = (width, 2 * width, 4 * width, 8 * width)
    return ResNet(BasicBlock, [2, 2, 2, 2], widths, num_classes=num_classes, in_chans=in_chans)


@register_model
def resnet50(*, num_classes: int = 1000, in_chans: int = 3, width: int = 64) -> ResNet:
    """ImageNet ResNet-50 v1.5 (torchvision layout, 25.6 M parameters with 1000 classes)."""
    _check_width(width)
    widths = (width, 2 * width, 4 * width, 8 * width)
    return ResNet(Bottleneck, [3, 4, 6, 3], widths, num_classes=num_classes, in_chans=in_chans)
