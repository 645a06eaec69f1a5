"""Dynamic tokens for BERT-family encoders (docs/method.md §6, "dynamic width and tokens").

Two one-call patches of a Hugging Face BERT-family encoder (BERT, MiniLM, RoBERTa, ELECTRA,
XLM-R...: any module list of layers with ``attention.self.{query,key,value}``,
``attention.output``, ``intermediate`` and ``output``). A patched layer keeps its class (a
subclass is swapped in, as ToMe does), its parameters and its state-dict keys; token selection
adds the router under ``<layer>.router``.

**Token selection** (:func:`select_tokens`; Raposo et al., "Mixture-of-Depths", 2024). In each
chosen layer, for one sequence with hidden states ``h`` (L, D) and valid (non-padding) positions
``V``, ``n = |V|``::

    s_i = router(h_i)                                  (a logit; default Linear(D, 1), zero init)
    k   = max(1, ceil(keep * n))                       (padding never counted)
    S   = {0} ∪ the k - 1 highest s_i over V \\ {0}     (ties: the lower position first)
    y   = Layer(h_S)                                   (attention mask restricted to S x S)
    out_i = g_i * y_i + (1 - g_i) * h_i   for i in S,    out_i = h_i otherwise

Position 0 ([CLS]; tokenizers pad on the right) is always kept and counts towards ``k``;
padding is never selected and carries its input through the layer unchanged. The gate is
``g_i = 2 sigmoid(s_i)`` (``gate='sigmoid'``; 1 at ``s_i = 0``, so the zero-initialised router
is the identity gate) or ``g_i = 1 + s_i - stopgrad(s_i)`` (``gate='straight_through'``; always
1 in value, with the gradient of ``s_i``). Since ``out_i = h_i + g_i (y_i - h_i)``, for a pre-LN
block this is MoD's ``h + g f(h)``; for post-LN BERT ``y_i - h_i`` is the layer's update. The
router gets gradients through ``g``. At ``keep = 1`` with ``g = 1`` every valid token goes
through the layer and attends to every valid token: the layer is unchanged.
Optional auxiliary loss (``aux_loss_coef > 0``), stored as the layer's ``aux_loss`` for
:func:`padnet.aux_loss`: ``coef * mean_{i in V \\ {0}} BCE(sigmoid(s_i), [i in S])``, which makes
the selection predictable from each token's own score (e.g. for a threshold at inference).

**Token merging** (:func:`merge_tokens`; Bolya et al., "Token Merging: Your ViT But Faster",
ICLR 2023). Every token carries a size ``m_i`` (the number of input tokens it stands for, 1 at
the start). Each layer computes its self-attention itself, with proportional attention::

    A = softmax(q k^T * scaling + log m)               (log m_j added to the logits of key j)

then ``a = attention.output(A v, h)``; then merges ``r`` tokens per sequence (bipartite soft
matching): slots are split alternately into sets A (even) and B (odd); the metric is the keys
averaged over heads (``metric='keys'``) or ``a`` itself (``'hidden'``); each valid token of A
but [CLS] finds its most cosine-similar valid token of B; the ``r_b = min(r, |A valid \\ {0}|)``
best-matched A tokens merge into their matches, by size-weighted average::

    x_j <- (m_j x_j + sum_{i -> j} m_i x_i) / (m_j + sum_{i -> j} m_i),   m_j <- m_j + sum m_i

The remaining tokens keep their order (valid tokens stay a prefix, padding after them), and the
feed-forward block runs on the shorter sequence. After the last layer every input position
takes the value of the token it ended up in (``unmerge=True``), so the encoder's output keeps
its shape and a size-weighted mean over tokens equals the plain mean over positions. ``r = 0``
leaves the function unchanged. A sequence with fewer mergeable tokens than ``r`` merges all it
can; the batch shrinks by the smallest count and the others get padding slots.

:func:`token_report` runs one batch and gives, per layer, the valid tokens that went through
attention and through the feed-forward block, the fraction of those token-layer computations
saved, and FLOPs per sample (``torch.utils.flop_counter.FlopCounterMode``), patched and plain.

Limits: encoders only (no decoder, cache or cross-attention), tensor attention masks (eager,
sdpa or flash attention; not flex attention's BlockMask), right padding; merging computes the
attention in eager form and is not compatible with gradient checkpointing; hidden states that
transformers collects inside the encoder (``output_hidden_states``) have the merged lengths.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from padnet.conditional.backbones import padding_hints
from padnet.convert.report import ConversionEntry, ConversionReport
from padnet.utils.checks import check_choice, check_int, check_number

__all__ = [
    "GATES",
    "METRICS",
    "LayerTokens",
    "TokenReport",
    "bipartite_merge",
    "bypass_tokens",
    "eager_attention",
    "find_encoder_layers",
    "layer_token_mode",
    "merge_tokens",
    "proportional_attention",
    "select_tokens",
    "select_topk_tokens",
    "token_report",
]

GATES = ("sigmoid", "straight_through")
METRICS = ("keys", "hidden")
_MASK_HELP = ("use attn_implementation 'eager' or 'sdpa' (a tensor mask; flex attention's "
              "BlockMask is not supported)")


# ---------------------------------------------------------------------------------------------
# Finding the layers


def _is_bert_layer(m: nn.Module) -> bool:
    attention = getattr(m, "attention", None)
    sa = getattr(attention, "self", None)
    return (all(isinstance(getattr(sa, n, None), nn.Linear) for n in ("query", "key", "value"))
            and isinstance(getattr(attention, "output", None), nn.Module)
            and isinstance(getattr(m, "intermediate", None), nn.Module)
            and isinstance(getattr(m, "output", None), nn.Module))


def find_encoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and the module list of the BERT-family encoder layers of ``model``.

    Raises:
        TypeError: ``model`` is not an nn.Module.
        ValueError: no such list, more than one, or decoder layers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)
             and len(m) > 0 and all(_is_bert_layer(x) for x in m)]
    if not found:
        raise ValueError(
            f"found no BERT-family encoder in {type(model).__name__}: dynamic tokens need a "
            "module list of layers with attention.self.query/key/value, attention.output, "
            "intermediate and output (BERT, MiniLM, RoBERTa, ELECTRA...)")
    if len(found) > 1:
        raise ValueError(f"{type(model).__name__} has {len(found)} BERT-family layer lists "
                         f"({', '.join(repr(n) for n, _ in found)}); pass the encoder to patch")
    name, stack = found[0]
    if any(getattr(layer, "is_decoder", False) for layer in stack):
        raise ValueError(f"{name!r} holds decoder layers; dynamic tokens support encoders only")
    return name, stack


def _check_layers(layers: Any, n: int) -> list[int]:
    if layers is None:
        return list(range(n))
    if isinstance(layers, (int, str, bytes)) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be a list of layer indices or None, got {layers!r}")
    chosen = set()
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"layers must hold ints, got {i!r} in {layers!r}")
        if not -n <= i < n:
            raise ValueError(f"layers: index {i} is not a layer of this {n}-layer encoder "
                             f"(allowed: {-n} to {n - 1})")
        chosen.add(i % n)
    if not chosen:
        raise ValueError("layers must name at least one layer (or be None for all)")
    return sorted(chosen)


# ---------------------------------------------------------------------------------------------
# Attention masks as the encoder hands them to its layers


def _key_valid(mask: Any, batch: int, length: int, device: torch.device) -> Tensor:
    """(B, L) bool: the positions that some query may attend to (the non-padding tokens)."""
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if not isinstance(mask, Tensor):
        raise TypeError(f"dynamic tokens got an attention mask of type {type(mask).__name__}; "
                        f"{_MASK_HELP}")
    if mask.dim() == 2:  # flash attention: (B, L), 1 = token
        return mask.bool().expand(batch, length)
    if mask.dim() == 4:  # (B or 1, heads or 1, L or 1, L): bool (True = attend) or additive
        allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        return allowed.expand(batch, -1, -1, length).flatten(1, 2).any(1)
    raise ValueError(f"attention mask of shape {tuple(mask.shape)} is not (B, L) or "
                     f"(B, 1, L, L); {_MASK_HELP}")


def _restrict_mask(mask: Tensor | None, index: Tensor, slot_valid: Tensor) -> Tensor | None:
    """The mask for the tokens ``index`` (B, K) only, with the slots where ``slot_valid`` (B, K)
    is False hidden as keys; same format (dtype, layout) as ``mask``."""
    if mask is None:
        assert bool(slot_valid.all()), "without a mask every sequence keeps as many tokens"
        return None
    b, k = index.shape
    if mask.dim() == 2:
        return mask.expand(b, -1).gather(1, index).masked_fill(~slot_valid, 0)
    m = mask.expand(b, *mask.shape[1:])
    heads, queries = m.shape[1], m.shape[2]
    if queries != 1:
        m = m.gather(2, index[:, None, :, None].expand(b, heads, k, m.shape[3]))
    m = m.gather(3, index[:, None, None, :].expand(b, heads, m.shape[2], k))
    hidden = ~slot_valid[:, None, None, :]
    if m.dtype == torch.bool:
        return m.masked_fill(hidden, False)
    return m.masked_fill(hidden, torch.finfo(m.dtype).min)


# ---------------------------------------------------------------------------------------------
# Stateless operations


def select_topk_tokens(scores: Tensor, valid: Tensor, keep: float, *,
                       protect_cls: bool = True) -> Tensor:
    """Which tokens a selecting layer keeps (module docstring).

    Args:
        scores: (B, L) router logits.
        valid: (B, L) bool, False for padding.
        keep: fraction in (0, 1]; each sequence keeps ``max(1, ceil(keep * n))`` of its ``n``
            valid tokens (a product within 1e-6 of an integer counts as that integer).
        protect_cls: position 0 is always kept (and counted as valid).
    Returns:
        (B, L) bool, True for the kept tokens; ties go to the lower position.
    """
    b, length = scores.shape
    valid = valid.clone()
    if protect_cls:
        valid[:, 0] = True
    count = valid.sum(1)
    k = torch.ceil(count.double() * keep - 1e-6).clamp(min=1).long()  # (B,)
    ranked = scores.detach().masked_fill(~valid, -math.inf)
    if protect_cls:
        ranked[:, 0] = math.inf
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    positions = torch.arange(length, device=scores.device).expand(b, length)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return (rank < k[:, None]) & valid


def proportional_attention(query: Tensor, key: Tensor, value: Tensor,
                           log_size: Tensor | None = None, key_valid: Tensor | None = None, *,
                           scaling: float | None = None, dropout_p: float = 0.0) -> Tensor:
    """``softmax(q k^T * scaling + log m) v`` with invalid keys hidden.

    Args:
        query: (B, H, Nq, d); key, value: (B, H, Nk, d).
        log_size: (B, Nk) log token sizes ``log m`` (None: every size is 1).
        key_valid: (B, Nk) bool, False for padding keys (None: all valid).
        scaling: logit scale, ``d ** -0.5`` when None.
        dropout_p: dropout on the attention probabilities.
    Returns:
        (B, H, Nq, d).
    """
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    logits = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, H, Nq, Nk)
    if log_size is not None:
        logits = logits + log_size[:, None, None, :].to(logits.dtype)
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid[:, None, None, :], torch.finfo(logits.dtype).min)
    probs = F.dropout(logits.softmax(dim=-1), p=dropout_p, training=dropout_p > 0)
    return torch.matmul(probs, value)


def bipartite_merge(x: Tensor, metric: Tensor, size: Tensor, valid: Tensor, r: int, *,
                    protect_cls: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Merge up to ``r`` tokens per sequence by bipartite soft matching (module docstring).

    Args:
        x: (B, N, D) tokens; metric: (B, N, C) what similarity is measured on.
        size: (B, N, 1) token sizes; valid: (B, N) bool, False for padding.
        r: tokens to merge per sequence (fewer where a sequence has fewer mergeable tokens).
        protect_cls: slot 0 is never merged away.
    Returns:
        ``(x, size, valid, new_index)``: the merged tokens (B, N', D), their sizes (B, N', 1)
        and validity (B, N'), with ``N' = N - min_b r_b``; ``new_index`` (B, N) is the slot
        each input token went to.
    """
    b, n, d = x.shape
    identity = torch.arange(n, device=x.device).expand(b, n)
    if r <= 0 or n < 2:
        return x, size, valid, identity
    a_pos = torch.arange(0, n, 2, device=x.device)
    b_pos = torch.arange(1, n, 2, device=x.device)
    unit = F.normalize(metric, dim=-1)
    sim = unit[:, a_pos] @ unit[:, b_pos].transpose(1, 2)  # (B, Na, Nb) cosine similarity
    a_valid, b_valid = valid[:, a_pos], valid[:, b_pos]
    best, match = sim.masked_fill(~b_valid[:, None, :], -math.inf).max(dim=-1)  # (B, Na)
    source = a_valid & b_valid.any(1, keepdim=True)
    if protect_cls:
        source[:, 0] = False
    best = best.masked_fill(~source, -math.inf)
    r_b = source.sum(1).clamp(max=r)  # (B,)
    order = torch.sort(best, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, identity[:, : a_pos.numel()])
    merged = rank < r_b[:, None]  # (B, Na): A tokens that merge away

    dst = identity.clone()
    dst[:, a_pos] = b_pos[match]  # (B, N): where each token's mass goes if it merges
    removed = torch.zeros(b, n, dtype=torch.bool, device=x.device)
    removed[:, a_pos] = merged
    weighted = x * size
    into = dst[:, a_pos]
    sum_x = weighted.scatter_add(1, into[..., None].expand(-1, -1, d),
                                 torch.where(merged[..., None], weighted[:, a_pos], 0))
    sum_m = size.scatter_add(1, into[..., None], torch.where(merged[..., None], size[:, a_pos], 0))
    received = torch.zeros(b, n, dtype=torch.long, device=x.device)
    received = received.scatter_add(1, into, merged.long()) > 0
    x = torch.where(received[..., None], sum_x / sum_m, x)

    # compact: kept tokens first, in order; slots past a sequence's own count become padding
    keep_count = n - r_b
    n_new = n - int(r_b.min())
    order = torch.sort(removed.to(torch.int8), dim=1, stable=True).indices
    slots = order[:, :n_new]
    filler = torch.arange(n_new, device=x.device) >= keep_count[:, None]  # (B, N')
    x = x.gather(1, slots[..., None].expand(-1, -1, d))
    size = sum_m.gather(1, slots[..., None]).masked_fill(filler[..., None], 1.0)
    valid = valid.gather(1, slots) & ~filler
    inverse = torch.empty_like(order).scatter_(1, order, identity)  # old slot -> new slot
    new_index = inverse.gather(1, torch.where(removed, dst, identity))
    return x, size, valid, new_index


