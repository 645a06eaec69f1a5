"""Expert dispatch for token-level mixtures of experts: sort, grouped matmul, scatter back.

The (token, slot) assignments chosen by the router are flattened and sorted by expert (stable),
so the tokens of each expert form one contiguous block. Expert weights are 3-D tensors
``(E, out, in)``. Two grouped-matmul paths: ``'loop'`` runs one matmul per expert on its block
(a loop over experts, never over tokens), ``'bmm'`` pads every block to the largest one and runs
one batched matmul. :func:`grouped_ffn` runs whole expert FFNs, plain or gated (the loop path
with the hand-written backwards of :class:`GroupedFFN` and :class:`GroupedGatedFFN`);
:func:`combine` scatters the expert outputs back to their tokens weighted by their gates.
Shapes: ``N`` tokens, ``k`` slots per token, ``A <= N * k`` kept assignments.
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
    "GroupedGatedFFN",
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
    m3: Matrix | None = None,
) -> Tensor:
    """Expert FFNs ``act(x W1_e^T + b1_e) W2_e^T + b2_e`` on each expert's rows, where
    ``W_e = factor * weight[e] + static`` (see :data:`Matrix`; PAD: ``factor = lam_d * M``,
    ``static = lam_s (1 - M) W_s``; a 0-dim factor scales the matmul output instead). With
    ``m3`` the experts are gated (docs/method.md §2.3):
    ``(act(x W1_e^T + b1_e) * (x W3_e^T + b3_e)) W2_e^T + b2_e``, ``W1`` the gate, ``W3`` the
    up projection.

    ``'loop'`` never materialises the ``(E, out, in)`` effective weights nor concatenates the
    ``(A, intermediate)`` activations: each expert block goes through its matrices in one go,
    its effective weight folded just before its matmul (hand-written backward:
    :class:`GroupedFFN`, :class:`GroupedGatedFFN`). ``'bmm'`` folds all weights and runs padded
    batched matmuls.

    Args:
        x: ``(A, H)`` rows sorted by expert; ``m1`` (and ``m3``) with weight ``(E, I, H)``,
        ``m2`` with weight ``(E, H, I)``.
    Returns:
        ``(A, H)``.
    """
    check_choice(path, "path", GROUPED_PATHS)
    if x.shape[0] == 0:
        return x.new_zeros(0, m2[0].shape[1])
    if path == "bmm":
        row, cap = _padded_rows(dispatch, x.device)
        (w1, f1, s1, b1), (w2, f2, s2, b2) = m1, m2
        xp = _pad(x, row, w1.shape[0], cap)  # (E, C, H)
        hid = activation(_bmm(xp, _fold_all(w1, f1, s1), b1))  # (E, C, I)
        if m3 is not None:
            w3, f3, s3, b3 = m3
            hid = hid * _bmm(xp, _fold_all(w3, f3, s3), b3)
        out = _bmm(hid, _fold_all(w2, f2, s2), b2)
        return out.reshape(-1, w2.shape[1]).index_select(0, row)
    tensors = (*m1, *m2) if m3 is None else (*m1, *m2, *m3)
    act_params = tuple(p for p in activation.parameters() if p.requires_grad) \
        if isinstance(activation, torch.nn.Module) else ()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, *tensors, *act_params)):
        fn = GroupedFFN if m3 is None else GroupedGatedFFN
        return fn.apply(x, *tensors, dispatch.counts, activation, *act_params)
    with torch.no_grad():
        return _ffn_loop(x, m1, m2, dispatch.counts, activation, m3=m3)[0]


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


def _expert_affine(x: Tensor, m: Matrix, e: int, out: Tensor) -> Tensor:
    """``out = x @ W_e(eff)^T + b_e`` for expert ``e`` of matrix ``m``."""
    w, alpha = _expert_weight(m, e)
    return _affine(x, w, None if m[3] is None else m[3][e], alpha, out)


def _ffn_loop(
    x: Tensor, m1: Matrix, m2: Matrix, counts: list[int],
    activation: Callable[[Tensor], Tensor], keep_pre: bool = False, m3: Matrix | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Forward of the loop path (no autograd): outputs ``(A, H)`` written in place, and, when
    ``keep_pre`` (for the backward), the pre-activations ``(A, I)`` and, gated, the up
    projections ``(A, I)``."""
    inter = m1[0].shape[1]
    out = x.new_empty(x.shape[0], m2[0].shape[1])
    pre_all = x.new_empty(x.shape[0], inter) if keep_pre else None
    up_all = x.new_empty(x.shape[0], inter) if keep_pre and m3 is not None else None
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = slice(start, start + n)
        start += n
        pre = pre_all[rows] if pre_all is not None else x.new_empty(n, inter)
        hid = activation(_expert_affine(x[rows], m1, e, pre))
        if m3 is not None:
            up = up_all[rows] if up_all is not None else x.new_empty(n, inter)
            hid = hid * _expert_affine(x[rows], m3, e, up)  # not in place: hid may be pre
        _expert_affine(hid, m2, e, out[rows])
    return out, pre_all, up_all


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


