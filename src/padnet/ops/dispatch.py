"""Expert dispatch for token-level mixtures of experts: sort, grouped matmul, scatter back.

The (token, slot) assignments chosen by the router are flattened and sorted by expert (stable),
so the tokens of each expert form one contiguous block. Expert weights are 3-D tensors
``(E, out, in)``. Two grouped-matmul paths: ``'loop'`` runs one matmul per expert on its block
(a loop over experts, never over tokens), ``'bmm'`` pads every block to the largest one and runs
one batched matmul. :func:`grouped_ffn` runs whole expert FFNs (the loop path with the
hand-written backward of :class:`GroupedFFN`); :func:`combine` scatters the expert outputs back
to their tokens weighted by their gates. Shapes: ``N`` tokens, ``k`` slots per token,
``A <= N * k`` kept assignments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from padnet.utils.checks import check_choice

__all__ = [
    "GROUPED_PATHS",
    "Dispatch",
    "GroupedFFN",
    "combine",
    "grouped_ffn",
    "grouped_linear",
    "sort_by_expert",
]

#: Grouped-matmul implementations: one matmul per expert block, or one padded batched matmul.
GROUPED_PATHS = ("loop", "bmm")


class Dispatch(NamedTuple):
    """Assignments sorted by expert.

    Attributes:
        token: ``(A,)`` int64, the token of each assignment.
        flat: ``(A,)`` int64, the assignment's index into the flattened ``(N * k)`` (token, slot)
            grid (``token * k + slot``).
        expert: ``(A,)`` int64, non-decreasing expert of each assignment.
        counts: number of assignments per expert (a list of E ints).
    """

    token: Tensor
    flat: Tensor
    expert: Tensor
    counts: list[int]


def sort_by_expert(experts: Tensor, num_experts: int, keep: Tensor | None = None) -> Dispatch:
    """Sort the (token, slot) assignments by expert, stably (token order inside an expert).

    Args:
        experts: ``(N, k)`` int64 chosen experts.
        num_experts: E.
        keep: optional ``(N, k)`` bool; assignments with False are dropped (capacity overflow).
    """
    n, k = experts.shape
    flat_expert = experts.reshape(-1)  # (N*k,)
    flat = torch.arange(n * k, device=experts.device)
    if keep is not None:
        kept = keep.reshape(-1)
        flat, flat_expert = flat[kept], flat_expert[kept]
    order = torch.argsort(flat_expert, stable=True)
    flat, flat_expert = flat[order], flat_expert[order]
    counts = torch.bincount(flat_expert, minlength=num_experts).tolist()
    return Dispatch(flat.div(k, rounding_mode="floor"), flat, flat_expert, counts)


def grouped_linear(
    x: Tensor,
    dispatch: Dispatch,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    path: str = "loop",
) -> Tensor:
    """Apply expert ``e``'s linear map to the rows of ``x`` dispatched to ``e``.

    Args:
        x: ``(A, in)`` rows sorted by expert (e.g. ``tokens[dispatch.token]``).
        dispatch: from :func:`sort_by_expert`.
        weight: ``(E, out, in)`` expert weights.
        bias: optional ``(E, out)`` expert biases.
        path: ``'loop'`` or ``'bmm'`` (see the module docstring).
    Returns:
        ``(A, out)``, row ``a`` equal to ``x[a] @ weight[e_a]^T + bias[e_a]``.
    """
    if path == "loop":
        return _grouped_loop(x, dispatch.counts, weight, bias)
    if path == "bmm":
        return _grouped_bmm(x, dispatch, weight, bias)
    raise ValueError(f"path must be one of {GROUPED_PATHS}, got {path!r}")


def _grouped_loop(x: Tensor, counts: list[int], weight: Tensor, bias: Tensor | None) -> Tensor:
    # unbind (not weight[e]) so that backward stacks the E gradients once instead of
    # materialising a full-size zero gradient per expert
    weights = weight.unbind(0)
    biases = bias.unbind(0) if bias is not None else [None] * len(weights)
    outs = [
        F.linear(chunk, weights[e], biases[e])
        for e, chunk in enumerate(x.split(counts, 0))
        if counts[e] > 0
    ]
    if not outs:
        return x.new_zeros(0, weight.shape[1])
    return torch.cat(outs, 0) if len(outs) > 1 else outs[0]


def _padded_rows(dispatch: Dispatch, device: torch.device) -> tuple[Tensor, int]:
    """Row of each assignment in a padded ``(E * C)`` layout, C the largest expert load."""
    counts = torch.tensor(dispatch.counts, device=device)
    starts = counts.cumsum(0) - counts
    pos = torch.arange(dispatch.expert.numel(), device=device) - starts[dispatch.expert]
    cap = max(dispatch.counts)
    return dispatch.expert * cap + pos, cap


def _bmm(padded: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``(E, C, in) x (E, out, in)^T (+ bias (E, out)) -> (E, C, out)``."""
    w_t = weight.transpose(1, 2)  # (E, in, out)
    if bias is None:
        return torch.bmm(padded, w_t)
    return torch.baddbmm(bias.unsqueeze(1), padded, w_t)


