"""Slow, obvious reference implementations the fast layers are tested against."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from padnet.layers import DynamicConv2d, ODConv2d
from padnet.layers.routing import ODAttention


def plain_conv_like(layer) -> nn.Conv2d:  # noqa: ANN001
    """An ``nn.Conv2d`` with the geometry of a dynamic layer (its weights are ignored)."""
    return nn.Conv2d(
        layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
        layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode,
    ).to(layer.weight.dtype)


def mixed_kernel(layer, routing, b: int) -> Tensor:  # noqa: ANN001
    """``Theta_hat`` of sample b: an explicit loop over the K kernels (and ODConv attentions)."""
    kern = routing.kernel if isinstance(routing, ODAttention) else routing
    theta = sum(kern[b, k] * layer.weight[k] for k in range(layer.num_kernels))
    if isinstance(layer, ODConv2d):
        c_out, cpg = layer.out_channels, layer.in_channels // layer.groups
        group_of = torch.arange(c_out) // (c_out // layer.groups)
        chan = torch.stack([routing.channel[b, g * cpg:(g + 1) * cpg] for g in group_of.tolist()])
        theta = (theta * routing.filter[b].view(-1, 1, 1, 1) * chan[:, :, None, None]
                 * routing.spatial[b].view(1, 1, *layer.kernel_size))
    return theta


def per_sample_conv(layer, x: Tensor, routing, *, fully_dynamic: bool = False) -> Tensor:  # noqa: ANN001
    """Loop over samples; each runs an ``nn.Conv2d`` with the kernel built from the formula

    ``W = lam_d M * Theta_hat + lam_s (1 - M) * W_s`` (or ``lam_d * Theta_hat`` when
    ``fully_dynamic``: no mask at all), bias ``sum_k pi_k b_k``.
    """
    conv = plain_conv_like(layer)
    lam_d, lam_s = layer.mode_mask.scales()
    m = layer.mode_mask.mask.to(x.dtype)
    kern = routing.kernel if isinstance(routing, ODAttention) else routing
    outs = []
    for b in range(x.shape[0]):
        theta = mixed_kernel(layer, routing, b)
        if fully_dynamic:
            w = lam_d * theta
        else:
            w = lam_d * m * theta + lam_s * (1 - m) * layer.static_weight
        params = {"weight": w}
        if layer.bias is not None:
            params["bias"] = sum(kern[b, k] * layer.bias[k] for k in range(layer.num_kernels))
        outs.append(functional_call(conv, params, (x[b:b + 1],)))
    return torch.cat(outs)


def make_routing(layer, batch: int, generator: torch.Generator, dtype=torch.float32):  # noqa: ANN001
    """Random routing of the right kind for ``layer`` (softmax / sigmoid / ODConv attentions)."""
    def rnd(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype)

    k = layer.num_kernels
    if isinstance(layer, ODConv2d):
        kh, kw = layer.kernel_size
        return ODAttention(
            torch.softmax(rnd(batch, k), -1), torch.sigmoid(rnd(batch, layer.in_channels)),
            torch.sigmoid(rnd(batch, layer.out_channels)), torch.sigmoid(rnd(batch, kh * kw)),
        )
    if isinstance(layer, DynamicConv2d) and layer.routing == "sigmoid":
        return torch.sigmoid(rnd(batch, k))
    return torch.softmax(rnd(batch, k), -1)