# ---------------------------------------------------------------------------------------------
# Patching: a subclass of the layer's own class is swapped in


_CLASSES: dict[tuple[type, type], type] = {}


def _patched_class(mixin: type, base: type) -> type:
    if (mixin, base) not in _CLASSES:
        _CLASSES[mixin, base] = type(f"{mixin.prefix}{base.__name__}", (mixin, base),
                                     {"__module__": __name__, "_mixin": mixin, "_base_class": base})
    return _CLASSES[mixin, base]


def _new_patched(mixin: type, base: type) -> nn.Module:
    cls = _patched_class(mixin, base)
    return cls.__new__(cls)


class _Patched:
    """What both patched layer kinds share: bypass switch, pickling, the last token counts."""

    prefix = ""
    _mixin: type
    _base_class: type

    def __reduce_ex__(self, protocol: int) -> tuple:  # the dynamic class is rebuilt by name
        return _new_patched, (self._mixin, self._base_class), self.__getstate__()

    def __getstate__(self) -> dict:
        # the last forward's aux loss holds an autograd graph: copies (deepcopy, pickle) drop it
        state = dict(super().__getstate__())
        if "aux_loss" in state:
            state["aux_loss"] = None
        return state

    def _plain_forward(self, *args: Any, **kwargs: Any) -> Any:
        return super().forward(*args, **kwargs)


