"""``PadConv2d``: the base of the partially dynamic convolutions (DY-Conv, CondConv, ODConv).

It holds the geometry of ``nn.Conv2d``, K kernels ``W_k`` ``(K, C_out, C_in/g, kh, kw)``, one static
kernel ``W_s``, per-kernel biases and a :class:`~padnet.layers.pad.ModeMask` ``mode_mask``, and
runs the convolution on one of the execution paths of :mod:`padnet.ops.conv` (docs/method.md §2.1):

* ``grouped``: one per-sample kernel per sample, one grouped convolution;
* ``mixture``: the K (+1 static) shared kernels as one ordinary convolution, outputs mixed per
  sample -- no per-sample kernel at all;
* ``unfold``: im2col and one batched matrix product.

Padding is what ``nn.Conv2d`` takes (an int, a pair, ``'same'``, ``'valid'``, any
``padding_mode``) or ``'dynamic_same'``: TensorFlow's "SAME" padding for any stride, computed from
each input's size (:func:`dynamic_same_pad4`), the behaviour of convolutions that pad in their own
forward (a timm-style ``Conv2dSame``).

Subclasses provide the routing (:meth:`PadConv2d.route`) and, where the mixing is not a plain
weighted sum of kernels, their own per-sample kernel (:meth:`PadConv2d.sample_weights`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from padnet.layers.pad import ModeMask
from padnet.layers.protocol import PadLayer, PadWeight, ThetaTerms
from padnet.ops.conv import (
    PADDING_MODES,
    PATHS,
    aggregate_weights,
    choose_path,
    conv2d_per_sample,
    conv2d_unfold,
    output_area,
    pad_input,
    resolve_padding,
)
from padnet.utils.checks import check_choice, check_int

__all__ = ["DYNAMIC_SAME", "INITS", "PadConv2d", "dynamic_same_pad4"]

#: How a converted layer starts: a copy of the dense weights (function-preserving), the copy plus
#: relative noise on the dynamic copies, or a fresh random initialisation.
INITS = ("copy", "copy_noise", "kaiming")

#: The padding value whose amounts follow each input's size (TensorFlow's "SAME", any stride).
DYNAMIC_SAME = "dynamic_same"


def dynamic_same_pad4(
    height: int, width: int, kernel_size: tuple[int, int], stride: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` zero padding of TensorFlow's "SAME" convolution of a
    ``height x width`` input: ``ceil(n / s)`` outputs along each axis, padding
    ``max((ceil(n / s) - 1) s + d (k - 1) + 1 - n, 0)`` split evenly, the odd pixel at the end."""
    totals = []
    for n, k, s, d in zip((height, width), kernel_size, stride, dilation, strict=True):
        outputs = -(-n // s)  # ceil(n / s)
        totals.append(max((outputs - 1) * s + d * (k - 1) + 1 - n, 0))
    th, tw = totals
    return (tw // 2, tw - tw // 2, th // 2, th - th // 2)


def _positive_pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = _pair(value)
    if len(pair) != 2 or any(not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair


class PadConv2d(PadLayer):
    """Base of the PAD convolutions: geometry, weights, mode mask and execution paths.

    Subclasses provide routing (:meth:`route`) and, where the mixing is not a plain weighted sum
    of kernels, their own per-sample weight (:meth:`sample_weights`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        num_kernels: int = 4,
        dynamic_ratio: float = 1.0,
        scale_mode: str = "both",
        path: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int(num_kernels, "num_kernels", 1)
        check_int(groups, "groups", 1)
        for name, c in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(c, int) or c < 1 or c % groups:
                raise ValueError(
                    f"{name} must be a positive multiple of groups={groups}, got {c!r}"
                )
        check_choice(padding_mode, "padding_mode", PADDING_MODES)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _positive_pair(kernel_size, "kernel_size")
        self.stride = _positive_pair(stride, "stride")
        self.dilation = _positive_pair(dilation, "dilation")
        self.padding = padding  # validated by the property setter
        self.padding_mode = padding_mode
        self.num_kernels = num_kernels
        self.path = path  # validated by the property setter

        kw = {"device": device, "dtype": dtype}
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        # (K, C_out, C_in/g, kh, kw)
        self.weight = nn.Parameter(torch.empty(num_kernels, *shape, **kw))
        self.static_weight = nn.Parameter(torch.empty(shape, **kw))
        self.bias = nn.Parameter(torch.empty(num_kernels, out_channels, **kw)) if bias else None
        self.mode_mask = ModeMask(
            shape, num_kernels, dynamic_ratio=dynamic_ratio, scale_mode=scale_mode, device=device
        )
        self.reset_parameters()

    # ---- parameters ----------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Initialise every kernel, the static kernel and the biases like ``nn.Conv2d``."""
        for w in [*self.weight, self.static_weight]:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.static_weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def load_dense(
        self,
        weight: Tensor,
        bias: Tensor | None,
        *,
        scale: float = 1.0,
        bias_scale: float | None = None,
        copy_noise_std: float = 0.0,
    ) -> None:
        """Copy a dense kernel into every dynamic kernel (times ``scale``) and the static one.

        Biases are copied times ``bias_scale`` (default ``scale``). ``copy_noise_std`` adds
        Gaussian noise of that standard deviation, relative to the standard deviation of the
        scaled copy, to each dynamic copy (diversifies the copies).
        """
        self.static_weight.copy_(weight)
        copy = weight * scale
        self.weight.copy_(copy.expand_as(self.weight))
        if copy_noise_std > 0:
            self.weight.add_(torch.randn_like(self.weight) * (copy_noise_std * copy.std()))
        if self.bias is not None and bias is not None:
            self.bias.copy_((bias * (scale if bias_scale is None else bias_scale)).expand_as(
                self.bias))

    @property
    def padding(self) -> str | tuple[int, int]:
        """Padding: a pair, ``'same'``, ``'valid'`` or ``'dynamic_same'`` (module docstring)."""
        return self._padding

    @padding.setter
    def padding(self, value: str | int | tuple[int, int]) -> None:
        if value == DYNAMIC_SAME:
            self._padding, self._pad4 = value, None  # resolved per input: pad4_for
            return
        if isinstance(value, str) and value not in ("same", "valid"):
            raise ValueError(f"padding must be 'same', 'valid', {DYNAMIC_SAME!r}, an int or a "
                             f"pair, got {value!r}")
        padding = value if isinstance(value, str) else _pair(value)
        self._pad4 = resolve_padding(padding, self.kernel_size, self.stride, self.dilation)
        self._padding = padding

    def pad4_for(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Explicit ``(left, right, top, bottom)`` padding of a ``height x width`` input."""
        if self._pad4 is not None:
            return self._pad4
        return dynamic_same_pad4(height, width, self.kernel_size, self.stride, self.dilation)

    @property
    def path(self) -> str:
        """Execution path: ``auto``, ``grouped``, ``mixture`` or ``unfold``."""
        return self._path

    @path.setter
    def path(self, value: str) -> None:
        if value not in self.supported_paths():
            raise ValueError(f"path must be one of {self.supported_paths()}, got {value!r}")
        self._path = value

    @classmethod
    def supported_paths(cls) -> tuple[str, ...]:
        return PATHS

    @property
    def dynamic_ratio(self) -> float:
        """Fraction of dynamic positions of this layer's kernel."""
        return self.mode_mask.dynamic_ratio

    def pad_weights(self) -> list[PadWeight]:
        """The one PAD weight: kernels ``(K, C_out, C_in/g, kh, kw)`` and the static kernel."""
        return [PadWeight("", self.mode_mask, self.weight, self.static_weight)]

    def theta_terms(self, routing) -> list[ThetaTerms]:  # noqa: ANN001
        """``Theta_hat = routing @ W`` for plain kernel mixing (``routing (B, K)``)."""
        return [ThetaTerms(coeffs=self.kernel_routing(routing))]

    # ---- forward -------------------------------------------------------------------------
    def route(self, x: Tensor):  # noqa: ANN201 - subclass-specific routing type
        raise NotImplementedError

    def check_routing(self, routing, batch: int):  # noqa: ANN001, ANN201
        """Validate injected routing weights; returns them."""
        raise NotImplementedError

    def mix_bias(self, kernel_routing: Tensor) -> Tensor | None:
        """Per-sample bias ``(B, C_out)``: the routing-weighted sum of the per-kernel biases."""
        if self.bias is None:
            return None
        return kernel_routing.to(self.bias.dtype) @ self.bias

    def sample_weights(self, routing) -> Tensor:  # noqa: ANN001
        """Per-sample PAD kernels ``(B, C_out, C_in/g, kh, kw)``."""
        # mixing first and masking after costs B*N instead of K*N products when B < K
        return self.mode_mask.combine(aggregate_weights(routing, self.weight), self.static_weight)

    def kernel_routing(self, routing) -> Tensor:  # noqa: ANN001
        """The ``(B, K)`` kernel-mixing part of the routing."""
        return routing

    def output_area(self, height: int, width: int) -> int:
        """Number of output positions ``H' * W'`` for an input of ``height x width``."""
        return output_area(height, width, self.pad4_for(height, width), self.kernel_size,
                           self.stride, self.dilation)

    def resolve_path(self, batch: int, out_area: int = 1) -> str:
        """The execution path a batch of ``batch`` samples with ``out_area`` outputs runs on."""
        if self._path != "auto":
            return self._path
        return choose_path(batch, out_area, self.kernel_size, self.groups, self.in_channels)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__} expects input of shape (B, {self.in_channels}, H, W), "
                f"got {got}"
            )

    def forward(self, x: Tensor, routing_weights=None) -> Tensor:  # noqa: ANN001
        """``x (B, C_in, H, W)`` -> ``(B, C_out, H', W')``.

        ``routing_weights`` replaces the layer's own router (e.g. one router driving several
        layers, or a pinned routing in tests).
        """
        self._check_input(x)
        routing = self.route(x) if routing_weights is None else self.check_routing(
            routing_weights, x.shape[0]
        )
        bias = self.mix_bias(self.kernel_routing(routing))
        self.emit_routing(routing)
        xp, conv_pad = pad_input(x, self.pad4_for(*x.shape[-2:]), self.padding_mode)
        geometry = (self.stride, conv_pad, self.dilation, self.groups)
        state = self.mode_mask.state()
        if state == "static":  # no dynamic position: one ordinary convolution
            y = F.conv2d(xp, self.mode_mask.static(self.static_weight), None, *geometry)
            return y if bias is None else y + bias[:, :, None, None]
        path = self.resolve_path(x.shape[0], self.output_area(*x.shape[-2:]))
        if path == "mixture":
            return self.forward_mixture(xp, routing, bias, geometry,
                                        with_static=self.mode_mask.has_static())
        weight = self.sample_weights(routing)
        run = conv2d_unfold if path == "unfold" else conv2d_per_sample
        return run(xp, weight, bias, *geometry)

    def forward_mixture(self, xp, routing, bias, geometry, *, with_static: bool) -> Tensor:  # noqa: ANN001
        raise NotImplementedError

    def init_from_dense(
        self, weight: Tensor, bias: Tensor | None, *, copy_noise_std: float
    ) -> None:
        """Start from a dense kernel so that the layer computes the same function."""
        raise NotImplementedError

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        num_kernels: int = 4,
        init: str = "copy",
        copy_noise_std: float = 0.01,
        **kwargs,
    ) -> PadConv2d:
        """A PAD layer with the geometry, device, dtype and mode of a trained ``nn.Conv2d``.

        ``init='copy'`` starts every dynamic kernel and the static kernel from the trained one,
        scaled where the routing requires it (:meth:`init_from_dense`), so the output is
        unchanged for any mask; ``'copy_noise'`` adds noise of relative std ``copy_noise_std``
        to the copies; ``'kaiming'`` initialises everything afresh. ``kwargs`` go to the
        constructor.
        """
        check_choice(init, "init", INITS)
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
            num_kernels=num_kernels, device=conv.weight.device, dtype=conv.weight.dtype,
            **kwargs,
        )
        if init != "kaiming":
            noise = copy_noise_std if init == "copy_noise" else 0.0
            layer.init_from_dense(conv.weight, conv.bias, copy_noise_std=noise)
        return layer.train(conv.training)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, num_kernels={self.num_kernels}"
        )
        if self.padding not in ((0, 0), "valid"):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", path={self._path!r}"
