"""Token-level mixture of experts with partially dynamic experts (PAD-MoE, docs/method.md §2.2).

Each token goes through its top-k experts, two-matrix FFNs ``act(x W1_e^T + b1_e) W2_e^T + b2_e``
whose outputs are summed weighted by the gates; or, with ``gated=True``, gated FFNs
``(act(x W1_e^T + b1_e) * (x W3_e^T + b3_e)) W2_e^T + b2_e`` as in Llama's MLP and Mixtral's
experts (``W1`` the gate, ``W3`` the up and ``W2`` the down projection; docs/method.md §2.3).
Expert weights are 3-D tensors. PAD: per expert matrix one static weight and one
:class:`~padnet.layers.pad.ModeMask`, both shared by the experts; the effective weight of expert e
is ``lam_d * M * W_e + lam_s * (1 - M) * W_s``. Biases stay fully dynamic (per expert, neither
masked nor scaled).

Execution: routing in :mod:`padnet.ops.routing`, sort-by-expert dispatch and grouped matmuls in
:mod:`padnet.ops.dispatch`. The static part is added one of two ways (same result):

* ``'fold'``: inside the grouped loop, each expert's effective weight ``f * W_e + S`` is folded
  just before its matmul (``f = lam_d * M`` and ``S = lam_s (1 - M) W_s``, from
  :meth:`ModeMask.affine_terms <padnet.layers.pad.ModeMask.affine_terms>`): one
  weight-sized temporary per expert, never an ``(E, out, in)`` tensor;
* ``'shared'``: treat ``S`` as a shared expert, per matrix: ``x S1^T`` (and ``x S3^T``) is
  computed once for all tokens and added to every routed pre-activation, and since the second
  matrix is linear, ``sum_e g_e h_e S2^T = (sum_e g_e h_e) S2^T`` is one more dense matmul
  (docs/method.md §2.2; slower than folding on CPU, kept as an option and a cross-check).

Where the mask is all ones the static part is skipped entirely and ``lam_d`` scales the matmul
outputs instead of the weights; where static positions are zero (scale mode ``prune``) the static
part is skipped too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from padnet.layers.activations import ACTIVATIONS, resolve_activation
from padnet.layers.pad import ModeMask
from padnet.layers.pad_conv import INITS
from padnet.layers.protocol import PadLayer, PadWeight, ThetaTerms
from padnet.ops import dispatch as dsp
from padnet.ops import routing as rt
from padnet.utils.checks import check_choice, check_int, check_number, check_optional

__all__ = ["ACTIVATIONS", "MoE", "MoERouting", "STATIC_PATHS"]

#: How the static part of PAD experts is computed.
STATIC_PATHS = ("auto", "fold", "shared")
_PATHS = ("auto", *dsp.GROUPED_PATHS)


class MoERouting(NamedTuple):
    """The routing of one forward over N tokens (what :meth:`MoE.emit_routing` hands to hooks)."""

    gates: Tensor  # (N, k) gate of each kept slot
    experts: Tensor  # (N, k) expert index of each slot
    keep: Tensor | None  # (N, k) bool, slots within capacity; None when dropless
    valid: Tensor | None  # (N,) bool, real (non-padding) tokens; None when all are


class MoE(PadLayer):
    """Mixture of ``num_experts`` FFN experts ``hidden -> intermediate -> hidden``, top-k routed.

    Args:
        hidden_size, intermediate_size: FFN sizes.
        num_experts: E >= 1. top_k: experts per token, in [1, E].
        activation: a name from :data:`ACTIVATIONS` or a callable (an ``nn.Module`` is registered
            as a child ``act``).
        gated: gated experts (module docstring): a third matrix ``w3`` (the up projection,
            ``(E, intermediate, hidden)``) with ``w3_static``, ``mode_mask3`` and bias ``b3``;
            ``w1`` is then the gate projection, the one the activation applies to.
        bias: per-expert biases ``b1``, ``b2`` (and ``b3``).
        capacity_factor: None (dropless, default) or > 0: each expert keeps at most
            ``ceil(capacity_factor * tokens * top_k / E)`` assignments (see
            :func:`padnet.ops.routing.capacity_keep`); a token that loses all its experts gets 0.
        router_noise: None, ``'jitter'`` (router input times U(1 - s, 1 + s)) or ``'gaussian'``
            (logits plus N(0, s^2)), with ``s = router_noise_std``; training mode only.
        load_balance_coef, z_loss_coef: weights of the auxiliary losses in ``aux_loss``.
        dynamic_ratio, scale_mode: of the mode masks ``mode_mask1``, ``mode_mask2`` (of ``w1``
            and ``w2``; see :class:`~padnet.layers.pad.ModeMask`).
        path: grouped matmul, ``'auto'`` (= ``'loop'``), ``'loop'`` or ``'bmm'`` (padded
            batched matmuls; slower on CPU in ``benchmarks/moe_layer.py``).
        static_path: ``'auto'`` (= ``'fold'``), ``'fold'`` or ``'shared'`` (module docstring).

    Shapes: ``forward(x (..., hidden), padding_mask (...) | None) -> (..., hidden)``. After each
    forward, ``aux_loss`` holds ``load_balance_coef * LB + z_loss_coef * Z`` (0-dim, float32) and
    ``aux_terms`` the detached terms plus ``expert_counts`` (kept assignments per expert); between
    :meth:`start_aux_pass` and :meth:`end_aux_pass` they add up over the forwards instead.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int = 8,
        top_k: int = 2,
        *,
        activation: str | Callable[[Tensor], Tensor] = "gelu",
        gated: bool = False,
        bias: bool = True,
        capacity_factor: float | None = None,
        router_noise: str | None = None,
        router_noise_std: float = 0.01,
        load_balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        dynamic_ratio: float = 1.0,
        scale_mode: str = "both",
        path: str = "auto",
        static_path: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        h = check_int(hidden_size, "hidden_size", 1)
        i = check_int(intermediate_size, "intermediate_size", 1)
        rt.check_routing_args(num_experts, top_k, capacity_factor)
        check_optional(router_noise, check_choice, "router_noise", rt.NOISE_TYPES)
        check_choice(path, "path", _PATHS)
        check_choice(static_path, "static_path", STATIC_PATHS)
        if not isinstance(gated, bool):
            raise TypeError(f"gated must be a bool, got {gated!r}")
        self.gated = gated
        self.hidden_size, self.intermediate_size = h, i
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor = capacity_factor
        self.router_noise = router_noise
        self.router_noise_std = check_number(router_noise_std, "router_noise_std", minimum=0)
        self.load_balance_coef = check_number(load_balance_coef, "load_balance_coef", minimum=0)
        self.z_loss_coef = check_number(z_loss_coef, "z_loss_coef", minimum=0)
        self.path, self.static_path = path, static_path
        self.activation_name, self.act = resolve_activation(activation)  # a Module: a child

        kw = {"device": device, "dtype": dtype}
        e = num_experts
        self.router = nn.Linear(h, e, bias=False, **kw)
        self.w1 = nn.Parameter(torch.empty(e, i, h, **kw))
        self.b1 = nn.Parameter(torch.empty(e, i, **kw)) if bias else None
        self.w2 = nn.Parameter(torch.empty(e, h, i, **kw))
        self.b2 = nn.Parameter(torch.empty(e, h, **kw)) if bias else None
        self.w1_static = nn.Parameter(torch.empty(i, h, **kw))
        self.w2_static = nn.Parameter(torch.empty(h, i, **kw))
        pad_kw = {"dynamic_ratio": dynamic_ratio, "scale_mode": scale_mode, **kw}
        self.mode_mask1 = ModeMask((i, h), e, **pad_kw)
        self.mode_mask2 = ModeMask((h, i), e, **pad_kw)
        if gated:  # the up projection: shaped and masked like the gate w1
            self.w3 = nn.Parameter(torch.empty(e, i, h, **kw))
            self.b3 = nn.Parameter(torch.empty(e, i, **kw)) if bias else None
            self.w3_static = nn.Parameter(torch.empty(i, h, **kw))
            self.mode_mask3 = ModeMask((i, h), e, **pad_kw)
        else:
            self.w3 = self.b3 = self.w3_static = self.mode_mask3 = None
        #: padding mask used when ``forward`` gets none and its shape matches ``x.shape[:-1]``
        #: (set by the converter's hook from the model's ``attention_mask``).
        self.padding_mask_hint: Tensor | None = None
        self.aux_loss: Tensor | None = None
        self.aux_terms: dict[str, Tensor] = {}
        self._aux_pass: int | None = None  # forwards so far in an aux pass; None: no pass
        self.reset_parameters()

    # ---- initialisation ------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Experts and static weights like ``nn.Linear``; router ``N(0, 0.1 / hidden)``."""
        nn.init.normal_(self.router.weight, std=math.sqrt(0.1 / self.hidden_size))
        pads = self.pad_weights()
        for w in [*(w for p in pads for w in p.dynamic), *(p.static for p in pads)]:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        for b, fan_in in ((self.b1, self.hidden_size), (self.b2, self.intermediate_size),
                          (self.b3, self.hidden_size)):
            if b is not None:
                nn.init.uniform_(b, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    @torch.no_grad()
    def load_dense(
        self,
        w1: Tensor,
        b1: Tensor | None,
        w2: Tensor,
        b2: Tensor | None,
        *,
        w3: Tensor | None = None,
        b3: Tensor | None = None,
        copy_noise_std: float = 0.0,
    ) -> None:
        """Upcycle a dense FFN: ``W_s = W_e = W`` and ``b_e = b`` for every expert.

        ``w1`` ``(intermediate, hidden)``, ``w2`` ``(hidden, intermediate)``, biases or None
        (zeros); gated layers take the dense gate as ``w1``, ``b1`` and the dense up projection
        as ``w3``, ``b3`` (required then, refused otherwise). ``copy_noise_std`` adds Gaussian
        noise of that std, relative to each weight's std, to every expert copy (then the layer is
        no longer exactly the dense FFN).

        With ``top_k = 1`` the gate is the kept probability, not 1: the router is zeroed (every
        probability ``1/E``) and the second matrix and its bias are copied times E, so the layer
        still equals the dense FFN at the start.
        """
        if (w3 is None) == self.gated:
            raise ValueError("a gated MoE needs the dense up projection w3 (and only a gated "
                             f"one takes it): gated={self.gated}, w3 given: {w3 is not None}")
        scale = float(self.num_experts) if self.top_k == 1 else 1.0
        if scale != 1.0:
            self.router.weight.zero_()
        pairs = [(self.w1, w1, self.w1_static, 1.0), (self.w2, w2, self.w2_static, scale)]
        if self.gated:
            pairs.append((self.w3, w3, self.w3_static, 1.0))
        for dst, src, static, s in pairs:
            if tuple(src.shape) != tuple(static.shape):
                raise ValueError(f"dense weight shape {tuple(src.shape)} != {tuple(static.shape)}")
            static.copy_(src * s)
            dst.copy_((src * s).expand_as(dst))
            if copy_noise_std > 0:
                dst.add_(torch.randn_like(dst) * (copy_noise_std * s * src.std()))
        for dst, src, s in ((self.b1, b1, 1.0), (self.b2, b2, scale), (self.b3, b3, 1.0)):
            if dst is not None:
                dst.copy_((src * s).expand_as(dst) if src is not None else torch.zeros_like(dst))

    @classmethod
    def from_dense(
        cls,
        fc1: nn.Linear,
        fc2: nn.Linear,
        activation: str | Callable[[Tensor], Tensor] = "gelu",
        *,
        gate: nn.Linear | None = None,
        num_experts: int = 8,
        top_k: int = 2,
        init: str = "copy",
        copy_noise_std: float = 0.01,
        **kwargs,
    ) -> MoE:
        """A MoE upcycled from the dense FFN ``fc2(act(fc1(x)))``, or with ``gate`` from the
        gated FFN ``fc2(act(gate(x)) * fc1(x))`` (a gated MoE: ``w1`` from ``gate``, ``w3`` from
        ``fc1``). Function-preserving for ``init='copy'`` and any mask: the kept gates sum to 1
        for ``top_k >= 2``, and for top-1 routing :meth:`load_dense` makes the router uniform
        and scales the copies. ``'copy_noise'`` adds relative noise ``copy_noise_std`` to the
        expert copies, ``'kaiming'`` initialises at random."""
        check_choice(init, "init", INITS)
        if fc1.out_features != fc2.in_features or fc2.out_features != fc1.in_features:
            raise ValueError(
                f"not an FFN hidden -> intermediate -> hidden: fc1 {fc1.in_features}->"
                f"{fc1.out_features}, fc2 {fc2.in_features}->{fc2.out_features}"
            )
        if gate is not None and (gate.in_features, gate.out_features) != (
                fc1.in_features, fc1.out_features):
            raise ValueError(f"gate must map like fc1 ({fc1.in_features}->{fc1.out_features}), "
                             f"got {gate.in_features}->{gate.out_features}")
        first = fc1 if gate is None else gate  # the matrix the activation applies to: w1
        bias = any(m.bias is not None for m in (fc1, fc2, gate) if m is not None)
        moe = cls(
            fc1.in_features, fc1.out_features, num_experts, top_k, activation=activation,
            gated=gate is not None, bias=bias, device=fc1.weight.device, dtype=fc1.weight.dtype,
            **kwargs,
        )
        if init != "kaiming":
            up = {} if gate is None else {"w3": fc1.weight, "b3": fc1.bias}
            moe.load_dense(
                first.weight, first.bias, fc2.weight, fc2.bias, **up,
                copy_noise_std=copy_noise_std if init == "copy_noise" else 0.0,
            )
        return moe.train(fc1.training)

    # ---- forward -------------------------------------------------------------------------
    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """``x`` ``(..., hidden)``; ``padding_mask`` ``x.shape[:-1]``, True for real tokens
        (padding is left out of the auxiliary losses and of capacity priority)."""
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"expected x of shape (..., {self.hidden_size}), got {tuple(x.shape)}")
        valid = self._valid(x, padding_mask)
        x2 = x.reshape(-1, self.hidden_size)  # (N, H)
        logits, gates, experts, keep = self.route(x2, valid)
        self._store_aux(logits, experts, keep, valid)
        self.emit_routing(MoERouting(gates, experts, keep, valid))
        return self.experts_forward(x2, gates, experts, keep).view(x.shape)

    def _valid(self, x: Tensor, padding_mask: Tensor | None) -> Tensor | None:
        return rt.valid_tokens(x, padding_mask, self.padding_mask_hint)

    def route(
        self, x: Tensor, valid: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Router of ``x`` ``(N, H)``: ``(logits (N, E) fp32, gates (N, k), experts (N, k),
        keep (N, k) bool or None when dropless)``."""
        noise = self.router_noise if self.training else None
        return rt.route_tokens(x, self.router.weight, self.top_k,
                               capacity_factor=self.capacity_factor, valid=valid, noise=noise,
                               noise_std=self.router_noise_std)

    def _store_aux(
        self, logits: Tensor, experts: Tensor, keep: Tensor | None, valid: Tensor | None
    ) -> None:
        if logits.shape[0] == 0:
            lb = z = logits.new_zeros(())
        else:
            lb = rt.load_balancing_loss(logits, experts, valid)
            z = rt.router_z_loss(logits, valid)
        loss = self.load_balance_coef * lb + self.z_loss_coef * z
        slots = torch.ones_like(experts, dtype=torch.bool) if keep is None else keep
        if valid is not None:  # padding tokens are not counted
            slots = slots & valid[:, None]
        counts = torch.bincount(experts[slots], minlength=self.num_experts)
        terms = {"load_balance": lb.detach(), "z_loss": z.detach(), "expert_counts": counts}
        if self._aux_pass:  # a further forward in this pass: add up
            loss = self.aux_loss + loss
            terms = {k: self.aux_terms[k] + v for k, v in terms.items()}
        if self._aux_pass is not None:
            self._aux_pass += 1
        self.aux_loss, self.aux_terms = loss, terms

    def start_aux_pass(self) -> None:
        """Until :meth:`end_aux_pass`, ``aux_loss`` and ``aux_terms`` add up over the forwards
        (the first one replaces what was stored). For a layer applied several times in one
        forward of its model (ALBERT's shared layers): its losses then sum over the applications,
        as those of unrolled layers would. :func:`padnet.convert.dynamize_moe` installs model
        hooks that open and close a pass around each forward of the converted model."""
        self._aux_pass = 0

    def end_aux_pass(self) -> None:
        """Back to one forward's ``aux_loss`` (see :meth:`start_aux_pass`)."""
        self._aux_pass = None

    def experts_forward(
        self, x: Tensor, gates: Tensor, experts: Tensor, keep: Tensor | None = None
    ) -> Tensor:
        """Expert computation for given routing (injectable, e.g. to pin it in tests).

        ``x`` ``(N, H)``, ``gates`` and ``experts`` ``(N, k)``, ``keep`` ``(N, k)`` bool or None.
        Returns ``(N, H)``: ``sum_s gates[n, s] * FFN_{experts[n, s]}(x[n])`` over kept slots.
        """
        path = self.path if self.path != "auto" else "loop"
        d = dsp.sort_by_expert(experts, self.num_experts, keep)
        pads = self.pad_weights()  # w1, w2 (, w3)
        has_static = [p.mode_mask.has_static() for p in pads]
        if any(has_static) and self._static_mode() == "shared":
            return self._shared_forward(x, d, gates, has_static, path)
        xs = x.index_select(0, d.token)  # (A, H)
        m1, m2, *m3 = [(p.dynamic, *p.mode_mask.affine_terms(p.static, s), b)
                       for p, s, b in zip(pads, has_static, self._biases(), strict=True)]
        y = dsp.grouped_ffn(xs, d, m1, m2, self.act, path=path,
                            m3=m3[0] if m3 else None)  # (A, H), a fresh tensor
        return dsp.combine(y, d, gates, inplace=True)

    def _biases(self) -> list[Tensor | None]:
        """The biases in the order of :meth:`pad_weights`."""
        return [self.b1, self.b2, self.b3] if self.gated else [self.b1, self.b2]

    def pad_weights(self) -> list[PadWeight]:
        """``w1``, ``w2`` (and ``w3`` when gated): expert weights ``(E, *shape)``, static
        weights and mode masks."""
        pads = [PadWeight("w1", self.mode_mask1, self.w1, self.w1_static),
                PadWeight("w2", self.mode_mask2, self.w2, self.w2_static)]
        if self.gated:
            pads.append(PadWeight("w3", self.mode_mask3, self.w3, self.w3_static))
        return pads

    def theta_terms(self, routing: MoERouting) -> list[ThetaTerms]:
        """Each real token's fully dynamic weights ``sum_e g_e W_e``: coefficients ``(N', E)``
        over the N' non-padding tokens, the same for every matrix."""
        gates, experts, keep, valid = routing
        weights = gates if keep is None else gates * keep
        coeffs = gates.new_zeros(gates.shape[0], self.num_experts)
        coeffs.scatter_add_(1, experts, weights.to(coeffs.dtype))  # (N, E)
        if valid is not None:
            coeffs = coeffs[valid]
        return [ThetaTerms(coeffs=coeffs) for _ in self.pad_weights()]

    def _shared_forward(
        self, x: Tensor, d: dsp.Dispatch, gates: Tensor, has_static: list[bool], path: str
    ) -> Tensor:
        """The static parts as shared experts (few tokens): ``x S1^T`` (and ``x S3^T``) once for
        all tokens, added to every routed pre-activation;
        ``sum_e g_e h_e S2^T = (sum_e g_e h_e) S2^T``."""
        xs = x.index_select(0, d.token)  # (A, H)

        def routed(p: PadWeight, bias: Tensor | None, s: bool, inp: Tensor) -> Tensor:
            out = dsp.grouped_linear(inp, d, p.mode_mask.dynamic(p.dynamic), bias, path=path)
            if s:  # (A, I): the shared static part of every token, at its assignments
                out = out + F.linear(x, p.mode_mask.static(p.static)).index_select(0, d.token)
            return out

        pads, biases = self.pad_weights(), self._biases()
        hid = self.act(routed(pads[0], biases[0], has_static[0], xs))  # (A, I)
        if self.gated:
            hid = hid * routed(pads[2], biases[2], has_static[2], xs)
        w2 = pads[1].mode_mask.dynamic(pads[1].dynamic)
        out = dsp.combine(dsp.grouped_linear(hid, d, w2, self.b2, path=path), d, gates)
        if has_static[1]:
            out = out + F.linear(dsp.combine(hid, d, gates), self.mode_mask2.static(self.w2_static))
        return out

    def _static_mode(self) -> str:
        """``'fold'`` or ``'shared'``: how a non-zero static part is computed.

        ``'auto'`` is ``'fold'``: the shared path needs the same per-expert weight pass for the
        dynamic part plus two dense matmuls over the tokens, and measured slower at every size
        from 16 to 8192 tokens (benchmarks/moe_layer.py); it pays only where the dynamic part
        is stored sparsely (deployment).
        """
        return "fold" if self.static_path == "auto" else self.static_path

    def __getstate__(self) -> dict:
        # the last forward's aux loss holds an autograd graph: copies (deepcopy, pickle) drop it
        state = dict(super().__getstate__())
        state.update(aux_loss=None, aux_terms={}, padding_mask_hint=None, _aux_pass=None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # layers pickled before the gated kind and aux passes existed
        self.__dict__.setdefault("gated", False)
        self.__dict__.setdefault("_aux_pass", None)
        if not self.gated and "w3" not in self._parameters:
            self.__dict__.update(w3=None, b3=None, w3_static=None, mode_mask3=None)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}, "
            f"activation={self.activation_name!r}, gated={self.gated}, "
            f"bias={self.b1 is not None}, "
            f"capacity_factor={self.capacity_factor}, router_noise={self.router_noise!r}"
        )