def _patch(layer: nn.Module, mixin: type) -> None:
    base = layer._base_class if isinstance(layer, _Patched) else type(layer)
    layer.__class__ = _patched_class(mixin, base)
    layer.token_routing_active = True
    layer.token_stats = None


def layer_token_mode(layer: nn.Module) -> str | None:
    """``'select'`` for a layer patched by :func:`select_tokens`, ``'merge'`` for one patched
    by :func:`merge_tokens`, else None."""
    if isinstance(layer, _SelectMixin):
        return "select"
    return "merge" if isinstance(layer, _MergeMixin) else None


def _first(output: Any) -> tuple[Tensor, tuple | None]:
    return (output[0], tuple(output[1:])) if isinstance(output, tuple) else (output, None)


class _SelectMixin(_Patched):
    """forward of a layer that only the router's top tokens go through (module docstring)."""

    prefix = "TokenSelect"

    def forward(self, hidden_states: Tensor, attention_mask: Any = None, *args: Any,
                **kwargs: Any) -> Any:
        if not self.token_routing_active:
            return self._plain_forward(hidden_states, attention_mask, *args, **kwargs)
        b, length, d = hidden_states.shape
        valid = _key_valid(attention_mask, b, length, hidden_states.device)
        scores = self.router(hidden_states)
        if scores.dim() == 3 and scores.shape[-1] == 1:
            scores = scores[..., 0]
        if scores.shape != (b, length):
            raise ValueError(f"the router must map hidden states {(b, length, d)} to scores "
                             f"(B, L) or (B, L, 1), got {tuple(scores.shape)}")
        kept = select_topk_tokens(scores, valid, self.keep, protect_cls=self.protect_cls)
        count = kept.sum(1)
        width = max(int(count.max()), 1)
        index = torch.sort((~kept).to(torch.int8), dim=1, stable=True).indices[:, :width]
        slot_valid = torch.arange(width, device=index.device) < count[:, None]  # (B, K)
        x_kept = hidden_states.gather(1, index[..., None].expand(-1, -1, d))  # (B, K, D)
        mask = _restrict_mask(attention_mask, index, slot_valid)
        position_ids = kwargs.get("position_ids")
        if isinstance(position_ids, Tensor) and position_ids.shape[-1] == length:
            kwargs["position_ids"] = position_ids.expand(b, length).gather(1, index)
        with padding_hints(self, slot_valid):  # MoE layers inside see the kept tokens
            y, rest = _first(self._plain_forward(x_kept, mask, *args, **kwargs))
        s = scores.gather(1, index)[..., None].to(y.dtype)
        g = 2 * torch.sigmoid(s) if self.gate == "sigmoid" else 1 + (s - s.detach())
        mixed = torch.where(slot_valid[..., None], g * y + (1 - g) * x_kept, x_kept)
        out = hidden_states.scatter(1, index[..., None].expand(-1, -1, d), mixed)
        self._store(scores, kept, valid)
        return out if rest is None else (out, *rest)

    def _store(self, scores: Tensor, kept: Tensor, valid: Tensor) -> None:
        done = (kept & valid).sum()
        self.token_stats = (valid.sum().detach(), done.detach(), done.detach())
        self.last_kept = kept.detach()
        if self.aux_loss_coef <= 0:
            self.aux_loss = None
            return
        counted = valid.clone()
        if self.protect_cls:
            counted[:, 0] = False
        bce = F.binary_cross_entropy_with_logits(scores, kept.to(scores.dtype), reduction="none")
        self.aux_loss = self.aux_loss_coef * (bce * counted).sum() / counted.sum().clamp(min=1)


