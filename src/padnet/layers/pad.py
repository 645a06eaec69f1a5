"""The PAD mechanism shared by every partially dynamic layer (PAD-Net, He et al., ACL 2023).

A PAD weight is built from K dynamic factors ``W_1..W_K`` mixed per input, one static weight
``W_s``, a binary mode mask ``M`` (1 = dynamic position) and two scale factors::

    W(x) = lam_d * M * sum_k pi_k(x) W_k + lam_s * (1 - M) * W_s

with ``lam_d = 2 sigmoid(phi)`` and ``lam_s = 2 - lam_d`` (``phi`` a learnable scalar, 0 at start).
:class:`ModeMask` owns ``M``, ``phi`` and the scale-factor mode; layers own the weights and call
:meth:`ModeMask.dynamic` and :meth:`ModeMask.static` to fold the constants into them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["SCALE_MODES", "ModeMask", "check_ratio", "mask_from_scores"]

#: Scale-factor modes: ``both`` (default), only ``s`` learnable, only ``d`` learnable, ``none``
#: (both fixed at 1) and ``prune`` (static positions are zero, lam_d fixed at 1).
SCALE_MODES = ("both", "s", "d", "none", "prune")


def check_ratio(value: float, name: str = "dynamic_ratio") -> float:
    """Return ``value`` as a float after checking it lies in [0, 1]; raise ValueError otherwise."""
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= ratio <= 1.0 or math.isnan(ratio):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return ratio


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
        probe: optional float tensor used instead of ``mask`` in the forward pass, so that a
            partitioning algorithm can read the gradient of the loss with respect to the mask.
        observing: while True, layers report the fully dynamic weight ``Theta_hat(x)`` of every
            sample / token they process (:meth:`observe`, :meth:`observe_mixture`); the running
            first and second moments serve partitioning (mean static init, variance score).
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
        if int(num_factors) < 1:
            raise ValueError(f"num_factors must be >= 1, got {num_factors!r}")
        self.shape = tuple(int(s) for s in shape)
        self.num_factors = int(num_factors)
        self.register_buffer("mask", torch.ones(self.shape, dtype=torch.bool, device=device))
        self.phi = nn.Parameter(torch.zeros((), device=device, dtype=dtype))
        self.probe: Tensor | None = None
        self.observing = False
        self.reset_observation()
        self.scale_mode = "both"
        self.set_scale_mode(scale_mode)
        ratio = check_ratio(dynamic_ratio)
        if ratio < 1.0:
            self.set_ratio(ratio, generator=generator)

    # ---- scale factors -------------------------------------------------------------------
    def set_scale_mode(self, scale_mode: str) -> None:
        """Switch the scale-factor mode; ``phi`` is trainable only where it is used."""
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
        self.scale_mode = scale_mode
        self.phi.requires_grad_(scale_mode in ("both", "s", "d"))

    def scales(self) -> tuple[Tensor, Tensor]:
        """Return ``(lam_d, lam_s)`` as 0-dim tensors (differentiable where learnable)."""
        mode = self.scale_mode
        one = torch.ones((), device=self.phi.device, dtype=self.phi.dtype)
        learned = 2.0 * torch.sigmoid(self.phi)
        if mode == "both":
            return learned, 2.0 - learned
        if mode == "d":
            return learned, one
        if mode == "s":
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

        Layers use it to skip work that is exactly zero. Cached until the mask changes in place
        (tracked by the buffer's version counter); always ``'mixed'`` while a probe is set.
        """
        if self.probe is not None:
            return "mixed"
        key = (id(self.mask), self.mask._version)
        if getattr(self, "_state_key", None) != key:
            n = self.num_dynamic
            self._state = "dynamic" if n == self.numel else "static" if n == 0 else "mixed"
            self._state_key = key
        return self._state

    def mask_as(self, like: Tensor) -> Tensor:
        """The mask (or the probe, when set) as a float tensor of ``like``'s dtype and device."""
        m = self.probe if self.probe is not None else self.mask
        return m.to(device=like.device, dtype=like.dtype)

    # ---- observation of Theta_hat (for partitioning) -------------------------------------
    def reset_observation(self) -> None:
        """Forget the observed moments of ``Theta_hat``."""
        self.theta_sum: Tensor | None = None
        self.theta_sq_sum: Tensor | None = None
        self.observed = 0

    @torch.no_grad()
    def _accumulate(self, total: Tensor, sq_total: Tensor, count: int) -> None:
        total, sq_total = total.double(), sq_total.double()
        if self.theta_sum is None:
            self.theta_sum, self.theta_sq_sum = total, sq_total
        else:
            self.theta_sum += total
            self.theta_sq_sum += sq_total
        self.observed += int(count)

    @torch.no_grad()
    def observe(self, theta: Tensor) -> None:
        """Record per-sample fully dynamic weights ``theta`` of shape ``(n, *shape)``."""
        if self.observing:
            t = theta.detach().reshape(-1, *self.shape)
            self._accumulate(t.sum(0), t.square().sum(0), t.shape[0])

    @torch.no_grad()
    def observe_mixture(self, coeffs: Tensor, weights: Tensor) -> None:
        """Record ``Theta_hat = sum_k coeffs[:, k] * weights[k]`` for n samples or tokens.

        ``coeffs (n, K)``, ``weights (K, *shape)``. The moments are formed from ``C^T C``
        (``K x K``), so nothing of size ``n * N`` is materialised.
        """
        if not self.observing:
            return
        c = coeffs.detach().double().reshape(-1, self.num_factors)
        w = weights.detach().double().reshape(self.num_factors, -1)  # (K, N)
        total = (c.sum(0) @ w).view(self.shape)
        gram = c.T @ c  # (K, K)
        sq_total = ((gram @ w) * w).sum(0).view(self.shape)  # sum_kl G_kl W_k W_l
        self._accumulate(total, sq_total, c.shape[0])

    def theta_moments(self) -> tuple[Tensor, Tensor]:
        """Mean and variance of the observed ``Theta_hat`` per position (float64)."""
        if not self.observed:
            raise RuntimeError("no Theta_hat observed: run forward passes with observing=True")
        mean = self.theta_sum / self.observed
        return mean, (self.theta_sq_sum / self.observed - mean.square()).clamp_min(0.0)

    # ---- folding -------------------------------------------------------------------------
    def dynamic_scale(self) -> Tensor | None:
        """``lam_d`` as a 0-dim tensor, or None where it is the constant 1 (modes ``s``,
        ``none``, ``prune``) and multiplying by it is wasted work."""
        return None if self.scale_mode in ("s", "none", "prune") else self.scales()[0]

    def has_static(self) -> bool:
        """False where ``lam_s * (1 - M) * W_s`` is exactly zero: an all-dynamic mask, or scale
        mode ``prune`` (``lam_s = 0``). Layers skip the static part then."""
        return self.state() != "dynamic" and self.scale_mode != "prune"

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


def pad_modules(model: nn.Module) -> list[tuple[str, ModeMask]]:
    """All ``(qualified name, ModeMask)`` pairs of a model, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ModeMask)]


def set_scale_mode(model: nn.Module, scale_mode: str) -> int:
    """Set the scale-factor mode of every PAD weight in ``model``; returns how many changed."""
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    mods = pad_modules(model)
    for _, m in mods:
        m.set_scale_mode(scale_mode)
    return len(mods)


__all__ += ["pad_modules", "set_scale_mode"]
