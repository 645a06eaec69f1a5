"""``DeployedConv2d``: the deployment form of a PAD convolution (DY-Conv, CondConv, ODConv).

Made by :func:`padnet.export` from a trained layer (docs/method.md §5): the scale factors, the mask
and the router temperature are folded into constants, the weights are stored compactly
(:mod:`padnet.deploy.compact`), and the forward runs on dense kernels rebuilt once at load time.
How it runs depends on the mask:

* ``channel`` (whole output channels dynamic or static, groups 1 or depthwise): the static channels
  run as one ordinary convolution, only the dynamic channels pay the per-sample cost, and the two
  outputs are put back in channel order;
* ``element`` (any other mask): every sample's kernel is ``S + sum_k pi_k D_k``; with softmax
  routing (weights summing to 1) ``S`` is folded into each ``D_k`` once, so the layer runs exactly
  like a fully dynamic one;
* ``dynamic`` (no static position) and ``static`` (no dynamic position).

Execution paths (``path``): ``auto`` (batch 1: the sample's kernel and one plain convolution; else
the rule of :func:`padnet.ops.conv.choose_path`), ``grouped``, ``mixture`` (DY-Conv and CondConv:
no per-sample kernel, exports at any batch size), ``unfold`` (also batch-size free).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from padnet.deploy.compact import blank_mask_bits, pack, static_size, unpack
from padnet.layers.odconv import ODConv2d, attention_tensor
from padnet.layers.pad_conv import PadConv2d, dynamic_same_pad4
from padnet.layers.routing import ConvRouter, ODAttention, ODConvRouter
from padnet.ops.conv import (
    aggregate_weights,
    choose_path,
    conv2d_mixture,
    conv2d_per_sample,
    conv2d_unfold,
    output_area,
    pad_input,
)
from padnet.utils.checks import check_choice

__all__ = ["DEPLOY_PATHS", "DeployedConv2d"]

#: Execution paths of a deployed convolution.
DEPLOY_PATHS = ("auto", "grouped", "mixture", "unfold")


def _fold_temperature(router: nn.Module) -> nn.Module:
    """A copy of ``router`` whose logits layers absorb ``1 / temperature`` (then 1)."""
    router = copy.deepcopy(router)
    t = float(router.temperature)  # a 0-dim buffer
    uses_t = isinstance(router, ODConvRouter) or getattr(router, "activation", "") == "softmax"
    if uses_t and t != 1.0:
        with torch.no_grad():
            for fc in router.output_layers():
                fc.weight.div_(t)
                if fc.bias is not None:
                    fc.bias.div_(t)
    router.temperature.fill_(1.0)
    return router


def _router_from_spec(spec: dict[str, Any]) -> nn.Module:
    """An empty router of the recorded kind and sizes (weights come from the state dict)."""
    hidden = {"reduction": math.inf, "min_hidden": spec["router_hidden"]}
    if spec["routing"] == "odconv":
        return ODConvRouter(spec["in_channels"], spec["out_channels"],
                            tuple(spec["kernel_size"]), spec["num_kernels"],
                            groups=spec["groups"], **hidden)
    if spec["routing"] == "sigmoid":
        return ConvRouter(spec["in_channels"], spec["num_kernels"], activation="sigmoid")
    return ConvRouter(spec["in_channels"], spec["num_kernels"], activation="softmax", **hidden)


class DeployedConv2d(nn.Module):
    """Inference form of a :class:`~padnet.layers.PadConv2d` (module docstring).

    Build it with :meth:`from_layer`; ``DeployedConv2d(spec)`` makes an empty one of the recorded
    geometry for loading a saved state dict (``spec`` as in :attr:`spec`); its run-time kernels
    are derived once, when the state dict is loaded.
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.spec = dict(spec)
        s = self.spec
        self.in_channels, self.out_channels = s["in_channels"], s["out_channels"]
        self.kernel_size, self.stride = tuple(s["kernel_size"]), tuple(s["stride"])
        self.dilation, self.groups = tuple(s["dilation"]), s["groups"]
        # pad4 None: padding="dynamic_same", resolved per input size
        self.pad4 = None if s["pad4"] is None else tuple(s["pad4"])
        self.padding_mode = s["padding_mode"]
        self.num_kernels, self.routing = s["num_kernels"], s["routing"]
        self.path = s.get("path", "auto")
        self.router = _router_from_spec(s)
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        n, k, nd = math.prod(shape), self.num_kernels, s["num_dynamic"]
        self.weight_shape = shape
        self.register_buffer("mask_bits", blank_mask_bits(n, nd))
        self.register_buffer("dynamic_values", torch.zeros(k, nd))
        pruned = s.get("pruned", False)  # absent in files written before pruned weights
        self.register_buffer("static_values", torch.zeros(static_size(n, nd, pruned)))
        self.register_buffer("bias", torch.zeros(k, self.out_channels) if s["bias"] else None)
        self.mode: str | None = None  # set by rebuild(), from the stored form once it is filled
        self.register_load_state_dict_post_hook(lambda module, _: module.rebuild())

    @property
    def path(self) -> str:
        return self._path

    @path.setter
    def path(self, value: str) -> None:
        self._path = check_choice(value, "path", DEPLOY_PATHS)
        if value == "mixture" and getattr(self, "routing", "") == "odconv":
            raise ValueError("path 'mixture' does not apply to ODConv (per-sample spatial "
                             "attention); use 'grouped' or 'unfold'")

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_layer(cls, layer: PadConv2d, *, path: str = "auto") -> DeployedConv2d:
        """Fold a trained PAD convolution (its current mask, scale factors, temperature)."""
        mm = layer.mode_mask
        lam_d, lam_s = (float(v.detach()) for v in mm.scales())
        mask = mm.mask.to(layer.weight.device)
        pruned = mm.pruned
        stored = pack(layer.weight * lam_d * mask, layer.static_weight * lam_s * ~mask, mask,
                      pruned=pruned)
        odconv = isinstance(layer, ODConv2d)
        router = _fold_temperature(layer.router)
        hidden = router.fc.out_features if odconv else (
            router.fc1.out_features if router.activation == "softmax" else None)
        spec = {"in_channels": layer.in_channels, "out_channels": layer.out_channels,
                "kernel_size": list(layer.kernel_size), "stride": list(layer.stride),
                "dilation": list(layer.dilation), "groups": layer.groups,
                "pad4": None if layer._pad4 is None else list(layer._pad4),
                "padding_mode": layer.padding_mode,
                "num_kernels": layer.num_kernels, "bias": layer.bias is not None,
                "routing": "odconv" if odconv else layer.router.activation,
                "router_hidden": hidden, "num_dynamic": int(mask.sum()), "path": path,
                "pruned": pruned}
        out = cls(spec).to(device=layer.weight.device, dtype=layer.weight.dtype)
        out.router.load_state_dict(router.state_dict())
        for name, value in stored.items():
            getattr(out, name).copy_(value)
        if layer.bias is not None:
            out.bias.copy_(layer.bias)
        out.rebuild()
        return out.eval()

    @torch.no_grad()
    def rebuild(self) -> None:
        """Derive the run-time kernels from the stored form (after construction or loading)."""
        stored = {"mask_bits": self.mask_bits, "dynamic_values": self.dynamic_values,
                  "static_values": self.static_values}
        dynamic, static, mask = unpack(stored, self.weight_shape)
        rows = mask.reshape(self.out_channels, -1)
        dyn_rows, static_rows = rows.all(1), ~rows.any(1)
        simple_groups = self.groups == 1 or self.groups == self.in_channels == self.out_channels
        n_dyn = int(mask.sum())
        buffers: dict[str, Tensor | None] = {"kernels": dynamic, "static_kernel": static,
                                             "dyn_index": None, "static_index": None,
                                             "perm": None, "static_full": None,
                                             "dyn_rows": None}
        if n_dyn == mask.numel():
            self.mode, buffers["static_kernel"] = "dynamic", None
        elif n_dyn == 0:
            self.mode, buffers["kernels"] = "static", None
        elif bool((dyn_rows | static_rows).all()) and simple_groups:
            self.mode = "channel"
            d_idx, s_idx = dyn_rows.nonzero().view(-1), static_rows.nonzero().view(-1)
            # a grouped convolution over a multiple of 8 channels runs far faster on CPU: pad
            # the dynamic rows with zero kernels (their outputs are dropped)
            pad = (-d_idx.numel()) % 8 if self.groups == 1 else 0
            kernels = dynamic[:, d_idx]
            if pad:
                kernels = torch.cat([kernels, kernels.new_zeros(kernels.shape[0], pad,
                                                                *kernels.shape[2:])], 1)
            buffers.update(kernels=kernels, static_kernel=static[s_idx], dyn_index=d_idx,
                           static_index=s_idx, perm=torch.argsort(torch.cat([s_idx, d_idx])),
                           static_full=static,
                           dyn_rows=torch.cat([d_idx, d_idx[:1].repeat(pad)]))
        else:
            self.mode = "element"
            if self.routing == "softmax":  # weights sum to 1: S joins every kernel once
                buffers.update(kernels=dynamic + static, static_kernel=None)
        for name, value in buffers.items():
            self.register_buffer(name, None if value is None else value.contiguous(),
                                 persistent=False)

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """``x (B, C_in, H, W)`` -> ``(B, C_out, H', W')``."""
        if self.mode is None:
            raise RuntimeError("this DeployedConv2d holds no weights yet: load a state dict "
                               "into it (padnet.load does) or make it with from_layer")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"DeployedConv2d expects input of shape (B, {self.in_channels}, "
                             f"H, W), got {tuple(x.shape)}")
        routing = self.router(x)
        kernel_routing = routing.kernel if isinstance(routing, ODAttention) else routing
        pad4 = self.pad4 if self.pad4 is not None else dynamic_same_pad4(
            *x.shape[-2:], self.kernel_size, self.stride, self.dilation)
        xp, conv_pad = pad_input(x, pad4, self.padding_mode)
        geometry = (self.stride, conv_pad, self.dilation)
        area = output_area(*x.shape[-2:], pad4, self.kernel_size, self.stride,
                           self.dilation)
        if self.mode == "static":
            y = F.conv2d(xp, self.static_kernel, None, *geometry, self.groups)
        elif self.mode == "channel":
            y = self._channel_forward(xp, routing, geometry, area)
        else:
            y = self._dynamic(xp, routing, self.kernels, self.static_kernel, None, geometry,
                              self.groups, area)
        if self.bias is not None:
            y = y + (kernel_routing.to(self.bias.dtype) @ self.bias)[:, :, None, None]
        return y

    def _channel_forward(self, xp: Tensor, routing: Any, geometry: tuple, area: int) -> Tensor:
        """Static channels: one ordinary convolution; dynamic channels: per sample; the outputs
        put back in channel order. At batch 1 (path ``auto``) the sample's whole kernel is
        assembled instead and runs as one plain convolution."""
        n_dyn = self.dyn_index.numel()
        if self._path == "auto" and xp.shape[0] == 1:
            weight = self._sample_kernels(routing, self.kernels, self.dyn_rows)[0, :n_dyn]
            full = self.static_full.index_add(0, self.dyn_index, weight)
            return F.conv2d(xp, full, None, *geometry, self.groups)
        depthwise = self.groups > 1
        xs = xp.index_select(1, self.static_index) if depthwise else xp
        xd = xp.index_select(1, self.dyn_index) if depthwise else xp
        gs = self.static_index.numel() if depthwise else 1
        gd = n_dyn if depthwise else 1
        y_s = F.conv2d(xs, self.static_kernel, None, *geometry, gs)
        y_d = self._dynamic(xd, routing, self.kernels, None, self.dyn_rows, geometry, gd, area)
        return torch.cat([y_s, y_d[:, :n_dyn]], 1).index_select(1, self.perm)

    def _sample_kernels(self, routing: Any, kernels: Tensor, rows: Tensor | None) -> Tensor:
        """``sum_k pi_k kernels[k]`` per sample, ``(B, C_d, C_in/g, kh, kw)`` (ODConv: times
        the attentions of the output channels ``rows``)."""
        odconv = isinstance(routing, ODAttention)
        weight = aggregate_weights(routing.kernel if odconv else routing, kernels)
        if odconv:
            att = attention_tensor(routing, self.out_channels, self.in_channels, self.groups,
                                   self.kernel_size)
            weight = weight * (att if rows is None else att.index_select(1, rows))
        return weight

    def _dynamic(self, xp: Tensor, routing: Any, kernels: Tensor, static: Tensor | None,
                 rows: Tensor | None, geometry: tuple, groups: int, area: int) -> Tensor:
        """The per-sample part: ``sum_k pi_k kernels[k] (+ static)`` (ODConv: times the
        attentions of the output channels ``rows``) convolved with each sample; ``area`` is
        the number of output positions per channel."""
        b = xp.shape[0]
        odconv = isinstance(routing, ODAttention)
        path = self._resolve_path(b, area, odconv)
        if path == "mixture":
            mix, r = kernels, routing
            if static is not None:  # the static kernel as one more with routing weight 1
                mix = torch.cat([kernels, static[None]])
                r = torch.cat([routing, routing.new_ones(b, 1)], dim=1)
            return conv2d_mixture(xp, mix, r, None, *geometry, groups)
        weight = self._sample_kernels(routing, kernels, rows)  # (B, C_d, C_in/g, kh, kw)
        if static is not None:
            weight = weight + static
        if path == "single":
            return F.conv2d(xp, weight[0], None, *geometry, groups)
        run = conv2d_unfold if path == "unfold" else conv2d_per_sample
        return run(xp, weight, None, *geometry, groups)

    def _resolve_path(self, batch: int, area: int, odconv: bool) -> str:
        if self._path != "auto":
            return self._path
        if batch == 1:
            return "single"
        if odconv:
            return "grouped"
        return choose_path(batch, area, self.kernel_size, self.groups, self.in_channels)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, routing={self.routing!r}, "
                f"num_kernels={self.num_kernels}, mode={self.mode!r}, path={self._path!r}")