class _MergeState:
    """Token sizes, validity and the input-position -> slot map of one forward, shared by the
    merging layers of one encoder."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.size: Tensor | None = None  # (B, N, 1)
        self.valid: Tensor | None = None  # (B, N) bool
        self.source: Tensor | None = None  # (B, L) long: slot holding each input position

    def start(self, x: Tensor, mask: Any) -> None:
        b, length, _ = x.shape
        self.valid = _key_valid(mask, b, length, x.device)
        self.size = torch.ones(b, length, 1, dtype=x.dtype, device=x.device)
        self.source = torch.arange(length, device=x.device).expand(b, length)


class _MergeMixin(_Patched):
    """forward of a layer with proportional attention that merges tokens (module docstring)."""

    prefix = "TokenMerge"

    def forward(self, hidden_states: Tensor, attention_mask: Any = None, *args: Any,
                **kwargs: Any) -> Any:
        if not self.token_routing_active:
            return self._plain_forward(hidden_states, attention_mask, *args, **kwargs)
        if getattr(self, "gradient_checkpointing", False) and self.training and (
                torch.is_grad_enabled()):
            raise RuntimeError("token merging does not support gradient checkpointing (the "
                               "replayed layers would merge again); disable it")
        if (args and args[0] is not None) or kwargs.get("encoder_hidden_states") is not None or (
                kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None):
            raise ValueError("token merging supports encoders only (no cross-attention, no cache)")
        state: _MergeState = self.merge_state
        b, n, d = hidden_states.shape
        if self.merge_index == 0:
            state.start(hidden_states, attention_mask)
        elif state.size is None or state.size.shape[:2] != (b, n):
            raise RuntimeError("token merging layers must run in order, from the first, within "
                               "one forward of the encoder")
        a, keys = self._attention(hidden_states, state)
        tokens_in = state.valid.sum()
        if self.merge_r > 0:
            metric = keys.mean(1) if self.merge_metric == "keys" else a
            a, state.size, state.valid, new_index = bipartite_merge(
                a, metric, state.size, state.valid, self.merge_r, protect_cls=self.protect_cls)
            state.source = new_index.gather(1, state.source)
        with padding_hints(self, state.valid):  # MoE layers inside see the merged tokens
            out = self.output(self.intermediate(a), a)
        self.token_stats = (tokens_in.detach(), tokens_in.detach(), state.valid.sum().detach())
        if self.merge_index == self.merge_count - 1:
            if self.unmerge:
                out = out.gather(1, state.source[..., None].expand(-1, -1, d))
            state.clear()
        return (out,) if self.returns_tuple else out

    def _attention(self, x: Tensor, state: _MergeState) -> tuple[Tensor, Tensor]:
        """The attention block with proportional attention: (B, N, D) output, (B, H, N, d) keys."""
        sa = self.attention.self
        b, n, _ = x.shape
        head = sa.attention_head_size

        def split(t: Tensor) -> Tensor:  # (B, N, H*d) -> (B, H, N, d)
            return t.view(b, n, -1, head).transpose(1, 2)

        q, k, v = split(sa.query(x)), split(sa.key(x)), split(sa.value(x))
        log_size = state.size[..., 0].log() if self.proportional else None
        context = proportional_attention(
            q, k, v, log_size, state.valid, scaling=getattr(sa, "scaling", head ** -0.5),
            dropout_p=sa.dropout.p if self.training else 0.0)
        context = context.transpose(1, 2).reshape(b, n, -1)  # (B, N, H*d)
        return self.attention.output(context, x), k


# ---------------------------------------------------------------------------------------------
# Public patches


def _routers(router: Any, chosen: list[int], layer: nn.Module) -> list[nn.Module]:
    if router is None:
        param = next(layer.parameters())
        hidden = layer.attention.self.query.in_features
        made = []
        for _ in chosen:
            linear = nn.Linear(hidden, 1, device=param.device, dtype=param.dtype)
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
            made.append(linear)
        return made
    if isinstance(router, nn.Module) and not isinstance(router, nn.ModuleList):
        return [router] * len(chosen)  # one router drives every chosen layer
    if isinstance(router, (list, tuple, nn.ModuleList)):
        routers = list(router)
        if len(routers) != len(chosen) or not all(isinstance(m, nn.Module) for m in routers):
            raise ValueError(f"router: a list needs one nn.Module per chosen layer "
                             f"({len(chosen)}), got {len(routers)} item(s)")
        return routers
    raise TypeError(f"router must be None, an nn.Module (shared) or a list of nn.Modules (one "
                    f"per layer), got {type(router).__name__}")


def select_tokens(model: nn.Module, layers: Sequence[int] | None = None, keep: float = 0.5, *,
                  router: nn.Module | Sequence[nn.Module] | None = None, gate: str = "sigmoid",
                  aux_loss_coef: float = 0.0, protect_cls: bool = True) -> ConversionReport:
    """Let only the router's top ``keep`` fraction of tokens through the chosen encoder layers,
    in place (module docstring for the exact computation).

    Args:
        model: a BERT-family encoder or a model holding one (BertModel, BertFor...).
        layers: encoder layer indices (negative counted from the end); None: every layer.
        keep: fraction of each sequence's valid tokens kept, in (0, 1].
        router: maps hidden states (B, L, D) to logits (B, L) or (B, L, 1). None: a new
            zero-initialised Linear(D, 1) per layer; a module: shared by all chosen layers; a
            list: one per chosen layer, in increasing layer order.
        gate: ``'sigmoid'`` (``2 sigmoid(s)``) or ``'straight_through'`` (``1 + s - sg(s)``).
        aux_loss_coef: weight of the router's BCE auxiliary loss (0: none).
        protect_cls: always keep position 0.
    Returns:
        A :class:`ConversionReport` (patched layers, and the others as skipped).
    Raises:
        TypeError / ValueError: bad arguments, a model without a BERT-family encoder, a layer
        that selects tokens already, or a model that merges tokens.
    """
    keep = check_number(keep, "keep", minimum=0.0, strict=True, maximum=1.0)
    gate = check_choice(gate, "gate", GATES)
    aux_loss_coef = check_number(aux_loss_coef, "aux_loss_coef", minimum=0.0)
    name, stack = find_encoder_layers(model)
    chosen = _check_layers(layers, len(stack))
    if any(isinstance(layer, _MergeMixin) for layer in stack):
        raise ValueError("this model merges tokens already; token selection and merging cannot "
                         "be combined")
    done = [i for i in chosen if isinstance(stack[i], _SelectMixin)]
    if done:
        raise ValueError(f"layers {done} select tokens already; set their keep/gate attributes "
                         "to change them")
    routers = _routers(router, chosen, stack[chosen[0]])
    report = ConversionReport("select_tokens")
    for i, layer in enumerate(stack):
        qualified, before = f"{name}.{i}" if name else str(i), type(layer).__name__
        if i not in chosen:
            report.skipped.append(ConversionEntry(qualified, before, reason="not in layers"))
            continue
        _patch(layer, _SelectMixin)
        layer.router = routers[chosen.index(i)]
        layer.keep, layer.gate, layer.protect_cls = keep, gate, bool(protect_cls)
        layer.aux_loss_coef, layer.aux_loss, layer.last_kept = aux_loss_coef, None, None
        report.converted.append(ConversionEntry(qualified, before, type(layer).__name__))
    return report


def _modules(model: Any) -> Iterator[nn.Module]:
    return model.modules() if isinstance(model, nn.Module) else iter(())


def _check_r(r: Any, n: int, max_length: int | None) -> list[int]:
    values = [r] * n if isinstance(r, int) and not isinstance(r, bool) else r
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"r must be an int or a list of {n} ints (one per layer), got {r!r}")
    if len(values) != n:
        raise ValueError(f"r: a list needs one value per layer ({n}), got {len(values)}")
    limit = None if max_length is None else max(0, (max_length - 1) // 2)
    for value in values:
        check_int(value, "r", minimum=0)
        if limit is not None and value > limit:
            raise ValueError(
                f"r must be at most {limit}: with at most {max_length} positions "
                f"(max_position_embeddings) a layer can merge at most (L - 1) // 2 tokens, "
                f"got {value}")
    return list(values)


def _returns_tuple() -> bool:
    """Whether transformers' BERT layers return a tuple (before 5.0) or a tensor."""
    try:
        import transformers
    except ImportError:
        return False
    return int(transformers.__version__.split(".")[0]) < 5