def _pad(x: Tensor, row: Tensor, num_experts: int, cap: int) -> Tensor:
    padded = x.new_zeros(num_experts * cap, x.shape[1]).index_copy(0, row, x)
    return padded.view(num_experts, cap, x.shape[1])  # (E, C, in)


def _grouped_bmm(x: Tensor, dispatch: Dispatch, weight: Tensor, bias: Tensor | None) -> Tensor:
    if x.shape[0] == 0:
        return x.new_zeros(0, weight.shape[1])
    row, cap = _padded_rows(dispatch, x.device)
    out = _bmm(_pad(x, row, weight.shape[0], cap), weight, bias)
    return out.reshape(-1, weight.shape[1]).index_select(0, row)


#: One expert matrix for :func:`grouped_ffn`: ``(weight (E, out, in), factor, static, bias)``;
#: expert e's effective weight is ``factor * weight[e] + static`` (factor: None, 0-dim or
#: ``(out, in)``; static: None or ``(out, in)``), its bias ``bias[e]`` (bias: None or ``(E, out)``).
Matrix = tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]


def grouped_ffn(
    x: Tensor,
    dispatch: Dispatch,
    m1: Matrix,
    m2: Matrix,
    activation: Callable[[Tensor], Tensor],
    *,
    path: str = "loop",
) -> Tensor:
    """Expert FFNs ``act(x W1_e^T + b1_e) W2_e^T + b2_e`` on each expert's rows, where
    ``W_e = factor * weight[e] + static`` (see :data:`Matrix`; PAD: ``factor = lam_d * M``,
    ``static = lam_s (1 - M) W_s``; a 0-dim factor scales the matmul output instead).

    ``'loop'`` never materialises the ``(E, out, in)`` effective weights nor concatenates the
    ``(A, intermediate)`` activations: each expert block goes through both matrices in one go,
    its effective weight folded just before its matmul (hand-written backward:
    :class:`GroupedFFN`). ``'bmm'`` folds all weights and runs padded batched matmuls.

    Args:
        x: ``(A, H)`` rows sorted by expert; ``m1`` with weight ``(E, I, H)``, ``m2`` with
        weight ``(E, H, I)``.
    Returns:
        ``(A, H)``.
    """
    check_choice(path, "path", GROUPED_PATHS)
    if x.shape[0] == 0:
        return x.new_zeros(0, m2[0].shape[1])
    if path == "bmm":
        row, cap = _padded_rows(dispatch, x.device)
        (w1, f1, s1, b1), (w2, f2, s2, b2) = m1, m2
        pre = _bmm(_pad(x, row, w1.shape[0], cap), _fold_all(w1, f1, s1), b1)
        out = _bmm(activation(pre), _fold_all(w2, f2, s2), b2)
        return out.reshape(-1, w2.shape[1]).index_select(0, row)
    tensors = (*m1, *m2)
    act_params = tuple(p for p in activation.parameters() if p.requires_grad) \
        if isinstance(activation, torch.nn.Module) else ()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, *tensors, *act_params)):
        return GroupedFFN.apply(x, *tensors, dispatch.counts, activation, *act_params)
    with torch.no_grad():
        return _ffn_loop(x, m1, m2, dispatch.counts, activation)[0]


