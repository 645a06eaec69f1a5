"""Partially dynamic convolution: DY-Conv and CondConv with a PAD mode mask.

``DynamicConv2d`` holds K kernels ``W_k``, one static kernel ``W_s`` and a :class:`ModeMask`.
For a sample x with routing weights ``pi(x)`` the kernel is (PADNET.md §2, §2a)::

    W(x) = lam_d * M * sum_k pi_k(x) W_k + lam_s * (1 - M) * W_s,   b(x) = sum_k pi_k(x) b_k

With ``dynamic_ratio=1`` (the default) this is the fully dynamic layer (times ``lam_d``), with 0 a
static convolution with weight ``lam_s * W_s``. Routing is ``softmax`` (DY-Conv, with temperature)
or ``sigmoid`` (CondConv), and can be injected through ``forward(x, routing_weights)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from padnet.layers.pad import ModeMask
from padnet.layers.routing import ConvRouter
from padnet.ops.conv import (
    PADDING_MODES,
    PATHS,
    aggregate_weights,
    choose_path,
    conv2d_mixture,
    conv2d_per_sample,
    conv2d_unfold,
    pad_input,
    resolve_padding,
)

__all__ = ["DynamicConv2d", "PerSampleConv2d"]

INITS = ("copy", "copy_noise", "kaiming")


def _positive_pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = _pair(value)
    if len(pair) != 2 or any(not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair


class PerSampleConv2d(nn.Module):
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
        if not isinstance(num_kernels, int) or num_kernels < 1:
            raise ValueError(f"num_kernels must be an int >= 1, got {num_kernels!r}")
        if not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be an int >= 1, got {groups!r}")
        for name, c in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(c, int) or c < 1 or c % groups:
                raise ValueError(
                    f"{name} must be a positive multiple of groups={groups}, got {c!r}"
                )
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _positive_pair(kernel_size, "kernel_size")
        self.stride = _positive_pair(stride, "stride")
        self.dilation = _positive_pair(dilation, "dilation")
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.padding_mode = padding_mode
        self._pad4 = resolve_padding(self.padding, self.kernel_size, self.stride, self.dilation)
        self.num_kernels = num_kernels
        self.path = path  # validated by the property setter

        kw = {"device": device, "dtype": dtype}
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        # (K, C_out, C_in/g, kh, kw)
        self.weight = nn.Parameter(torch.empty(num_kernels, *shape, **kw))
        self.static_weight = nn.Parameter(torch.empty(shape, **kw))
        self.bias = nn.Parameter(torch.empty(num_kernels, out_channels, **kw)) if bias else None
        self.pad = ModeMask(
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
        noise_std: float = 0.0,
    ) -> None:
        """Copy a dense kernel into every dynamic kernel (times ``scale``) and the static one.

        Biases are copied times ``bias_scale`` (default ``scale``). ``noise_std`` adds Gaussian
        noise of that standard deviation, relative to the standard deviation of ``weight``, to
        each dynamic copy (diversifies the copies).
        """
        self.static_weight.copy_(weight)
        self.weight.copy_((weight * scale).expand_as(self.weight))
        if noise_std > 0:
            self.weight.add_(torch.randn_like(self.weight) * (noise_std * weight.std()))
        if self.bias is not None and bias is not None:
            self.bias.copy_((bias * (scale if bias_scale is None else bias_scale)).expand_as(
                self.bias))

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
        return self.pad.dynamic_ratio

    def pad_weights(self) -> list[tuple[ModeMask, Tensor, Tensor]]:
        """PAD weights for partitioning: ``[(pad, weight (K, *shape), static_weight (shape))]``."""
        return [(self.pad, self.weight, self.static_weight)]

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
        return self.pad.combine(aggregate_weights(routing, self.weight), self.static_weight)

    def kernel_routing(self, routing) -> Tensor:  # noqa: ANN001
        """The ``(B, K)`` kernel-mixing part of the routing."""
        return routing

    def output_area(self, height: int, width: int) -> int:
        """Number of output positions ``H' * W'`` for an input of ``height x width``."""
        left, right, top, bottom = self._pad4
        size = [
            (n + p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip((height, width), (top + bottom, left + right),
                                     self.dilation, self.kernel_size, self.stride, strict=True)
        ]
        return max(size[0], 0) * max(size[1], 0)

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
        if self.pad.observing:
            self.observe(routing)
        xp, conv_pad = pad_input(x, self._pad4, self.padding_mode)
        geometry = (self.stride, conv_pad, self.dilation, self.groups)
        state = self.pad.state()
        if state == "static":  # no dynamic position: one ordinary convolution
            y = F.conv2d(xp, self.pad.static(self.static_weight), None, *geometry)
            return y if bias is None else y + bias[:, :, None, None]
        path = self.resolve_path(x.shape[0], self.output_area(*x.shape[-2:]))
        if path == "mixture":
            return self.forward_mixture(xp, routing, bias, geometry,
                                        with_static=self.pad.has_static())
        weight = self.sample_weights(routing)
        run = conv2d_unfold if path == "unfold" else conv2d_per_sample
        return run(xp, weight, bias, *geometry)

    def forward_mixture(self, xp, routing, bias, geometry, *, with_static: bool) -> Tensor:  # noqa: ANN001
        raise NotImplementedError

    def init_from_dense(self, weight: Tensor, bias: Tensor | None, *, noise_std: float) -> None:
        """Start from a dense kernel so that the layer computes the same function."""
        raise NotImplementedError

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        num_kernels: int = 4,
        init: str = "copy",
        noise_std: float = 0.01,
        **kwargs,
    ) -> PerSampleConv2d:
        """A PAD layer with the geometry, device, dtype and mode of a trained ``nn.Conv2d``.

        ``init='copy'`` starts every dynamic kernel and the static kernel from the trained one,
        scaled where the routing requires it (:meth:`init_from_dense`), so the output is
        unchanged for any mask; ``'copy_noise'`` adds noise of relative std ``noise_std`` to the
        copies; ``'kaiming'`` initialises everything afresh. ``kwargs`` go to the constructor.
        """
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
            num_kernels=num_kernels, device=conv.weight.device, dtype=conv.weight.dtype,
            **kwargs,
        )
        if init != "kaiming":
            noise = noise_std if init == "copy_noise" else 0.0
            layer.init_from_dense(conv.weight, conv.bias, noise_std=noise)
        return layer.train(conv.training)

    def observe(self, routing) -> None:  # noqa: ANN001
        """Report this batch's fully dynamic kernels to the mode mask (see ModeMask.observe)."""
        self.pad.observe_mixture(routing, self.weight)

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