def merge_tokens(model: nn.Module, r: int | Sequence[int] = 0, *, metric: str = "keys",
                 proportional: bool = True, unmerge: bool = True,
                 protect_cls: bool = True) -> ConversionReport:
    """Merge ``r`` tokens per layer in every encoder layer, with proportional attention, in place
    (module docstring for the exact computation). Calling it again changes the settings.

    Args:
        model: a BERT-family encoder or a model holding one.
        r: tokens merged per sequence in each layer, or one value per layer.
        metric: ``'keys'`` (mean over heads, as ToMe) or ``'hidden'`` (attention block output).
        proportional: add ``log(size)`` to the attention logits.
        unmerge: give the encoder's output one row per input position again.
        protect_cls: position 0 is never merged away.
    Returns:
        A :class:`ConversionReport` of the patched layers (all of them).
    Raises:
        TypeError / ValueError: bad arguments (``r`` negative, larger than
        ``(max_position_embeddings - 1) // 2`` or a list of the wrong length), a model without
        a BERT-family encoder, or one that selects tokens.
    """
    from padnet.conditional.exits import EarlyExitModel

    metric = check_choice(metric, "metric", METRICS)
    if any(isinstance(m, EarlyExitModel) for m in _modules(model)):
        raise ValueError("token merging cannot be combined with early exits (an "
                         "EarlyExitModel): use select_tokens with early exits")
    name, stack = find_encoder_layers(model)
    config = getattr(stack[0].attention.self, "config", None)
    rs = _check_r(r, len(stack), getattr(config, "max_position_embeddings", None))
    if any(isinstance(layer, _SelectMixin) for layer in stack):
        raise ValueError("this model selects tokens already; token selection and merging cannot "
                         "be combined")
    kind = getattr(stack[0].attention.self, "position_embedding_type", "absolute")
    if kind not in (None, "absolute"):
        raise ValueError(f"token merging needs absolute position embeddings, got {kind!r}")
    state = next((layer.merge_state for layer in stack if isinstance(layer, _MergeMixin)),
                 _MergeState())
    report = ConversionReport("merge_tokens")
    for i, layer in enumerate(stack):
        before = type(layer).__name__
        _patch(layer, _MergeMixin)
        layer.merge_r, layer.merge_metric, layer.proportional = rs[i], metric, bool(proportional)
        layer.unmerge, layer.protect_cls = bool(unmerge), bool(protect_cls)
        layer.merge_state, layer.merge_index, layer.merge_count = state, i, len(stack)
        layer.returns_tuple = _returns_tuple()
        report.converted.append(ConversionEntry(f"{name}.{i}" if name else str(i), before,
                                                type(layer).__name__))
    return report


