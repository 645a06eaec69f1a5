"""Scores of mask positions and their thresholding into exact-count masks (docs/method.md §4).

Pure tensor functions; :mod:`padnet.partition.imp` runs the model to obtain their inputs.
A higher score means "keep dynamic". Every score has the shape of one weight (one value per
mask position, summed over the K dynamic factors). The scores are a table (:data:`SCORES`,
extended with :func:`register_score`); each entry says whether it needs the mask gradients or
the moments of ``Theta_hat``, so IMP computes only what the chosen score reads:

* ``taylor``: ``|sum_x dL/dM_j|``, the first-order estimate of the loss change when position j
  flips (signed gradients summed over the scoring batches first, then the absolute value);
* ``variance``: the variance over inputs of the fully dynamic weight ``Theta_hat_j(x)``;
* ``magnitude`` (data-free baseline): ``mean_k |lam_d W_k,j - lam_s W_s,j|``, the size of the
  change a flip makes for a typical factor (in scale mode ``prune`` this is ``mean_k |W_k,j|``);
* ``random`` (baseline): seeded uniform noise.

Thresholding keeps the highest scores; ties go to the lower flat index, layers in module order
(:func:`padnet.layers.pad.mask_from_scores` on the concatenation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from padnet.layers.pad import mask_from_scores
from padnet.layers.protocol import PadWeight
from padnet.registry import Registry

__all__ = [
    "SCORES",
    "Score",
    "ScoreInputs",
    "channel_scores",
    "expand_channels",
    "magnitude_score",
    "moments",
    "normalize_scores",
    "random_score",
    "register_score",
    "select_channels_global",
    "select_global",
    "select_layerwise",
    "taylor_score",
    "variance_score",
]

def taylor_score(grad_sum: Tensor) -> Tensor:
    """``|grad_sum|`` for the summed signed mask gradient ``sum_x dL/dM`` (shape of a weight)."""
    return grad_sum.detach().double().abs()


def moments(total: Tensor, sq_total: Tensor, count: int | float) -> tuple[Tensor, Tensor]:
    """Mean and variance per position from ``sum Theta``, ``sum Theta^2`` and the sample count
    (the one place of this formula; the sums may be reduced over ranks first)."""
    if count <= 0:
        raise ValueError(f"count must be > 0, got {count}")
    mean = total.double() / count
    return mean, (sq_total.double() / count - mean.square()).clamp_min(0.0)


def variance_score(variance: Tensor) -> Tensor:
    """The per-position variance of ``Theta_hat(x)`` over the inputs, as a float64 score."""
    return variance.detach().double()


def magnitude_score(
    dynamic: Tensor, static: Tensor, lam_d: float | Tensor = 1.0, lam_s: float | Tensor = 1.0
) -> Tensor:
    """``mean_k |lam_d W_k - lam_s W_s|``: ``dynamic (K, *shape)``, ``static (shape)`` ->
    ``(shape)`` float64."""
    lam_d, lam_s = (float(torch.as_tensor(v).detach()) for v in (lam_d, lam_s))
    d = dynamic.detach().double()
    return (lam_d * d - lam_s * static.detach().double()).abs().mean(0)


def random_score(shape: Sequence[int], generator: torch.Generator) -> Tensor:
    """Uniform noise of ``shape`` (float64) drawn from ``generator``."""
    return torch.rand(tuple(shape), generator=generator, dtype=torch.float64)


@dataclass(frozen=True)
class ScoreInputs:
    """What a score function may read for one PAD weight (None where its entry did not ask)."""

    weight: PadWeight
    grad_sum: Tensor | None  # sum over the scoring batches of dL/dM, float64
    theta_mean: Tensor | None  # mean of Theta_hat over the scoring inputs, float64
    theta_var: Tensor | None  # its variance
    generator: torch.Generator  # seeded per iteration


@dataclass(frozen=True)
class Score:
    """A registered score: ``fn(inputs) -> (shape)`` and what it needs computed."""

    name: str
    fn: Callable[[ScoreInputs], Tensor]
    needs_grad: bool = False
    needs_theta: bool = False


#: The score table: name -> :class:`Score`.
SCORES: Registry[Score] = Registry("score")


def register_score(
    name: str, *, needs_grad: bool = False, needs_theta: bool = False
) -> Callable[[Callable[[ScoreInputs], Tensor]], Callable[[ScoreInputs], Tensor]]:
    """Decorator adding ``fn(inputs: ScoreInputs) -> Tensor`` to :data:`SCORES` as ``name``."""

    def add(fn: Callable[[ScoreInputs], Tensor]) -> Callable[[ScoreInputs], Tensor]:
        SCORES.register(name, Score(name, fn, needs_grad, needs_theta))
        return fn

    return add


register_score("taylor", needs_grad=True)(lambda i: taylor_score(i.grad_sum))
register_score("variance", needs_theta=True)(lambda i: variance_score(i.theta_var))
register_score("magnitude")(lambda i: magnitude_score(i.weight.dynamic, i.weight.static,
                                                      *i.weight.mode_mask.scales()))
register_score("random")(lambda i: random_score(i.weight.shape, i.generator))


def channel_scores(score: Tensor) -> Tensor:
    """Score of each output channel / neuron: ``(C, ...)`` -> ``(C,)``, the sum over all other
    dimensions."""
    return score.reshape(score.shape[0], -1).sum(1)


def expand_channels(channel_mask: Tensor, shape: Sequence[int]) -> Tensor:
    """Broadcast a ``(C,)`` channel mask to the weight ``shape`` ``(C, ...)``."""
    view = (-1,) + (1,) * (len(shape) - 1)
    return channel_mask.view(view).expand(tuple(shape)).clone()


def normalize_scores(scores: Sequence[Tensor]) -> list[Tensor]:
    """Each layer's scores divided by their mean (a layer of zeros stays zero), so layers whose
    scores differ in scale compete on relative terms under a global threshold."""
    out = []
    for s in scores:
        m = s.double().mean() if s.numel() else s.new_zeros(())
        out.append(s.double() / m if m > 0 else s.double())
    return out


def select_layerwise(scores: Sequence[Tensor], ratio: float) -> list[Tensor]:
    """Per layer, exactly ``round(ratio * numel)`` True entries at the highest scores."""
    return [mask_from_scores(s, round(ratio * s.numel())) for s in scores]


def select_global(scores: Sequence[Tensor], ratio: float) -> list[Tensor]:
    """One threshold over all layers: exactly ``round(ratio * N)`` True entries in total,
    ``N`` the sum of the layers' sizes; ties: module order, then lower flat index."""
    flat = torch.cat([s.detach().reshape(-1).double().cpu() for s in scores])
    mask = mask_from_scores(flat, round(ratio * flat.numel()))
    out, offset = [], 0
    for s in scores:
        out.append(mask[offset:offset + s.numel()].view(s.shape).to(s.device))
        offset += s.numel()
    return out