def _fold_all(w: Tensor, f: Tensor | None, s: Tensor | None) -> Tensor:
    """``f * w + s`` for all experts at once, ``(E, out, in)`` (the bmm path)."""
    w = w if f is None else w * f
    return w if s is None else w + s


def _num(t: Tensor | None) -> float:
    return 1.0 if t is None else float(t.detach())


def _expert_weight(m: Matrix, e: int) -> tuple[Tensor, float]:
    """Expert ``e``'s effective weight ``(out, in)`` and an output scale (a 0-dim factor)."""
    w, f, s, _ = m
    if f is None or f.dim() == 0:
        alpha = _num(f)
        return (w[e], alpha) if s is None else (torch.add(s, w[e], alpha=alpha), 1.0)
    return (w[e] * f if s is None else torch.addcmul(s, w[e], f)), 1.0


def _affine(x: Tensor, w: Tensor, b: Tensor | None, alpha: float, out: Tensor) -> Tensor:
    """``out = alpha * x @ w^T + b``, written into ``out``."""
    if b is None:
        torch.mm(x, w.t(), out=out)
        return out if alpha == 1.0 else out.mul_(alpha)
    return torch.addmm(b, x, w.t(), alpha=alpha, out=out)


def _ffn_loop(
    x: Tensor, m1: Matrix, m2: Matrix, counts: list[int],
    activation: Callable[[Tensor], Tensor], keep_pre: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Forward of the loop path (no autograd): outputs ``(A, H)`` written in place, and the
    pre-activations ``(A, I)`` when ``keep_pre`` (for the backward)."""
    inter = m1[0].shape[1]
    out = x.new_empty(x.shape[0], m2[0].shape[1])
    pre_all = x.new_empty(x.shape[0], inter) if keep_pre else None
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = slice(start, start + n)
        start += n
        pre = pre_all[rows] if pre_all is not None else x.new_empty(n, inter)
        w, alpha = _expert_weight(m1, e)
        _affine(x[rows], w, None if m1[3] is None else m1[3][e], alpha, pre)
        w, alpha = _expert_weight(m2, e)
        _affine(activation(pre), w, None if m2[3] is None else m2[3][e], alpha, out[rows])
    return out, pre_all


def _accumulate(g: Tensor, w: Tensor, f: Tensor | None, gf: Tensor | None,
                gs: Tensor | None) -> None:
    """Add expert e's share to the factor and static gradients, given ``g = dL/dW_e(eff)``."""
    if gs is not None:
        gs.add_(g)
    if gf is not None:
        if gf.dim() == 0:
            gf += torch.dot(g.reshape(-1), w.reshape(-1))
        else:
            gf.addcmul_(g, w)


class GroupedFFN(torch.autograd.Function):
    """Loop-over-experts FFN with a hand-written backward (inputs: ``x``, the 4 tensors of
    each :data:`Matrix`, ``counts``, ``activation`` and the activation's trainable parameters,
    e.g. PReLU's slope, whose gradient the backward adds up over the experts).

    Compared with autograd over per-expert ``F.linear`` calls on folded weights, it never
    allocates an ``(E, out, in)`` tensor besides the weight gradients themselves (each expert's
    effective weight is a temporary, its gradient is written straight into the gradient buffer
    and turned into the weight, factor and static gradients in place), and it keeps only the
    pre-activations for the backward (the activations are recomputed).
    """

    @staticmethod
    def forward(ctx, x, w1, f1, s1, b1, w2, f2, s2, b2, counts, activation,  # noqa: ANN001
                *act_params):
        m1, m2 = (w1, f1, s1, b1), (w2, f2, s2, b2)
        out, pre = _ffn_loop(x, m1, m2, counts, activation, keep_pre=True)
        ctx.save_for_backward(x, w1, f1, s1, w2, f2, s2, pre)
        ctx.act_params = act_params
        ctx.meta = (counts, activation, b1 is not None, b2 is not None)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: ANN001
        x, w1, f1, s1, w2, f2, s2, pre_all = ctx.saved_tensors
        counts, activation, has_b1, has_b2 = ctx.meta
        m1, m2 = (w1, f1, s1, None), (w2, f2, s2, None)
        need = ctx.needs_input_grad

        def zeros(t: Tensor | None, i: int) -> Tensor | None:
            return torch.zeros_like(t) if t is not None and need[i] else None

        gx = torch.empty_like(x) if need[0] else None
        gw1, gw2 = torch.empty_like(w1), torch.empty_like(w2)
        gf1, gs1, gf2, gs2 = zeros(f1, 2), zeros(s1, 3), zeros(f2, 6), zeros(s2, 7)
        gb1 = w1.new_zeros(w1.shape[:2]) if has_b1 else None
        gb2 = w2.new_zeros(w2.shape[:2]) if has_b2 else None
        params = ctx.act_params
        g_params = [torch.zeros_like(p) for p in params]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:  # an expert without tokens: zero gradient
                gw1[e].zero_()
                gw2[e].zero_()
                continue
            rows = slice(start, start + n)
            start += n
            go = grad_out[rows]
            with torch.enable_grad():
                pre = pre_all[rows].detach().requires_grad_()
                hid = activation(pre)
            torch.mm(go.t(), hid.detach(), out=gw2[e])  # dL/dW2_e(eff), made dL/dw2_e below
            _accumulate(gw2[e], w2[e], f2, gf2, gs2)
            if gb2 is not None:
                torch.sum(go, 0, out=gb2[e])
            w, alpha = _expert_weight(m2, e)
            g_hid = torch.mm(go, w)
            g_pre, *g_act = torch.autograd.grad(
                hid, (pre, *params), g_hid if alpha == 1.0 else g_hid.mul_(alpha),
                allow_unused=True)
            for acc, g in zip(g_params, g_act, strict=True):
                if g is not None:
                    acc += g
            torch.mm(g_pre.t(), x[rows], out=gw1[e])
            _accumulate(gw1[e], w1[e], f1, gf1, gs1)
            if gb1 is not None:
                torch.sum(g_pre, 0, out=gb1[e])
            if gx is not None:
                w, alpha = _expert_weight(m1, e)
                _affine(g_pre, w.t(), None, alpha, gx[rows])
        for g, f in ((gw1, f1), (gw2, f2)):  # dL/dw_e = factor * dL/dW_e(eff)
            if f is not None and (f.dim() > 0 or float(f) != 1.0):
                g.mul_(f)
        return gx, gw1, gf1, gs1, gb1, gw2, gf2, gs2, gb2, None, None, *g_params


def combine(y: Tensor, dispatch: Dispatch, gates: Tensor, *, inplace: bool = False) -> Tensor:
    """Sum the expert outputs of each token, weighted by their gates (``inplace``: ``y`` may be
    overwritten where autograd does not need it).

    Args:
        y: ``(A, H)`` expert outputs in dispatch order.
        dispatch: from :func:`sort_by_expert`.
        gates: ``(N, k)`` gate weights (dropped assignments contribute nothing).
    Returns:
        ``(N, H)``: ``out[n] = sum over kept slots s of gates[n, s] * y[assignment (n, s)]``.
    """
    n, _ = gates.shape
    g = gates.reshape(-1).index_select(0, dispatch.flat).to(y.dtype).unsqueeze(1)  # (A, 1)
    grad = torch.is_grad_enabled() and (y.requires_grad or g.requires_grad)
    weighted = y.mul_(g) if inplace and not grad else y * g
    return y.new_zeros(n, y.shape[1]).index_add_(0, dispatch.token, weighted)