# ---------------------------------------------------------------------------------------------
# Report


@dataclass
class LayerTokens:
    """Valid tokens (whole batch) that went through one encoder layer's two blocks."""

    name: str
    kind: str  # 'select', 'merge' or 'plain'
    attention_tokens: int
    ffn_tokens: int


@dataclass
class TokenReport:
    """What dynamic tokens saved on one batch (:func:`token_report`).

    A token-layer computation is one valid token through one block (attention or feed-forward)
    of one layer; ``saved_fraction = 1 - done / (2 * layers * tokens)``.
    """

    batch_size: int
    tokens: int  # valid tokens entering the encoder, whole batch
    layers: list[LayerTokens] = field(default_factory=list)
    flops_per_sample: float = 0.0
    baseline_flops_per_sample: float | None = None  # the same model with the patches bypassed

    @property
    def saved_fraction(self) -> float:
        total = 2 * len(self.layers) * self.tokens
        done = sum(e.attention_tokens + e.ffn_tokens for e in self.layers)
        return 1.0 - done / total if total else 0.0

    @property
    def flops_saved_fraction(self) -> float | None:
        base = self.baseline_flops_per_sample
        return None if not base else 1.0 - self.flops_per_sample / base

    def __str__(self) -> str:
        lines = [f"dynamic tokens: {self.tokens} valid tokens in {self.batch_size} sample(s), "
                 f"{100 * self.saved_fraction:.1f}% of token-layer computations saved"]
        lines += [f"  {e.name} ({e.kind}): attention {e.attention_tokens}, "
                  f"feed-forward {e.ffn_tokens}" for e in self.layers]
        flops = f"  FLOPs per sample: {self.flops_per_sample:.4g}"
        if self.baseline_flops_per_sample:
            flops += (f" (plain {self.baseline_flops_per_sample:.4g}, "
                      f"{100 * self.flops_saved_fraction:.1f}% saved)")
        return "\n".join([*lines, flops])

    def to_dict(self) -> dict:
        """Plain-data form (JSON-serialisable), with the derived fractions."""
        return {"batch_size": self.batch_size, "tokens": self.tokens,
                "layers": [vars(e).copy() for e in self.layers],
                "saved_fraction": self.saved_fraction,
                "flops_per_sample": self.flops_per_sample,
                "baseline_flops_per_sample": self.baseline_flops_per_sample,
                "flops_saved_fraction": self.flops_saved_fraction}