class _MatrixGrads:
    """The gradient buffers of one :data:`Matrix` (weight, factor, static, bias), filled one
    expert at a time from ``dL/dW_e(eff)`` and ``dL/db_e``."""

    def __init__(self, m: Matrix, has_bias: bool, need: tuple[bool, ...]) -> None:
        w, f, s, _ = m
        self.m = m
        self.w = torch.empty_like(w)
        self.f = torch.zeros_like(f) if f is not None and need[1] else None
        self.s = torch.zeros_like(s) if s is not None and need[2] else None
        self.b = w.new_zeros(w.shape[:2]) if has_bias else None

    def skip(self, e: int) -> None:
        """An expert without tokens: zero gradient."""
        self.w[e].zero_()

    def add(self, e: int, g_out: Tensor, inp: Tensor) -> None:
        """Expert ``e`` computed ``g_out``-receiving outputs ``inp @ W_e(eff)^T + b_e``."""
        w, f = self.m[0], self.m[1]
        torch.mm(g_out.t(), inp, out=self.w[e])  # dL/dW_e(eff), made dL/dw_e in finish()
        _accumulate(self.w[e], w[e], f, self.f, self.s)
        if self.b is not None:
            torch.sum(g_out, 0, out=self.b[e])

    def finish(self) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        f = self.m[1]  # dL/dw_e = factor * dL/dW_e(eff)
        if f is not None and (f.dim() > 0 or float(f) != 1.0):
            self.w.mul_(f)
        return self.w, self.f, self.s, self.b


def _grouped_backward(ctx, grad_out: Tensor, gated: bool) -> tuple:  # noqa: ANN001
    """Backward of :class:`GroupedFFN` and :class:`GroupedGatedFFN`: gradients of ``x``, of the
    4 tensors of each matrix (``m1``, ``m2``, then ``m3`` when gated) and of the activation's
    parameters."""
    x, pre_all, up_all, *saved = ctx.saved_tensors
    counts, activation, has_bias = ctx.meta
    mats = [tuple(saved[3 * j:3 * j + 3]) + (None,) for j in range(3 if gated else 2)]
    need = ctx.needs_input_grad
    grads = [_MatrixGrads(m, has_bias[j], need[1 + 4 * j:5 + 4 * j])
             for j, m in enumerate(mats)]
    m1, m2, m3 = mats[0], mats[1], mats[2] if gated else None
    gx = torch.empty_like(x) if need[0] else None
    params = ctx.act_params
    g_params = [torch.zeros_like(p) for p in params]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            for g in grads:
                g.skip(e)
            continue
        rows = slice(start, start + n)
        start += n
        go, xe = grad_out[rows], x[rows]
        with torch.enable_grad():
            pre = pre_all[rows].detach().requires_grad_()
            act = activation(pre)
        hid = act.detach() if up_all is None else act.detach() * up_all[rows]
        grads[1].add(e, go, hid)
        w, alpha = _expert_weight(m2, e)
        g_hid = torch.mm(go, w)
        g_hid = g_hid if alpha == 1.0 else g_hid.mul_(alpha)
        g_up = None
        if up_all is not None:  # hid = act * up
            g_up = g_hid * act.detach()
            g_hid.mul_(up_all[rows])
        g_pre, *g_act = torch.autograd.grad(act, (pre, *params), g_hid, allow_unused=True)
        for acc, g in zip(g_params, g_act, strict=True):
            if g is not None:
                acc += g
        grads[0].add(e, g_pre, xe)
        if g_up is not None:
            grads[2].add(e, g_up, xe)
        if gx is not None:
            w, alpha = _expert_weight(m1, e)
            _affine(g_pre, w.t(), None, alpha, gx[rows])
            if g_up is not None:
                w, alpha = _expert_weight(m3, e)
                gx[rows].addmm_(g_up, w, alpha=alpha)
    out = [gx]
    for g in grads:
        out.extend(g.finish())
    return (*out, None, None, *g_params)


def _grouped_forward(ctx, x: Tensor, mats: list[Matrix], counts: list[int],  # noqa: ANN001
                     activation: Callable[[Tensor], Tensor], act_params: tuple) -> Tensor:
    m3 = mats[2] if len(mats) == 3 else None
    out, pre, up = _ffn_loop(x, mats[0], mats[1], counts, activation, keep_pre=True, m3=m3)
    ctx.save_for_backward(x, pre, up, *(t for m in mats for t in m[:3]))
    ctx.act_params = act_params
    ctx.meta = (counts, activation, [m[3] is not None for m in mats])
    return out


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
        mats = [(w1, f1, s1, b1), (w2, f2, s2, b2)]
        return _grouped_forward(ctx, x, mats, counts, activation, act_params)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: ANN001
        return _grouped_backward(ctx, grad_out, gated=False)


class GroupedGatedFFN(torch.autograd.Function):
    """:class:`GroupedFFN` for gated experts: inputs ``x``, the 4 tensors of the gate matrix
    ``m1``, of the down matrix ``m2`` and of the up matrix ``m3``, then ``counts``,
    ``activation`` and the activation's trainable parameters. Saved for the backward: the gate
    pre-activations and the up projections, ``(A, I)`` each."""

    @staticmethod
    def forward(ctx, x, w1, f1, s1, b1, w2, f2, s2, b2, w3, f3, s3, b3,  # noqa: ANN001
                counts, activation, *act_params):
        mats = [(w1, f1, s1, b1), (w2, f2, s2, b2), (w3, f3, s3, b3)]
        return _grouped_forward(ctx, x, mats, counts, activation, act_params)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: ANN001
        return _grouped_backward(ctx, grad_out, gated=True)


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
