"""Slow, obvious oracles for the mixture of experts: a loop over tokens and a loop over experts.

They read the parameters of a :class:`padnet.layers.moe.MoE` and recompute its output from the
formulas of docs/method.md §2.2 directly (effective weight of each expert built from mask, scale
factors, expert and static weight), without any of the layer's execution tricks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def scale_factors(phi: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """``(lam_d, lam_s)`` of docs/method.md §2 for a scale-factor mode."""
    learned = 2 * torch.sigmoid(phi)
    one = torch.ones_like(phi)
    return {
        "both": (learned, 2 - learned),
        "dynamic_only": (learned, one),
        "static_only": (one, learned),
        "none": (one, one),
        "prune": (one, torch.zeros_like(phi)),
    }[{"s": "static_only", "d": "dynamic_only"}.get(mode, mode)]


def effective_weights(layer) -> tuple[Tensor, Tensor]:
    """``W_e(eff) = lam_d M * W_e + lam_s (1 - M) * W_s`` for both matrices, ``(E, out, in)``."""
    out = []
    pairs = ((layer.mode_mask1, layer.w1, layer.w1_static),
             (layer.mode_mask2, layer.w2, layer.w2_static))
    for pad, w, ws in pairs:
        lam_d, lam_s = scale_factors(pad.phi, pad.scale_mode)
        m = pad.mask_override if pad.mask_override is not None else pad.mask.to(w.dtype)
        out.append(torch.stack([lam_d * m * w[e] + lam_s * (1 - m) * ws for e in range(len(w))]))
    return out[0], out[1]


def route_token(logits: Tensor, k: int) -> tuple[list[int], Tensor]:
    """Top-k of one token's logits ``(E,)``: lower index first among ties; softmax over the kept
    (k >= 2) or the kept probability (k = 1)."""
    order = sorted(range(logits.numel()), key=lambda e: (-float(logits[e].detach()), e))[:k]
    if k == 1:  # the kept probability (Switch Transformer)
        return order, torch.softmax(logits, dim=0)[order]
    return order, torch.softmax(logits[order], dim=0)


def capacity_oracle(experts: list[list[int]], num_experts: int, capacity: int,
                    valid: list[bool]) -> list[list[bool]]:
    """Keep flags by walking slot 0 of every real token, slot 1, ..., then the padding tokens."""
    n, k = len(experts), len(experts[0]) if experts else 0
    used = [0] * num_experts
    keep = [[False] * k for _ in range(n)]
    for want_valid in (True, False):
        for s in range(k):
            for t in range(n):
                if valid[t] == want_valid:
                    e = experts[t][s]
                    keep[t][s] = used[e] < capacity
                    used[e] += 1
    return keep


def per_token_moe(layer, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
    """MoE output, one token at a time. ``x`` ``(..., H)`` -> ``(..., H)`` (router noise off)."""
    x2 = x.reshape(-1, x.shape[-1])
    n = x2.shape[0]
    valid = [True] * n if padding_mask is None else [bool(v) for v in padding_mask.reshape(-1)]
    w1, w2 = effective_weights(layer)
    routes = []
    for t in range(n):
        dtype = torch.promote_types(x.dtype, torch.float32)
        logits = x2[t].to(dtype) @ layer.router.weight.to(dtype).t()
        routes.append(route_token(logits, layer.top_k))
    keep = [[True] * layer.top_k for _ in range(n)]
    if layer.capacity_factor is not None:
        cap = math.ceil(layer.capacity_factor * sum(valid) * layer.top_k / layer.num_experts)
        keep = capacity_oracle([r[0] for r in routes], layer.num_experts, cap, valid)
    rows = []
    for t in range(n):
        experts, gates = routes[t]
        y = torch.zeros_like(x2[t])
        for s, e in enumerate(experts):
            if not keep[t][s]:
                continue
            h = w1[e] @ x2[t] + (layer.b1[e] if layer.b1 is not None else 0)
            h = layer.act(h)
            o = w2[e] @ h + (layer.b2[e] if layer.b2 is not None else 0)
            y = y + gates[s].to(x.dtype) * o
        rows.append(y)
    return torch.stack(rows).view(x.shape) if rows else x.clone()


def per_expert_moe(layer, x: Tensor, gates: Tensor, experts: Tensor) -> Tensor:
    """MoE output for pinned routing ``(N, k)``, one expert at a time with boolean-mask gathers."""
    w1, w2 = effective_weights(layer)
    out = torch.zeros_like(x)
    for e in range(layer.num_experts):
        tok, slot = torch.nonzero(experts == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = layer.act(x[tok] @ w1[e].t() + (layer.b1[e] if layer.b1 is not None else 0))
        o = h @ w2[e].t() + (layer.b2[e] if layer.b2 is not None else 0)
        out = out.index_add(0, tok, gates[tok, slot, None].to(x.dtype) * o)
    return out


def load_balance_oracle(logits: Tensor, k: int, valid: list[bool] | None = None) -> float:
    """``E * sum_i f_i P_i`` with loops, over the valid tokens."""
    n, e = logits.shape
    valid = valid or [True] * n
    count, prob = [0.0] * e, [0.0] * e
    for t in range(n):
        if not valid[t]:
            continue
        chosen, _ = route_token(logits[t], k)
        p = torch.softmax(logits[t].double(), 0)
        for i in range(e):
            count[i] += chosen.count(i)
            prob[i] += float(p[i])
    m = sum(valid)
    return e * sum((count[i] / (m * k)) * (prob[i] / m) for i in range(e))
