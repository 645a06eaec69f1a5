"""Exit criteria for early-exit inference (dynamic depth, docs/method.md §6).

A criterion decides, at one intermediate exit, which of the samples still running stop there.
It is any callable ``criterion(logits, memory) -> done``:

* ``logits``: ``(b, C)``, the exit's logits for the ``b`` samples still running;
* ``memory``: a dict owned by the inference loop, empty at the first exit of a batch, where a
  criterion keeps per-sample state between exits. Every tensor stored there must have the running
  batch as its first dimension: when samples leave, the loop keeps the rows of those that stay;
* ``done``: a bool tensor ``(b,)``, True for the samples that exit here.

The final exit is never asked: every sample still running takes it.

Three criteria are provided, with ``p = softmax(logits)``:

* :class:`MaxProbability`: exit when ``max_c p_c >= threshold`` (the confidence rule of
  BranchyNet-style and many later early-exit networks);
* :class:`Entropy`: exit when ``H(p) = -sum_c p_c log p_c <= threshold`` (nats; BranchyNet,
  DeeBERT);
* :class:`Patience`: PABEE (Zhou et al., "BERT Loses Patience: Fast and Robust Inference with
  Early Exit", NeurIPS 2020). A counter starts at 0 at the first exit; at each later exit it grows
  by one when the argmax equals the previous exit's argmax and is reset to 0 otherwise; a sample
  exits as soon as its counter reaches ``patience``. With ``patience = t`` the earliest possible
  exit is therefore the ``t + 1``-th (index ``t``), after ``t + 1`` exits agreed.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from padnet.utils.checks import check_int, check_number

__all__ = ["CRITERIA", "DEFAULT_THRESHOLDS", "Entropy", "ExitCriterion", "MaxProbability",
           "Patience", "check_decision", "criterion_record", "make_criterion"]


@runtime_checkable
class ExitCriterion(Protocol):
    """``criterion(logits (b, C), memory: dict) -> done (b,) bool``; see the module docstring."""

    def __call__(self, logits: Tensor, memory: dict[str, Tensor]) -> Tensor: ...


def _check_logits(logits: Tensor, who: str) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"{who} expects logits of shape (batch, classes), got {got}")


def check_decision(done: object, batch: int, criterion: object) -> Tensor:
    """``done`` if it is a bool tensor of shape ``(batch,)``; else a TypeError/ValueError that
    names the criterion."""
    if not isinstance(done, Tensor) or done.dtype != torch.bool:
        what = f"a {done.dtype} tensor" if isinstance(done, Tensor) else type(done).__name__
        raise TypeError(f"criterion {criterion!r} must return a bool tensor of shape ({batch},), "
                        f"got {what}")
    if tuple(done.shape) != (batch,):
        raise ValueError(f"criterion {criterion!r} must return a bool tensor of shape ({batch},), "
                         f"got shape {tuple(done.shape)}")
    return done


class MaxProbability:
    """Exit when the largest softmax probability is ``>= threshold``.

    ``threshold`` is a number >= 0; values above 1 are never reached, so every sample runs to the
    final exit (early exits switched off).
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = check_number(threshold, "threshold", minimum=0.0)

    def __call__(self, logits: Tensor, memory: dict[str, Tensor]) -> Tensor:
        _check_logits(logits, "MaxProbability")
        confidence = torch.softmax(logits.float(), dim=-1).amax(dim=-1)  # (b,)
        return confidence >= self.threshold

    def __repr__(self) -> str:
        return f"MaxProbability(threshold={self.threshold})"


class Entropy:
    """Exit when the entropy of the softmax distribution, in nats, is ``<= threshold``.

    ``threshold`` is a number >= 0; the entropy of C classes lies in ``[0, log C]``, so
    ``threshold >= log C`` makes every sample exit at the first exit.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = check_number(threshold, "threshold", minimum=0.0)

    def __call__(self, logits: Tensor, memory: dict[str, Tensor]) -> Tensor:
        _check_logits(logits, "Entropy")
        log_p = torch.log_softmax(logits.float(), dim=-1)  # (b, C)
        entropy = -(log_p.exp() * log_p).sum(dim=-1)  # (b,); p log p -> 0 as p -> 0
        return entropy <= self.threshold

    def __repr__(self) -> str:
        return f"Entropy(threshold={self.threshold})"


class Patience:
    """PABEE: exit once the argmax has stayed unchanged across ``patience`` consecutive exit
    transitions (module docstring). ``patience`` is an int >= 1.

    Keeps ``memory["patience_pred"]`` (argmax at the previous exit, (b,) int64) and
    ``memory["patience_count"]`` (the counter, (b,) int64).
    """

    def __init__(self, patience: int) -> None:
        self.patience = check_int(patience, "patience", 1)

    def __call__(self, logits: Tensor, memory: dict[str, Tensor]) -> Tensor:
        _check_logits(logits, "Patience")
        pred = logits.argmax(dim=-1)  # (b,)
        previous = memory.get("patience_pred")
        if previous is None:
            count = torch.zeros_like(pred)
        else:
            count = torch.where(pred == previous, memory["patience_count"] + 1, 0)
        memory["patience_pred"] = pred
        memory["patience_count"] = count
        return count >= self.patience

    def __repr__(self) -> str:
        return f"Patience(patience={self.patience})"



#: the criteria by name (the config key ``exit_criterion``, the ``padnet tradeoff`` sweep)
CRITERIA: dict[str, type] = {"max_prob": MaxProbability, "entropy": Entropy,
                             "patience": Patience}
#: the threshold of each criterion when none is given
DEFAULT_THRESHOLDS: dict[str, float] = {"max_prob": 0.9, "entropy": 0.5, "patience": 2}


def make_criterion(name: str, threshold: float | None = None) -> ExitCriterion:
    """The criterion called ``name`` (:data:`CRITERIA`) at ``threshold`` (the probability,
    the entropy in nats, or the patience, an integer >= 1); :data:`DEFAULT_THRESHOLDS` when
    None."""
    if name not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {name!r}")
    value = DEFAULT_THRESHOLDS[name] if threshold is None else threshold
    if name == "patience":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return Patience(check_int(value, "patience", 1))
    return CRITERIA[name](value)


def criterion_record(criterion: object) -> dict | None:
    """``{"name": ..., "threshold": ...}`` of a criterion :func:`make_criterion` can rebuild,
    None for any other (or None)."""
    for name, cls in CRITERIA.items():
        if type(criterion) is cls:
            value = criterion.patience if name == "patience" else criterion.threshold
            return {"name": name, "threshold": value}
    return None