def select_channels_global(
    scores: Sequence[Tensor], sizes: Sequence[int], target: int
) -> list[Tensor]:
    """Global channel selection when channels differ in size.

    ``scores``: one ``(C_l,)`` tensor per layer; ``sizes``: positions per channel of each layer;
    ``target``: wanted number of dynamic positions. The rule: rank all channels by score
    (ties: module order, then channel index) and keep the top ``m``, with ``m`` the prefix length
    whose position count is closest to ``target`` (on a tie, the smaller ``m``). The count is
    then within half the largest channel size of ``target``.
    Returns one ``(C_l,)`` bool mask per layer.
    """
    flat = torch.cat([s.detach().reshape(-1).double().cpu() for s in scores])
    size = torch.cat([torch.full((s.numel(),), int(n), dtype=torch.int64)
                      for s, n in zip(scores, sizes, strict=True)])
    order = torch.sort(flat, descending=True, stable=True).indices
    counts = torch.cat([torch.zeros(1, dtype=torch.int64), size[order].cumsum(0)])  # prefix sums
    m = int(torch.argmin((counts - int(target)).abs()))  # first minimum: the smaller m
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:m]] = True
    out, offset = [], 0
    for s in scores:
        out.append(mask[offset:offset + s.numel()].to(s.device))
        offset += s.numel()
    return out
