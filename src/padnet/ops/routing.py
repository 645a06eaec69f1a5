"""Token routing for mixtures of experts: logits, top-k gates, capacity, auxiliary losses.

Pure tensor functions (docs/method.md §2.2). Shapes: ``N`` tokens, ``E`` experts, ``k`` kept experts
per token. Router logits are computed in at least float32; ties in top-k go to the lower expert
index; gates are the softmax over the k kept logits. The auxiliary losses count only valid
tokens when a ``valid`` mask (True = real token, shape ``(N,)``) is given:

* Switch-style load balancing ``E * sum_i f_i * P_i``, with ``f_i`` the fraction of the ``N * k``
  (token, slot) assignments that go to expert ``i`` and ``P_i`` the mean router probability;
* router z-loss ``mean(logsumexp(logits) ** 2)`` (ST-MoE).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from padnet.utils.checks import check_choice, check_int

__all__ = [
    "NOISE_TYPES",
    "add_router_noise",
    "capacity_keep",
    "check_routing_args",
    "expert_capacity",
    "load_balancing_loss",
    "route_tokens",
    "router_logits",
    "router_z_loss",
    "top_k_gating",
    "valid_tokens",
]

#: Router noise in training: multiplicative input jitter (Switch) or additive Gaussian logit noise.
NOISE_TYPES = ("jitter", "gaussian")


def check_routing_args(
    num_experts: int, top_k: int, capacity_factor: float | None = None
) -> None:
    """Raise ValueError (naming argument and value) unless ``1 <= top_k <= num_experts`` and
    ``capacity_factor`` is None or a positive number."""
    check_int(num_experts, "num_experts", 1)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(
            f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}"
        )
    if capacity_factor is not None and not (
            isinstance(capacity_factor, (int, float)) and not isinstance(capacity_factor, bool)
            and math.isfinite(capacity_factor) and capacity_factor > 0):
        raise ValueError(f"capacity_factor must be a positive number or None (dropless), "
                         f"got {capacity_factor!r}")


def router_logits(x: Tensor, weight: Tensor) -> Tensor:
    """Router logits ``x @ weight^T`` in at least float32.

    Args:
        x: ``(N, H)`` tokens.
        weight: ``(E, H)`` router weight (no bias).
    Returns:
        ``(N, E)`` logits, float32 (float64 when the inputs are float64).
    """
    dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    return F.linear(x.to(dtype), weight.to(dtype))


def add_router_noise(
    x: Tensor, kind: str, std: float, *, generator: torch.Generator | None = None
) -> Tensor:
    """Training noise for the router.

    ``'jitter'`` multiplies ``x`` by ``U(1 - std, 1 + std)`` elementwise (apply it to the router
    input); ``'gaussian'`` adds ``N(0, std^2)`` (apply to the logits). Same shape as ``x``.
    """
    check_choice(kind, "router_noise", NOISE_TYPES)
    if std <= 0:
        return x
    if kind == "jitter":
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x * (1.0 - std + 2.0 * std * u)
    return x + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def top_k_gating(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k experts per token and their gates.

    Ties are deterministic: among equal logits the lower expert index is chosen first.

    Args:
        logits: ``(N, E)`` router logits.
        k: experts kept per token, ``1 <= k <= E``.
    Returns:
        ``gates`` ``(N, k)`` (logits' dtype) and ``experts`` ``(N, k)`` int64, both ordered by
        decreasing logit. For ``k >= 2`` the gates are the softmax over the kept logits (they sum
        to 1); for ``k = 1`` the gate is the kept expert's probability under the softmax over all
        logits, as in Switch Transformer (a softmax over one logit would be a constant 1 and the
        router would learn from the auxiliary losses alone).
    """
    num_experts = logits.shape[-1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {k!r}")
    # a stable descending sort keeps the lower index first among equal logits (torch.topk does not
    # promise an order for ties)
    values, experts = torch.sort(logits, dim=-1, descending=True, stable=True)
    if k == 1:
        return torch.softmax(logits, dim=-1).gather(-1, experts[..., :1]), experts[..., :1]
    values, experts = values[..., :k], experts[..., :k]
    return torch.softmax(values, dim=-1), experts


def expert_capacity(
    num_tokens: int, top_k: int, num_experts: int, capacity_factor: float | None
) -> int | None:
    """Slots per expert: ``ceil(capacity_factor * num_tokens * top_k / num_experts)``; None if
    ``capacity_factor`` is None (dropless)."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def capacity_keep(
    experts: Tensor, num_experts: int, capacity: int, valid: Tensor | None = None
) -> Tensor:
    """Which (token, slot) assignments fit in the experts' capacity.

    Priority: slot 0 of every token before slot 1, and so on; within a slot, tokens in order;
    padding tokens (``valid`` False) after all real tokens. Each expert keeps its first
    ``capacity`` assignments in that order.

    Args:
        experts: ``(N, k)`` chosen experts.
        num_experts: E.
        capacity: slots per expert (>= 0).
        valid: optional ``(N,)`` bool, True for real tokens.
    Returns:
        ``(N, k)`` bool, True where the assignment is kept.
    """
    n, k = experts.shape
    flat = experts.t().reshape(-1)  # (k*N,) slot-major priority order
    order = None
    if valid is not None:
        rank = (~valid).to(torch.int64).repeat(k)  # 0 for real tokens, 1 for padding
        order = torch.argsort(rank, stable=True)
        flat = flat[order]
    onehot = F.one_hot(flat, num_experts)  # (k*N, E)
    position = (onehot.cumsum(0) * onehot).sum(-1) - 1  # rank of each assignment in its expert
    keep = position < capacity
    if order is not None:
        keep = torch.empty_like(keep).scatter_(0, order, keep)
    return keep.view(k, n).t()


def _valid_mean(values: Tensor, valid: Tensor | None) -> Tensor:
    """Mean of ``values`` ``(N, ...)`` over the valid tokens along dim 0 (0 when there are none)."""
    if valid is None:
        return values.mean(0)
    w = valid.to(values.dtype)
    w = w.view(-1, *([1] * (values.dim() - 1)))
    return (values * w).sum(0) / w.sum().clamp_min(1.0)


def load_balancing_loss(
    logits: Tensor, experts: Tensor, valid: Tensor | None = None
) -> Tensor:
    """Switch-style load-balancing loss ``E * sum_i f_i * P_i`` (1 for a perfectly even router).

    Args:
        logits: ``(N, E)`` router logits (the ones used for routing).
        experts: ``(N, k)`` chosen experts (before capacity drops).
        valid: optional ``(N,)`` bool, True for real tokens; padding is ignored.
    Returns:
        0-dim tensor; differentiable through ``P`` (``f`` is a count).
    """
    num_experts = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)
    onehot = F.one_hot(experts, num_experts).to(logits.dtype).sum(1)  # (N, E) assignments
    f = _valid_mean(onehot, valid) / experts.shape[1]
    p = _valid_mean(probs, valid)
    return num_experts * (f * p).sum()


def router_z_loss(logits: Tensor, valid: Tensor | None = None) -> Tensor:
    """Router z-loss ``mean(logsumexp(logits)^2)`` over valid tokens; ``logits`` ``(N, E)``."""
    z = torch.logsumexp(logits, dim=-1).square()
    return _valid_mean(z, valid)


def valid_tokens(
    x: Tensor, padding_mask: Tensor | None, hint: Tensor | None = None
) -> Tensor | None:
    """``(N,)`` bool, True for real tokens of ``x (..., H)``, from ``padding_mask`` (shape
    ``x.shape[:-1]``, True/1 = real), else from ``hint`` when its shape fits; None: all real."""
    if padding_mask is None:
        if hint is None or tuple(hint.shape) != tuple(x.shape[:-1]):
            return None
        padding_mask = hint
    elif tuple(padding_mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"padding_mask must have shape {tuple(x.shape[:-1])} (x.shape[:-1]), "
                         f"got {tuple(padding_mask.shape)}")
    return padding_mask.reshape(-1).to(device=x.device) != 0


def route_tokens(
    x: Tensor, router_weight: Tensor, top_k: int, *, capacity_factor: float | None = None,
    valid: Tensor | None = None, noise: str | None = None, noise_std: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Route tokens ``x (N, H)`` with ``router_weight (E, H)``: ``(logits (N, E) fp32, gates
    (N, k), experts (N, k), keep (N, k) bool or None when dropless)``. ``noise`` (``'jitter'``
    on the router input or ``'gaussian'`` on the logits, std ``noise_std``) is for training."""
    noisy = noise is not None and noise_std > 0
    r_in = add_router_noise(x, "jitter", noise_std) if noisy and noise == "jitter" else x
    logits = router_logits(r_in, router_weight)
    if noisy and noise == "gaussian":
        logits = add_router_noise(logits, "gaussian", noise_std)
    gates, experts = top_k_gating(logits, top_k)
    keep = None
    if capacity_factor is not None:
        num_experts = router_weight.shape[0]
        tokens = x.shape[0] if valid is None else int(valid.sum())
        cap = expert_capacity(tokens, top_k, num_experts, capacity_factor)
        keep = capacity_keep(experts, num_experts, cap, valid)
    return logits, gates, experts, keep
