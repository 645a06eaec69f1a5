"""Partially dynamic omni-dimensional dynamic convolution (ODConv, Li et al., ICLR 2022;
docs/method.md §2.1).

ODConv mixes K kernels with a kernel attention and scales the result along the three other
dimensions of the kernel: output filters, input channels and the k x k spatial positions::

    Theta_hat(x) = a_f(x) * a_c(x) * a_s(x) * sum_k a_k(x) W_k
    W(x)         = lam_d * M * Theta_hat(x) + lam_s * (1 - M) * W_s

The attentions are rank-one factors, so ``M * Theta_hat = a_f a_c a_s * sum_k a_k (M * W_k)``: the
mask folds into the kernels once per forward and the attentions are applied to the mixed kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from padnet.layers.pad_conv import PadConv2d
from padnet.layers.protocol import ThetaTerms
from padnet.layers.routing import ODAttention, ODConvRouter
from padnet.ops.conv import aggregate_weights

__all__ = ["ODConv2d", "attention_tensor"]


def attention_tensor(
    att: ODAttention, out_channels: int, in_channels: int, groups: int,
    kernel_size: tuple[int, int],
) -> Tensor:
    """ODConv's filter, input-channel and spatial attentions multiplied and broadcast to the
    kernel shape ``(B, C_out, C_in/g, kh, kw)``."""
    b, g = att.kernel.shape[0], groups
    c_out, c_in = out_channels, in_channels
    kh, kw = kernel_size
    # input-channel attention of group j belongs to output channels of group j
    chan = att.channel.view(b, g, 1, c_in // g).expand(b, g, c_out // g, c_in // g)
    chan = chan.reshape(b, c_out, c_in // g, 1, 1)
    return att.filter.view(b, c_out, 1, 1, 1) * chan * att.spatial.view(b, 1, 1, kh, kw)


class ODConv2d(PadConv2d):
    """Partially dynamic ODConv. Arguments as :class:`~padnet.layers.DynamicConv2d`; the router
    has one hidden layer of width ``max(in_channels // reduction, min_hidden)`` and up to four
    heads (no spatial head for 1x1 kernels, no filter head for depthwise layers).

    Execution paths: ``grouped`` and ``unfold`` (the spatial attention differs per sample, so the
    shared-kernel ``mixture`` path does not apply).
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
        reduction: float = 16,
        min_hidden: int = 16,
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
        self.router = ODConvRouter(
            in_channels, out_channels, self.kernel_size, num_kernels, groups=groups,
            reduction=reduction,
            min_hidden=min_hidden, temperature=temperature, device=device, dtype=dtype,
        )

    @classmethod
    def supported_paths(cls) -> tuple[str, ...]:
        return ("auto", "grouped", "unfold")

    def resolve_path(self, batch: int, out_area: int = 1) -> str:
        return "grouped" if self._path == "auto" else self._path

    def route(self, x: Tensor) -> ODAttention:
        return self.router(x)

    def check_routing(self, routing: ODAttention, batch: int) -> ODAttention:
        kh, kw = self.kernel_size
        expected = {
            "kernel": (batch, self.num_kernels),
            "channel": (batch, self.in_channels),
            "filter": (batch, self.out_channels),
            "spatial": (batch, kh * kw),
        }
        if not isinstance(routing, tuple) or len(routing) != 4:
            raise ValueError(
                "routing_weights must be an ODAttention(kernel, channel, filter, spatial) with "
                f"shapes {expected}, got {type(routing).__name__}"
            )
        routing = ODAttention(*routing)
        for name, shape in expected.items():
            got = getattr(routing, name)
            if not isinstance(got, Tensor) or tuple(got.shape) != shape:
                raise ValueError(f"routing_weights.{name} must have shape {shape}, got "
                                 f"{tuple(got.shape) if isinstance(got, Tensor) else got!r}")
        return routing

    def theta_hat(self, routing: ODAttention) -> Tensor:
        """Fully dynamic kernels ``(B, C_out, C_in/g, kh, kw)`` before the mode mask."""
        return aggregate_weights(routing.kernel, self.weight) * self.attention_tensor(routing)

    def theta_terms(self, routing: ODAttention) -> list[ThetaTerms]:
        """The attentions scale each position differently: ``Theta_hat`` per sample."""
        return [ThetaTerms(theta=self.theta_hat(routing))]

    def kernel_routing(self, routing: ODAttention) -> Tensor:
        return routing.kernel

    def attention_tensor(self, att: ODAttention) -> Tensor:
        """Product ``a_f * a_c * a_s`` broadcast to ``(B, C_out, C_in/g, kh, kw)``."""
        return attention_tensor(att, self.out_channels, self.in_channels, self.groups,
                                self.kernel_size)

    def sample_weights(self, routing: ODAttention) -> Tensor:
        return self.mode_mask.combine(self.theta_hat(routing), self.static_weight)

    @torch.no_grad()
    def init_from_dense(
        self, weight: Tensor, bias: Tensor | None, *, copy_noise_std: float
    ) -> None:
        """Function-preserving start from a dense kernel (see :meth:`from_conv`): the attention
        heads are zeroed (kernel attention ``1/K``, each of the n sigmoid attentions 0.5; n = 3,
        less for 1x1 or depthwise layers) and the kernel copies scaled by ``2^n``; biases, which
        skip the attentions, are copied as they are."""
        for fc in self.router.output_layers():
            nn.init.zeros_(fc.weight)
            nn.init.zeros_(fc.bias)
        scale = float(2 ** self.router.sigmoid_heads())
        self.load_dense(weight, bias, scale=scale, bias_scale=1.0, copy_noise_std=copy_noise_std)
