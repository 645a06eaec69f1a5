"""Routers of the dynamic convolution family and their temperature.

* DY-Conv (Chen et al., CVPR 2020): ``softmax(FC2(ReLU(FC1(GAP(x)))) / tau)``.
* CondConv (Yang et al., NeurIPS 2019): ``sigmoid(FC(GAP(x)))``.
* ODConv (Li et al., ICLR 2022): one hidden FC, then four heads -- kernel (softmax), input channel,
  output filter and spatial (sigmoid), all divided by the temperature.

The temperature changes the function, so it is state that travels with the weights: a 0-dim
buffer ``temperature`` saved in the state dict. :func:`set_temperature` changes it in every router
of a model and :func:`temperature_schedule` gives the linear annealing of DY-Conv.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from padnet.utils.checks import check_choice, check_int, check_number

__all__ = [
    "ROUTINGS",
    "ConvRouter",
    "ODAttention",
    "ODConvRouter",
    "hidden_size",
    "set_temperature",
    "temperature_schedule",
]

ROUTINGS = ("softmax", "sigmoid")


def hidden_size(in_channels: int, reduction: float, min_hidden: int) -> int:
    """Width of a router's hidden layer: ``max(in_channels // reduction, min_hidden)``."""
    check_number(reduction, "reduction", minimum=0, strict=True)
    check_int(min_hidden, "min_hidden", 1)
    return max(int(in_channels // reduction), int(min_hidden))


def _check_temperature(value: float) -> float:
    return check_number(value, "temperature", minimum=0, strict=True)


class ConvRouter(nn.Module):
    """Per-sample routing weights ``(B, K)`` from global average pooling of the input.

    Args:
        in_channels: channels of the input feature map.
        num_kernels: K, the number of kernels to mix.
        activation: ``'softmax'`` (DY-Conv: two FC layers, temperature) or ``'sigmoid'``
            (CondConv: one FC layer).
        reduction, min_hidden: hidden width ``max(in_channels // reduction, min_hidden)``
            (softmax routing only).
        temperature: softmax temperature; ignored by sigmoid routing.
    """

    def __init__(
        self,
        in_channels: int,
        num_kernels: int,
        *,
        activation: str = "softmax",
        reduction: float = 4,
        min_hidden: int = 4,
        temperature: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_choice(activation, "routing", ROUTINGS)
        kw = {"device": device, "dtype": dtype}
        self.activation = activation
        self.register_buffer("temperature", torch.tensor(_check_temperature(temperature), **kw))
        if activation == "softmax":
            hidden = hidden_size(in_channels, reduction, min_hidden)
            self.fc1: nn.Module = nn.Linear(in_channels, hidden, **kw)
            self.fc2 = nn.Linear(hidden, num_kernels, **kw)
        else:
            self.fc = nn.Linear(in_channels, num_kernels, **kw)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, C, H, W)`` -> routing weights ``(B, K)``."""
        pooled = x.mean(dim=(2, 3))  # (B, C)
        if self.activation == "sigmoid":
            return torch.sigmoid(self.fc(pooled))
        logits = self.fc2(F.relu(self.fc1(pooled)))
        return torch.softmax(logits / self.temperature, dim=-1)

    def output_layers(self) -> list[nn.Linear]:
        """The layers that produce the logits (zeroed to make sigmoid routing constant)."""
        return [self.fc2] if self.activation == "softmax" else [self.fc]

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, temperature={float(self.temperature):g}"


class ODAttention(NamedTuple):
    """The four attentions of ODConv for a batch of B samples."""

    kernel: Tensor  # (B, K), softmax over kernels
    channel: Tensor  # (B, C_in), sigmoid
    filter: Tensor  # (B, C_out), sigmoid
    spatial: Tensor  # (B, kh * kw), sigmoid


class ODConvRouter(nn.Module):
    """ODConv's multi-dimensional attention: GAP -> FC -> ReLU -> up to four heads.

    As in the original, a 1x1 kernel has no spatial attention and a depthwise layer
    (``groups == in_channels == out_channels``) no filter attention: those attentions are 1.
    ODConv puts a BatchNorm after the hidden FC; it is left out here because it fails on a batch
    of one sample in training and couples samples, which per-sample routing should not do.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        num_kernels: int,
        *,
        groups: int = 1,
        reduction: float = 16,
        min_hidden: int = 16,
        temperature: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        hidden = hidden_size(in_channels, reduction, min_hidden)
        self.out_channels, self.spatial_size = out_channels, kernel_size[0] * kernel_size[1]
        self.register_buffer("temperature", torch.tensor(_check_temperature(temperature), **kw))
        self.fc = nn.Linear(in_channels, hidden, bias=False, **kw)
        self.kernel_fc = nn.Linear(hidden, num_kernels, **kw)
        self.channel_fc = nn.Linear(hidden, in_channels, **kw)
        depthwise = groups == in_channels == out_channels and groups > 1
        self.filter_fc = None if depthwise else nn.Linear(hidden, out_channels, **kw)
        pointwise = self.spatial_size == 1
        self.spatial_fc = None if pointwise else nn.Linear(hidden, self.spatial_size, **kw)

    def forward(self, x: Tensor) -> ODAttention:
        """``x (B, C_in, H, W)`` -> :class:`ODAttention`."""
        h = F.relu(self.fc(x.mean(dim=(2, 3))))  # (B, hidden)
        t = self.temperature
        ones = h.new_ones(h.shape[0], 1)
        return ODAttention(
            kernel=torch.softmax(self.kernel_fc(h) / t, dim=-1),
            channel=torch.sigmoid(self.channel_fc(h) / t),
            filter=ones.expand(-1, self.out_channels) if self.filter_fc is None
            else torch.sigmoid(self.filter_fc(h) / t),
            spatial=ones.expand(-1, self.spatial_size) if self.spatial_fc is None
            else torch.sigmoid(self.spatial_fc(h) / t),
        )

    def output_layers(self) -> list[nn.Linear]:
        """The heads (zeroed to make every attention constant at conversion)."""
        return [fc for fc in (self.kernel_fc, self.channel_fc, self.filter_fc, self.spatial_fc)
                if fc is not None]

    def sigmoid_heads(self) -> int:
        """How many sigmoid attentions multiply the kernel (each 0.5 when zeroed)."""
        return 1 + (self.filter_fc is not None) + (self.spatial_fc is not None)

    def extra_repr(self) -> str:
        return f"temperature={float(self.temperature):g}"


def set_temperature(model: nn.Module, temperature: float) -> int:
    """Set the temperature of every router in ``model``; returns the number of routers."""
    t = _check_temperature(temperature)
    count = 0
    for m in model.modules():
        if isinstance(m, (ConvRouter, ODConvRouter)):
            m.temperature.fill_(t)
            count += 1
    return count


def temperature_schedule(
    epoch: float, *, start: float = 30.0, end: float = 1.0, anneal_epochs: float = 10.0
) -> float:
    """Linear annealing from ``start`` to ``end`` over ``anneal_epochs``, then held at ``end``.

    ``epoch`` may be fractional (annealing per step). DY-Conv uses 30 -> 1 over 10 epochs.
    """
    if anneal_epochs <= 0 or epoch >= anneal_epochs:
        return float(end)
    frac = max(float(epoch), 0.0) / anneal_epochs
    return float(start + (end - start) * frac)
