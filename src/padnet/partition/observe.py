"""What a scoring pass of IMP measures (docs/method.md §4): the summed gradient of the loss with
respect to each mask, and the first and second moments of ``Theta_hat(x)``.

The layers hold none of this state. :func:`scoring_pass` sets each mode mask's documented
``mask_override`` to read ``dL/dM``, and :class:`ThetaObserver` collects ``Theta_hat`` through the
layers' routing hooks (:meth:`PadLayer.register_routing_hook`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from padnet.layers.protocol import PadLayer, PadWeight, ThetaTerms, find_pad_layers

__all__ = ["PassResult", "ThetaObserver", "all_reduce_sum", "scoring_pass"]

LossFn = Callable[[nn.Module, Any], Tensor]


def all_reduce_sum(tensors: list[Tensor]) -> list[Tensor]:
    """Sum float64 tensors over all ranks (one flat all-reduce); unchanged without a group."""
    if not tensors or not (dist.is_available() and dist.is_initialized()):
        return tensors
    flat = torch.cat([t.reshape(-1).double() for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return [v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors,
                                               strict=True)]


class ThetaObserver:
    """Running ``sum Theta_hat``, ``sum Theta_hat^2`` and counts per PAD weight of ``model``
    while active (a context manager: hooks are registered on entry and removed on exit)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = find_pad_layers(model)
        self.sums: dict[int, list] = {}  # id(mode mask) -> [sum, sum of squares, count]
        self._handles: list = []

    def __enter__(self) -> ThetaObserver:
        self._handles = [layer.register_routing_hook(self._hook) for _, layer in self.layers]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def _hook(self, layer: PadLayer, routing: Any) -> None:
        for w, terms in zip(layer.pad_weights(), layer.theta_terms(routing), strict=True):
            total, sq_total, count = _moment_sums(w, terms)
            acc = self.sums.setdefault(id(w.mode_mask), [0.0, 0.0, 0])
            acc[0], acc[1], acc[2] = acc[0] + total, acc[1] + sq_total, acc[2] + count

    def raw_sums(self, weights: list[PadWeight], device: torch.device) -> list[Tensor]:
        """``[sum_1, sq_1, count_1, sum_2, ...]`` for ``weights`` (float64 on ``device``, ready
        for an all-reduce); RuntimeError for a weight whose layer reported no routing."""
        out = []
        for w in weights:
            if id(w.mode_mask) not in self.sums:
                raise RuntimeError(f"PAD weight {w.name!r} reported no Theta_hat: its layer did "
                                   "not call emit_routing in its forward")
            total, sq_total, count = self.sums[id(w.mode_mask)]
            out += [total.to(device), sq_total.to(device),
                    torch.tensor(float(count), dtype=torch.float64, device=device)]
        return out


def _moment_sums(w: PadWeight, terms: ThetaTerms) -> tuple[Tensor, Tensor, int]:
    """``(sum Theta, sum Theta^2, n)`` over a batch. From coefficients ``C (n, K)`` the squares
    come from the Gram matrix ``C^T C`` (``K x K``): nothing of size ``n * N`` is formed."""
    if terms.theta is not None:
        t = terms.theta.detach().double().reshape(-1, *w.shape)
        return t.sum(0), t.square().sum(0), t.shape[0]
    k = w.num_factors
    c = terms.coeffs.detach().double().reshape(-1, k)
    weights = w.dynamic.detach().double().reshape(k, -1)  # (K, N)
    total = (c.sum(0) @ weights).view(w.shape)
    gram = c.T @ c  # (K, K)
    sq_total = ((gram @ weights) * weights).sum(0).view(w.shape)  # sum_kl G_kl W_k W_l
    return total, sq_total, c.shape[0]


@dataclass
class PassResult:
    """One scoring pass: summed ``dL/dM`` per weight (float64, or None), the raw Theta_hat sums
    (see :meth:`ThetaObserver.raw_sums`, or None) and the number of batches."""

    grads: list[Tensor] | None
    theta_sums: list[Tensor] | None
    batches: int


def scoring_pass(
    model: nn.Module, batches: Iterable, weights: list[PadWeight], loss_fn: LossFn, *,
    grads: bool = True, theta: bool = False, device: torch.device | None = None,
) -> PassResult:
    """Run ``loss_fn(model, batch)`` over ``batches``; sum ``dL/dM`` of each of ``weights`` (when
    ``grads``) and observe ``Theta_hat`` (when ``theta``). The model's mode and RNG are the
    caller's (see :func:`padnet.partition.data.scoring_context`); masks are left unchanged."""
    from padnet.partition.data import check_loss

    device = device or next(model.parameters()).device
    sums = [torch.zeros(w.shape, dtype=torch.float64, device=device) for w in weights]
    observer, count = ThetaObserver(model), 0
    try:
        for w in weights:
            if grads:
                w.mode_mask.mask_override = w.mode_mask.mask.to(
                    w.mode_mask.phi.dtype).requires_grad_(True)
        overrides = [w.mode_mask.mask_override for w in weights]
        with observer if theta else contextlib.nullcontext():
            for batch in batches:
                count += 1
                with torch.set_grad_enabled(grads):
                    loss = check_loss(loss_fn(model, batch))
                if grads:
                    if not loss.requires_grad:
                        raise RuntimeError("the loss does not depend on the PAD masks")
                    for acc, g in zip(sums, torch.autograd.grad(
                            loss, overrides, allow_unused=True), strict=True):
                        if g is not None:
                            acc += g.detach().double()
    finally:
        for w in weights:
            w.mode_mask.mask_override = None
    if count == 0:
        raise ValueError("data yielded no batches: IMP needs scoring data")
    raw = observer.raw_sums(weights, device) if theta else None
    return PassResult(sums if grads else None, raw, count)
