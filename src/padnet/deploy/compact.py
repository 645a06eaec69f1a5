"""The stored form of a deployed PAD weight (docs/method.md §5).

With the constants folded, a PAD weight is ``S = lam_s (1 - M) * W_s`` (non-zero only at static
positions) and ``D_k = lam_d M * W_k`` (non-zero only at dynamic positions). Stored are:

* ``mask_bits``: the mask, eight positions per byte (uint8);
* ``dynamic_values``: ``(K, n_dynamic)``, the values of ``D_k`` at the dynamic positions in flat
  (row-major) order -- for a channel mask these are whole rows, i.e. dense blocks;
* ``static_values``: ``(n_static,)``, the values of ``S`` at the static positions -- or nothing
  (an empty tensor) for a pruned weight (scale mode ``prune``, ``lam_s = 0``: ``S`` is zero).

That is ``K * kappa * N + (1 - kappa) * N`` values plus ``N / 8`` bytes (``K * kappa * N`` values
when pruned), instead of ``K * N`` for a fully dynamic weight. :func:`unpack` rebuilds the dense
tensors once, at load time.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["blank_mask_bits", "pack", "pack_bits", "static_size", "unpack", "unpack_bits"]

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: Tensor) -> Tensor:
    """A boolean tensor as ``ceil(numel / 8)`` bytes, first position in the highest bit."""
    flat = mask.detach().reshape(-1).to(torch.bool).cpu()
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 8).to(torch.uint8)
    return (flat * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)


def unpack_bits(bits: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The boolean tensor of ``shape`` that :func:`pack_bits` stored in ``bits``."""
    n = 1
    for s in shape:
        n *= int(s)
    expanded = (bits.to(torch.uint8)[:, None] & _BIT_WEIGHTS.to(bits.device)) != 0
    if expanded.numel() < n:
        raise ValueError(f"{bits.numel()} mask bytes cannot hold a mask of shape {shape}")
    return expanded.reshape(-1)[:n].view(shape)


def blank_mask_bits(numel: int, num_dynamic: int) -> Tensor:
    """Placeholder mask bits of an empty layer awaiting its state dict: the first
    ``num_dynamic`` positions dynamic (so that the counts agree)."""
    return pack_bits(torch.arange(numel) < num_dynamic)


def pack(dynamic: Tensor, static: Tensor, mask: Tensor, *, pruned: bool = False
         ) -> dict[str, Tensor]:
    """Stored form of folded factors ``dynamic (K, *shape)`` and static weight ``static``
    (``shape``) under ``mask`` (``shape``, True = dynamic); ``pruned``: the static part is zero
    and is not stored."""
    k = dynamic.shape[0]
    flat_mask = mask.reshape(-1).to(torch.bool)
    static_values = static.detach().reshape(-1)[~flat_mask.to(static.device)]
    if pruned:
        if bool(static_values.any()):
            raise ValueError("a pruned PAD weight must have a zero static part")
        static_values = static_values[:0]
    return {
        "mask_bits": pack_bits(flat_mask),
        "dynamic_values": dynamic.detach().reshape(k, -1)[:, flat_mask.to(dynamic.device)]
        .contiguous(),
        "static_values": static_values.contiguous(),
    }


def static_size(numel: int, num_dynamic: int, pruned: bool) -> int:
    """Length of ``static_values`` for a weight of ``numel`` positions (0 when pruned)."""
    return 0 if pruned else numel - num_dynamic


def unpack(stored: dict[str, Tensor], shape: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """``(dynamic (K, *shape), static (shape), mask (shape))`` rebuilt densely from the stored
    form (zeros where a tensor holds nothing; an empty ``static_values`` is a pruned weight)."""
    mask = unpack_bits(stored["mask_bits"], shape).to(stored["dynamic_values"].device)
    values, static_values = stored["dynamic_values"], stored["static_values"]
    flat = mask.reshape(-1)
    n_dyn = int(flat.sum())
    if values.shape[-1] != n_dyn or static_values.numel() not in (0, flat.numel() - n_dyn):
        raise ValueError(f"stored PAD weight does not fit its mask: {n_dyn} dynamic positions, "
                         f"{tuple(values.shape)} dynamic values, {static_values.numel()} static")
    dynamic = values.new_zeros(values.shape[0], flat.numel())
    dynamic[:, flat] = values
    static = static_values.new_zeros(flat.numel())
    if static_values.numel():
        static[~flat] = static_values
    return dynamic.view(values.shape[0], *shape), static.view(shape), mask