@contextlib.contextmanager
def _bypassed(layers: list[nn.Module]) -> Iterator[None]:
    for layer in layers:
        layer.token_routing_active = False
    try:
        yield
    finally:
        for layer in layers:
            layer.token_routing_active = True


@contextlib.contextmanager
def _eager_attention(model: nn.Module, stack: nn.ModuleList) -> Iterator[None]:
    """Run transformers' plain (eager) attention meanwhile: FlopCounterMode does not count the
    fused CPU kernel behind sdpa, so the plain model would look cheaper than it is."""
    found = (getattr(model, "config", None), getattr(stack[0].attention.self, "config", None))
    configs = {id(c): c for c in found if hasattr(c, "_attn_implementation")}
    saved = [(c, c._attn_implementation) for c in configs.values()]
    try:
        for c, _ in saved:
            c._attn_implementation = "eager"
        yield
    finally:
        for c, value in saved:
            c._attn_implementation = value


def _patched_layers(model: nn.Module) -> tuple[nn.ModuleList, list[nn.Module]]:
    _, stack = find_encoder_layers(model)
    return stack, [layer for layer in stack if isinstance(layer, _Patched)]


@contextlib.contextmanager
def bypass_tokens(model: nn.Module) -> Iterator[None]:
    """While active, the layers of ``model`` patched by :func:`select_tokens` or
    :func:`merge_tokens` run as the unpatched layers (every token, no gate): the model without
    its dynamic tokens, for comparison."""
    with _bypassed(_patched_layers(model)[1]):
        yield


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """While active, the BERT-family encoder of ``model`` runs transformers' eager attention,
    whose matrix products ``FlopCounterMode`` counts (it misses those of the fused CPU sdpa
    kernel). The attention implementation is restored afterwards."""
    with _eager_attention(model, _patched_layers(model)[0]):
        yield


