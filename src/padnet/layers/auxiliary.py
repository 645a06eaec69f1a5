"""Collect the auxiliary losses that layers (e.g. :class:`~padnet.layers.moe.MoE`) store.

A layer with an auxiliary loss keeps the coefficient-weighted value of its last forward in the
attribute ``aux_loss`` (a 0-dim tensor, or None before its first forward); :func:`aux_loss` adds
them up so a training loop only writes ``loss = task_loss + padnet.aux_loss(model)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["aux_loss", "aux_losses"]


def aux_losses(model: nn.Module) -> dict[str, Tensor]:
    """``{qualified module name: aux_loss}`` of every module of ``model`` holding a tensor
    ``aux_loss`` from its last forward (``model`` itself included, under the name ``''``)."""
    found = {}
    for name, module in model.named_modules():
        value = getattr(module, "aux_loss", None)
        if isinstance(value, Tensor):
            found[name] = value
    return found


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of the auxiliary losses stored by the layers of ``model`` in their last forward.

    Returns a 0-dim tensor (differentiable where the stored losses are); a float32 zero on the
    model's device when no layer stored one.
    """
    losses = list(aux_losses(model).values())
    if not losses:
        param = next(model.parameters(), None)
        device = param.device if param is not None else None
        return torch.zeros((), device=device)
    total = losses[0]
    for value in losses[1:]:
        total = total + value.to(total.device)
    return total
