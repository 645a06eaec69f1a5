"""The PAD mechanism shared by every partially dynamic layer (PAD-Net, He et al., ACL 2023).

A PAD weight is built from K dynamic factors ``W_1..W_K`` mixed per input, one static weight
``W_s``, a binary mode mask ``M`` (1 = dynamic position) and two scale factors::

    W(x) = lam_d * M * sum_k pi_k(x) W_k + lam_s * (1 - M) * W_s

with ``lam_d = 2 sigmoid(phi)`` and ``lam_s = 2 - lam_d`` (``phi`` a learnable scalar, 0 at start).
:class:`ModeMask` owns ``M``, ``phi`` and the scale-factor mode; layers own the weights and call
:meth:`ModeMask.dynamic` and :meth:`ModeMask.static` to fold the constants into them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from padnet.utils.checks import check_choice, check_int, check_ratio

__all__ = ["SCALE_MODES", "SCALE_MODE_ALIASES", "ModeMask", "mask_from_scores"]

#: Scale-factor modes: ``both`` (default), ``static_only`` (only lam_s learnable, lam_d = 1),
#: ``dynamic_only`` (only lam_d learnable, lam_s = 1), ``none`` (both fixed at 1) and ``prune``
#: (static positions are zero, lam_d fixed at 1). ``s`` and ``d`` are accepted as aliases.
SCALE_MODES = ("both", "static_only", "dynamic_only", "none", "prune")
#: Short names accepted for the scale modes.
SCALE_MODE_ALIASES = {"s": "static_only", "d": "dynamic_only"}


def mask_from_scores(scores: Tensor, num_dynamic: int) -> Tensor:
    """Boolean mask with exactly ``num_dynamic`` True entries at the highest ``scores``.

    Ties are broken deterministically: among equal scores the lower flat index stays dynamic.
    ``scores`` may have any shape; the mask has the same shape.
    """
    n = scores.numel()
    if not 0 <= num_dynamic <= n:
        raise ValueError(f"num_dynamic must be in [0, {n}], got {num_dynamic}")
    flat = scores.detach().reshape(-1).to(torch.float64)
    # stable descending sort keeps the original order among ties
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
    mask[order[:num_dynamic]] = True
    return mask.view(scores.shape)


class ModeMask(nn.Module):
    """Mode mask and scale factors of one PAD weight.

    Args:
        shape: shape of one kernel / expert weight (the mask has this shape).
        num_factors: number K of dynamic factors (kernels or experts); used for storage counts.
        dynamic_ratio: initial fraction of dynamic positions. Values below 1 draw a random mask
            (from the global torch RNG, or ``generator``); IMP replaces it with a scored one.
        scale_mode: one of :data:`SCALE_MODES`.

    Attributes:
        mask: boolean buffer of ``shape``; True marks a dynamic position.
        phi: learnable scalar behind the scale factors (frozen in modes ``none`` and ``prune``).
        mask_override: None, or a float tensor of ``shape`` used in place of ``mask`` by the
            forward pass. Partitioning sets it to the mask as a float tensor that requires a
            gradient and reads ``dL/dM`` from it (the Taylor score); it is not saved.
    """

    mask: Tensor

    def __init__(
        self,
        shape: Sequence[int],
        num_factors: int,
        *,
        dynamic_ratio: float = 1.0,
        scale_mode: str = "both",
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int(num_factors, "num_factors", 1)
        self.shape = tuple(int(s) for s in shape)
        self.num_factors = int(num_factors)
        self.register_buffer("mask", torch.ones(self.shape, dtype=torch.bool, device=device))
        self._refresh_state()
        self.phi = nn.Parameter(torch.zeros((), device=device, dtype=dtype))
        self.mask_override: Tensor | None = None
        self.scale_mode = "both"
        self.set_scale_mode(scale_mode)
        ratio = check_ratio(dynamic_ratio)
        if ratio < 1.0:
            self.set_ratio(ratio, generator=generator)

    # ---- scale factors -------------------------------------------------------------------
    def set_scale_mode(self, scale_mode: str) -> None:
        """Switch the scale-factor mode (a name of :data:`SCALE_MODES` or an alias); ``phi`` is
        trainable only where it is used."""
        scale_mode = SCALE_MODE_ALIASES.get(scale_mode, scale_mode)
        self.scale_mode = check_choice(scale_mode, "scale_mode", SCALE_MODES)
        self.phi.requires_grad_(scale_mode in ("both", "static_only", "dynamic_only"))

    def scales(self) -> tuple[Tensor, Tensor]:
        """Return ``(lam_d, lam_s)`` as 0-dim tensors (differentiable where learnable)."""
        mode = self.scale_mode
        one = torch.ones((), device=self.phi.device, dtype=self.phi.dtype)
        learned = 2.0 * torch.sigmoid(self.phi)
        if mode == "both":
            return learned, 2.0 - learned
        if mode == "dynamic_only":
            return learned, one
        if mode == "static_only":
            return one, learned
        if mode == "none":
            return one, one
        return one, torch.zeros_like(one)  # prune

    # ---- mask ----------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        """Number N of positions in one weight."""
        return self.mask.numel()

    @property
    def num_dynamic(self) -> int:
        """Number of dynamic positions (True entries of the mask)."""
        return int(self.mask.sum().item())

    @property
    def dynamic_ratio(self) -> float:
        """Fraction of dynamic positions in this weight."""
        return self.num_dynamic / max(self.numel, 1)

    @torch.no_grad()
    def set_mask(self, mask: Tensor) -> None:
        """Copy a mask of shape ``shape`` (bool, or 0/1 values) into the buffer."""
        if tuple(mask.shape) != self.shape:
            raise ValueError(f"mask must have shape {self.shape}, got {tuple(mask.shape)}")
        self.mask.copy_(mask.to(device=self.mask.device) != 0)
        self._refresh_state()

    @torch.no_grad()
    def set_ratio(
        self,
        dynamic_ratio: float,
        scores: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        """Make exactly ``round(dynamic_ratio * N)`` positions dynamic.

        With ``scores`` the highest-scoring positions stay dynamic (ties: lower index first);
        without, the positions are drawn at random (a baseline, and the layer's initial state).
        """
        ratio = check_ratio(dynamic_ratio)
        k = round(ratio * self.numel)
        if scores is None:
            chosen = torch.randperm(self.numel, generator=generator)[:k]
            mask = torch.zeros(self.numel, dtype=torch.bool)
            mask[chosen] = True
            self.set_mask(mask.view(self.shape))
            return
        if tuple(scores.shape) != self.shape:
            raise ValueError(f"scores must have shape {self.shape}, got {tuple(scores.shape)}")
        self.set_mask(mask_from_scores(scores, k))

    def state(self) -> str:
        """``'dynamic'`` (all positions dynamic), ``'static'`` (none) or ``'mixed'``.

        Layers use it to skip work that is exactly zero; always ``'mixed'`` while an override is
        set. The answer is a Python-side cache kept by :meth:`set_mask` (and so
        :meth:`set_ratio`) and by ``load_state_dict``. In eager mode it is also refreshed after
        in-place operations on the buffer (``mask.copy_``, ``mask.fill_``, a DDP buffer
        broadcast: tracked by its version counter). Under ``torch.compile`` it is read as it is,
        a Python constant that the compiled graph is specialised (and guarded) on, so the graph
        holds no tensor-to-Python conversion: a compiled model sees such in-place writes only
        after an eager call of :meth:`state`. Writes through ``mask.data[...]`` bypass the
        version counter altogether. Change masks with :meth:`set_mask`.
        """
        if self.mask_override is not None:
            return "mixed"
        if not torch.compiler.is_compiling() and getattr(self, "_state_key", None) != (
                id(self.mask), self.mask._version):
            self._refresh_state()
        return getattr(self, "_state", "mixed")  # 'mixed' is right for any mask

    def _refresh_state(self) -> None:
        """Recompute the cached :meth:`state` from the mask (outside any compiled region)."""
        if self.mask.is_meta:  # no values yet (a meta-device build): decided on first use
            self._state, self._state_key = "mixed", None
            return
        n = self.num_dynamic
        self._state = "dynamic" if n == self.numel else "static" if n == 0 else "mixed"
        self._state_key = (id(self.mask), self.mask._version)

    def mask_as(self, like: Tensor) -> Tensor:
        """The mask (or its override, when set) as a float tensor of ``like``'s dtype and
        device."""
        m = self.mask_override if self.mask_override is not None else self.mask
        return m.to(device=like.device, dtype=like.dtype)

    # ---- folding -------------------------------------------------------------------------
    def dynamic_scale(self) -> Tensor | None:
        """``lam_d`` as a 0-dim tensor, or None where it is the constant 1 (modes
        ``static_only``, ``none``, ``prune``) and multiplying by it is wasted work."""
        if self.scale_mode in ("static_only", "none", "prune"):
            return None
        return self.scales()[0]

    @property
    def pruned(self) -> bool:
        """True in scale mode ``prune``: ``lam_s = 0``, the static positions are zero and an
        exported model stores none of them."""
        return self.scale_mode == "prune"

    def has_static(self) -> bool:
        """False where ``lam_s * (1 - M) * W_s`` is exactly zero: an all-dynamic mask, or scale
        mode ``prune`` (``lam_s = 0``). Layers skip the static part then."""
        return self.state() != "dynamic" and not self.pruned

    def dynamic(self, weight: Tensor) -> Tensor:
        """``lam_d * M * weight`` for dynamic factors of shape ``(..., *shape)``.

        With an all-dynamic mask and a constant ``lam_d = 1`` this is ``weight`` itself (no
        copy): callers must not modify the result in place.
        """
        if self.state() == "dynamic":  # M = 1: skip the mask
            lam_d = self.dynamic_scale()
            return weight if lam_d is None else weight * lam_d.to(weight.dtype)
        return weight * (self.scales()[0].to(weight.dtype) * self.mask_as(weight))

    def static(self, static_weight: Tensor) -> Tensor:
        """``lam_s * (1 - M) * static_weight`` for a static weight of shape ``shape``."""
        lam_s = self.scales()[1].to(static_weight.dtype)
        return static_weight * (lam_s * (1.0 - self.mask_as(static_weight)))

    def combine(self, theta_hat: Tensor, static_weight: Tensor) -> Tensor:
        """``W = lam_d M * theta_hat + lam_s (1 - M) * W_s`` for mixed weights ``theta_hat``
        of shape ``(..., *shape)`` (e.g. one per sample); the static part is broadcast."""
        if not self.has_static():  # nothing static to add
            return self.dynamic(theta_hat)
        return self.dynamic(theta_hat) + self.static(static_weight)

    def affine_terms(
        self, static_weight: Tensor, has_static: bool | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """``(factor, static)`` with ``W(eff) = factor * W_k + static`` for every factor ``W_k``.

        All-dynamic mask: ``factor = lam_d`` (0-dim; None when a constant 1), no static part.
        Otherwise ``factor = lam_d * M`` (shape of the mask) and ``static = lam_s (1 - M) W_s``
        (None where it is exactly zero, see :meth:`has_static`).
        """
        if self.state() == "dynamic":
            lam_d = self.dynamic_scale()
            return (None if lam_d is None else lam_d.to(static_weight.dtype)), None
        has_static = self.has_static() if has_static is None else has_static
        factor = self.dynamic(static_weight.new_ones(()))  # (out, in)
        return factor, self.static(static_weight) if has_static else None

    def extra_repr(self) -> str:
        return (
            f"shape={self.shape}, num_factors={self.num_factors}, "
            f"dynamic_ratio={self.dynamic_ratio:.4f}, scale_mode={self.scale_mode!r}"
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # Masks may be stored as 0/1 of another dtype (e.g. by safetensors round trips).
        key = prefix + "mask"
        if key in state_dict and state_dict[key].dtype != torch.bool:
            state_dict[key] = state_dict[key] != 0
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh_state()

