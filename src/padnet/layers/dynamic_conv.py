"""Partially dynamic DY-Conv and CondConv (docs/method.md §2, §2.1).

``DynamicConv2d`` holds K kernels ``W_k``, one static kernel ``W_s`` and a mode mask. For a sample
x with routing weights ``pi(x)`` the kernel is::

    W(x) = lam_d * M * sum_k pi_k(x) W_k + lam_s * (1 - M) * W_s,   b(x) = sum_k pi_k(x) b_k

With ``dynamic_ratio=1`` (the default) this is the fully dynamic layer (times ``lam_d``), with 0 a
static convolution with weight ``lam_s * W_s``. Routing is ``softmax`` (DY-Conv, with temperature)
or ``sigmoid`` (CondConv), and can be injected through ``forward(x, routing_weights)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from padnet.layers.pad_conv import PadConv2d
from padnet.layers.routing import ConvRouter
from padnet.ops.conv import conv2d_mixture

__all__ = ["DynamicConv2d"]


class DynamicConv2d(PadConv2d):
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
        kernels = self.mode_mask.dynamic(self.weight)  # (K, C_out, C_in/g, kh, kw)
        if with_static:  # the static kernel joins as one more kernel with routing weight 1
            kernels = torch.cat([kernels, self.mode_mask.static(self.static_weight)[None]])
            routing = torch.cat([routing, routing.new_ones(routing.shape[0], 1)], dim=1)
        return conv2d_mixture(xp, kernels, routing, bias, *geometry)

    @torch.no_grad()
    def init_from_dense(
        self, weight: Tensor, bias: Tensor | None, *, copy_noise_std: float
    ) -> None:
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
        self.load_dense(weight, bias, scale=scale, copy_noise_std=copy_noise_std)