def _run_counting(model: nn.Module, inputs: Mapping[str, Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(**inputs)
    return float(counter.get_total_flops())


def token_report(model: nn.Module, inputs: Tensor | Mapping[str, Any], *,
                 baseline: bool = True, eager: bool = True) -> TokenReport:
    """Run ``model`` on one batch (eval mode, no gradients) and report the tokens each layer
    processed and the FLOPs per sample (:class:`TokenReport`).

    Args:
        model: a model patched by :func:`select_tokens` or :func:`merge_tokens`.
        inputs: ``input_ids`` (B, L), or the model's keyword arguments (``input_ids``,
            ``attention_mask``...).
        baseline: also count the FLOPs with the patches bypassed (the unchanged model).
        eager: count with transformers' eager attention (restored afterwards), since
            ``FlopCounterMode`` misses the attention products of the fused CPU sdpa kernel.
    """
    name, stack = find_encoder_layers(model)
    patched = [layer for layer in stack if isinstance(layer, _Patched)]
    if not patched:
        raise ValueError("the model neither selects nor merges tokens; call select_tokens or "
                         "merge_tokens first")
    if isinstance(inputs, Tensor):
        inputs = {"input_ids": inputs}
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must be input_ids (a tensor) or a mapping of model keyword "
                        f"arguments, got {type(inputs).__name__}")
    first = next((v for v in inputs.values() if isinstance(v, Tensor)), None)
    if first is None or first.dim() < 1:
        raise ValueError("inputs must hold at least one batched tensor (e.g. input_ids)")
    batch = first.shape[0]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), (_eager_attention(model, stack) if eager
                               else contextlib.nullcontext()):
            base = None
            if baseline:
                with _bypassed(patched):
                    base = _run_counting(model, inputs) / batch
            flops = _run_counting(model, inputs) / batch
    finally:
        for m, mode in modes:
            m.train(mode)
    tokens = int(patched[0].token_stats[0])
    rows = []
    for i, layer in enumerate(stack):
        if isinstance(layer, _Patched):
            _, attention, ffn = (int(t) for t in layer.token_stats)
            kind = "select" if isinstance(layer, _SelectMixin) else "merge"
        else:
            attention = ffn = tokens
            kind = "plain"
        rows.append(LayerTokens(f"{name}.{i}" if name else str(i), kind, attention, ffn))
    return TokenReport(batch, tokens, rows, flops, base)
