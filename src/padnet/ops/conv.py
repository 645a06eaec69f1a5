"""Per-sample convolution: run a convolution whose weight differs for every sample of a batch.

Three execution paths, all stateless and differentiable:

* ``grouped`` -- the usual trick of dynamic convolution (DY-Conv, CondConv): fold the batch into
  the channel dimension and run one convolution with ``groups = groups * B``.
* ``mixture`` -- run the K shared kernels as one ordinary convolution with ``K * C_out`` outputs and
  mix the K outputs per sample. Valid because a convolution is linear in its weight; it needs no
  per-sample weight at all, so it exports to graph formats at any batch size.
* ``unfold`` -- im2col (``F.unfold``) and one batched matrix product with the per-sample weights.

Padding (including ``'same'`` and non-zero padding modes) is resolved once by :func:`pad_input`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PADDING_MODES",
    "PATHS",
    "aggregate_weights",
    "choose_path",
    "conv2d_mixture",
    "conv2d_per_sample",
    "conv2d_unfold",
    "output_area",
    "pad_input",
    "resolve_padding",
]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
PATHS = ("auto", "grouped", "mixture", "unfold")

Pair = tuple[int, int]


def resolve_padding(
    padding: str | int | tuple[int, int], kernel_size: Pair, stride: Pair, dilation: Pair
) -> tuple[int, int, int, int]:
    """Explicit ``(left, right, top, bottom)`` padding for ``padding`` as nn.Conv2d accepts it."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            raise ValueError(f"padding must be 'same', 'valid', an int or a pair, got {padding!r}")
        if stride != (1, 1):
            raise ValueError(f"padding='same' needs stride 1, got stride={stride}")
        total = [d * (k - 1) for d, k in zip(dilation, kernel_size, strict=True)]
        top, left = total[0] // 2, total[1] // 2
        return (left, total[1] - left, top, total[0] - top)
    ph, pw = (padding, padding) if isinstance(padding, int) else tuple(padding)
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return (pw, pw, ph, ph)


def output_area(height: int, width: int, pad4: tuple[int, int, int, int], kernel_size: Pair,
                stride: Pair, dilation: Pair) -> int:
    """Number of output positions ``H' * W'`` of a convolution of an unpadded ``height x width``
    input with explicit padding ``pad4 = (left, right, top, bottom)``."""
    left, right, top, bottom = pad4
    size = [(n + p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip((height, width), (top + bottom, left + right), dilation,
                                     kernel_size, stride, strict=True)]
    return max(size[0], 0) * max(size[1], 0)


def pad_input(x: Tensor, pad4: tuple[int, int, int, int], padding_mode: str) -> tuple[Tensor, Pair]:
    """Apply padding that a plain ``F.conv2d`` cannot; return the input and the conv padding.

    Symmetric zero padding is left to the convolution (cheapest); anything else is applied here.
    """
    left, right, top, bottom = pad4
    if padding_mode == "zeros":
        if left == right and top == bottom:
            return x, (top, left)
        return F.pad(x, pad4), (0, 0)
    if pad4 == (0, 0, 0, 0):
        return x, (0, 0)
    return F.pad(x, pad4, mode=padding_mode), (0, 0)


def aggregate_weights(routing: Tensor, kernels: Tensor, static: Tensor | None = None) -> Tensor:
    """Per-sample weight ``sum_k routing[b, k] * kernels[k] (+ static)``.

    Args:
        routing: ``(B, K)`` mixing coefficients.
        kernels: ``(K, *shape)`` kernels.
        static: optional ``shape`` tensor added to every sample's weight.
    Returns:
        ``(B, *shape)``.
    """
    k = kernels.shape[0]
    w = torch.mm(routing.to(kernels.dtype), kernels.reshape(k, -1))  # (B, prod(shape))
    w = w.view(routing.shape[0], *kernels.shape[1:])
    return w if static is None else w + static


def conv2d_per_sample(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: int,
) -> Tensor:
    """Grouped-convolution path. ``x (B, C_in, H, W)``, ``weight (B, C_out, C_in/g, kh, kw)``,
    ``bias (B, C_out)`` or None; returns ``(B, C_out, H', W')``."""
    b, c_in, h, w_ = x.shape
    c_out = weight.shape[1]
    out = F.conv2d(
        x.reshape(1, b * c_in, h, w_),  # (1, B*C_in, H, W)
        weight.reshape(b * c_out, *weight.shape[2:]),  # (B*C_out, C_in/g, kh, kw)
        None if bias is None else bias.reshape(b * c_out),
        stride,
        padding,
        dilation,
        groups * b,
    )
    return out.view(b, c_out, *out.shape[-2:])


def conv2d_mixture(
    x: Tensor,
    kernels: Tensor,
    routing: Tensor,
    bias: Tensor | None,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: int,
) -> Tensor:
    """Mixture path: ``y[b] = sum_k routing[b, k] * conv(x[b], kernels[k]) + bias[b]``.

    ``kernels (K, C_out, C_in/g, kh, kw)``, ``routing (B, K)``, ``bias (B, C_out)`` or None.
    One convolution computes all K outputs; kernels are interleaved per group so each group's
    output channels stay inside that group.
    """
    k, c_out = kernels.shape[:2]
    b = x.shape[0]
    cg = c_out // groups
    # (g, K, C_out/g, C_in/g, kh, kw)
    stacked = kernels.view(k, groups, cg, *kernels.shape[2:]).transpose(0, 1)
    stacked = stacked.reshape(groups * k * cg, *kernels.shape[2:])
    y = F.conv2d(x, stacked, None, stride, padding, dilation, groups)  # (B, g*K*C_out/g, H', W')
    hw = y.shape[-2:]
    y = y.view(b, groups, k, cg, hw[0] * hw[1])
    y = torch.einsum("bgkcl,bk->bgcl", y, routing.to(y.dtype)).reshape(b, c_out, *hw)
    return y if bias is None else y + bias[:, :, None, None]


def conv2d_unfold(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: int,
) -> Tensor:
    """im2col path: ``F.unfold`` then one batched matmul with the per-sample weights.

    Same arguments and result as :func:`conv2d_per_sample`.
    """
    b, c_in, h, w_ = x.shape
    c_out, cpg, kh, kw = weight.shape[1:]
    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w_ + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    cols = cols.view(b, groups, cpg * kh * kw, h_out * w_out)  # (B, g, C_in/g*kh*kw, L)
    wm = weight.reshape(b, groups, c_out // groups, cpg * kh * kw)  # (B, g, C_out/g, C_in/g*kh*kw)
    out = torch.matmul(wm, cols).view(b, c_out, h_out, w_out)
    return out if bias is None else out + bias[:, :, None, None]


def choose_path(
    batch: int, out_area: int, kernel_size: Pair, groups: int, in_channels: int
) -> str:
    """The execution path that ``path='auto'`` picks.

    Rule drawn from ``benchmarks/conv_layers.py`` (CPU): a convolution with ``groups = B`` is
    efficient while each sample has enough output positions; for large batches of small feature
    maps (``batch >= 32`` and ``batch >= 2 * out_area``) the mixture path's single dense
    convolution wins despite its ``K + 1`` times more products. Pointwise (1x1) and depthwise
    layers stay on the grouped path, which is a plain batched matmul for them.
    """
    pointwise = tuple(kernel_size) == (1, 1)
    depthwise = groups > 1 and groups == in_channels
    if batch >= 32 and batch >= 2 * out_area and not (pointwise or depthwise):
        return "mixture"
    return "grouped"