class DynamicConv2d(PerSampleConv2d):
    """Partially dynamic DY-Conv (``routing='softmax'``) or CondConv (``routing='sigmoid'``).

    Takes ``nn.Conv2d``'s arguments plus ``num_kernels`` (K), ``routing``, router settings
    (``reduction``, ``min_hidden``, ``temperature``), ``dynamic_ratio`` and ``scale_mode`` of the
    mode mask, and the execution ``path`` (``auto``, ``grouped``, ``mixture``, ``unfold``).
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
        routing: str = "softmax",
        reduction: float = 4,
        min_hidden: int = 4,
        temperature: float = 1.0,
        dynamic_ratio: float = 1.0,
        scale_mode: str = "both",
        path: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, num_kernels=num_kernels, dynamic_ratio=dynamic_ratio,
            scale_mode=scale_mode, path=path, device=device, dtype=dtype,
        )
        self.router = ConvRouter(
            in_channels, num_kernels, activation=routing, reduction=reduction,
            min_hidden=min_hidden, temperature=temperature, device=device, dtype=dtype,
        )

    @property
    def routing(self) -> str:
        return self.router.activation

    def route(self, x: Tensor) -> Tensor:
        return self.router(x)

    def check_routing(self, routing: Tensor, batch: int) -> Tensor:
        if not isinstance(routing, Tensor) or tuple(routing.shape) != (batch, self.num_kernels):
            got = tuple(routing.shape) if isinstance(routing, Tensor) else type(routing).__name__
            raise ValueError(
                f"routing_weights must have shape (B, num_kernels) = ({batch}, "
                f"{self.num_kernels}), got {got}"
            )
        return routing

    def forward_mixture(self, xp, routing, bias, geometry, *, with_static: bool) -> Tensor:  # noqa: ANN001
        kernels = self.pad.dynamic(self.weight)  # (K, C_out, C_in/g, kh, kw)
        if with_static:  # the static kernel joins as one more kernel with routing weight 1
            kernels = torch.cat([kernels, self.pad.static(self.static_weight)[None]])
            routing = torch.cat([routing, routing.new_ones(routing.shape[0], 1)], dim=1)
        return conv2d_mixture(xp, kernels, routing, bias, *geometry)

    @torch.no_grad()
    def init_from_dense(self, weight: Tensor, bias: Tensor | None, *, noise_std: float) -> None:
        """Function-preserving start from a dense kernel (see :meth:`from_conv`).

        Sigmoid routing does not sum to one, so the router's output layer is zeroed (every
        routing weight 0.5) and the copies are scaled by ``2 / K``.
        """
        scale = 1.0
        if self.routing == "sigmoid":
            for fc in self.router.output_layers():
                nn.init.zeros_(fc.weight)
                nn.init.zeros_(fc.bias)
            scale = 2.0 / self.num_kernels
        self.load_dense(weight, bias, scale=scale, noise_std=noise_std)
