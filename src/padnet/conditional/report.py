"""What early exits buy: accuracy per exit, exit rates and average compute per sample
(docs/method.md §6).

Compute is counted in FLOPs of one sample (``torch.utils.flop_counter.FlopCounterMode``, see
:meth:`~padnet.conditional.exits.EarlyExitModel.exit_flops`). A sample that takes exit ``k`` pays
for segments ``0..k`` and for heads ``0..k`` (every earlier head ran and said "go on")::

    flops_to_exit[k] = sum_{i<=k} (segment_i + head_i)
    average_flops    = sum_k rate_k * flops_to_exit[k]
    full_flops       = sum_i segment_i + head_final          (the host model alone)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from padnet.conditional.criteria import ExitCriterion
from padnet.conditional.exits import EarlyExitModel

__all__ = ["ExitReport", "exit_report"]


@dataclass
class ExitReport:
    """Per-exit results on a data set; lists hold one entry per exit, the final exit last."""

    exit_points: list[str]  # unit names of the exits, then "final"
    num_samples: int
    counts: list[int]  # samples that took each exit
    rates: list[float]  # counts / num_samples
    exit_accuracy: list[float]  # accuracy of each exit's head on every sample
    accuracy_at_exit: list[float]  # accuracy on the samples that took the exit (nan if none)
    accuracy: float  # accuracy of the early-exit predictions
    segment_flops: list[int]  # one sample, segment i alone
    head_flops: list[int]  # one sample, head i alone
    flops_to_exit: list[int]  # one sample leaving at exit k (cumulative)
    full_flops: int  # one sample through the host model alone
    average_flops: float  # expected FLOPs per sample under the observed exit rates

    @property
    def speedup(self) -> float:
        """``full_flops / average_flops`` (inf when nothing was counted)."""
        return self.full_flops / self.average_flops if self.average_flops > 0 else math.inf

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"speedup": self.speedup}

    def __str__(self) -> str:
        rows = [f"{'exit':<24}{'rate':>8}{'acc(all)':>10}{'acc(taken)':>12}{'FLOPs':>14}"]
        for i, name in enumerate(self.exit_points):
            rows.append(f"{name:<24}{self.rates[i]:>8.3f}{self.exit_accuracy[i]:>10.4f}"
                        f"{self.accuracy_at_exit[i]:>12.4f}{self.flops_to_exit[i]:>14,}")
        rows.append(f"early-exit accuracy {self.accuracy:.4f} on {self.num_samples} samples; "
                    f"average FLOPs {self.average_flops:,.0f} vs {self.full_flops:,} for the "
                    f"full model (x{self.speedup:.2f})")
        return "\n".join(rows)


def _single_batch(data: Any) -> bool:
    if isinstance(data, Mapping):
        return True
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(t, Tensor) for t in data))


def _split(batch: Any, device: torch.device) -> tuple[Any, Tensor]:
    """``(inputs, targets)`` of an ``(x, y)`` batch or a dict batch with ``labels``."""
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise ValueError(f"a dict batch needs 'labels'; it has {sorted(batch)}")
        inputs = {k: v.to(device) if isinstance(v, Tensor) else v
                  for k, v in batch.items() if k != "labels"}
        return inputs, batch["labels"].to(device)
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], Tensor):
        x = batch[0].to(device) if isinstance(batch[0], Tensor) else batch[0]
        return x, batch[1].to(device)
    raise TypeError("batches must be (inputs, targets) pairs or dicts with 'labels', got "
                    f"{type(batch).__name__}")


def _call(fn: Any, inputs: Any) -> Any:
    return fn(**inputs) if isinstance(inputs, Mapping) else fn(inputs)


@torch.no_grad()
def exit_report(model: EarlyExitModel, data: Any,
                criterion: ExitCriterion | None = None) -> ExitReport:
    """Evaluate ``model`` (in eval mode, restored afterwards) on ``data``: an ``(inputs,
    targets)`` pair of tensors, a dict batch with ``labels``, or an iterable of such batches
    (a DataLoader). ``criterion`` defaults to ``model.criterion``.

    Each batch runs twice: the full forward (every exit's accuracy) and
    :meth:`~padnet.conditional.exits.EarlyExitModel.infer` (the exits actually taken). FLOPs are
    measured on the first sample of the first batch (for text: at that batch's padded length).
    """
    if not isinstance(model, EarlyExitModel):
        raise TypeError(f"model must be an EarlyExitModel (see add_exits), got "
                        f"{type(model).__name__}")
    batches: Iterable[Any] = [data] if _single_batch(data) else data
    if not isinstance(batches, Iterable):
        raise TypeError(f"data must be a batch or an iterable of batches, got "
                        f"{type(data).__name__}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    n_exits = model.num_exits
    correct_all = torch.zeros(n_exits, dtype=torch.long)
    counts = torch.zeros(n_exits, dtype=torch.long)
    correct_taken = torch.zeros(n_exits, dtype=torch.long)
    total, first = 0, None
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            inputs, targets = _split(batch, device)
            if first is None:
                first = inputs
            for i, logits in enumerate(_call(model, inputs)):
                correct_all[i] += int((logits.argmax(-1) == targets).sum())
            out = _call(lambda *a, **k: model.infer(*a, criterion=criterion, **k), inputs)
            hit = (out.logits.argmax(-1) == targets).cpu()
            taken = out.exit_index.cpu()
            counts += torch.bincount(taken, minlength=n_exits)
            correct_taken += torch.bincount(taken, weights=hit.double(),
                                            minlength=n_exits).round().long()
            total += int(targets.numel())
        if total == 0:
            raise ValueError("data holds no samples")
        segments, heads = _call(model.exit_flops, first)
    finally:
        model.train(was_training)
    return _assemble(model, total, counts, correct_all, correct_taken, segments, heads)


def _assemble(model: EarlyExitModel, total: int, counts: Tensor, correct_all: Tensor,
              correct_taken: Tensor, segments: list[int], heads: list[int]) -> ExitReport:
    rates = [int(c) / total for c in counts]
    to_exit, running = [], 0
    for seg, head in zip(segments, heads, strict=True):
        running += seg + head
        to_exit.append(running)
    return ExitReport(
        exit_points=[*model.exit_points, "final"],
        num_samples=total,
        counts=[int(c) for c in counts],
        rates=rates,
        exit_accuracy=[int(c) / total for c in correct_all],
        accuracy_at_exit=[int(h) / int(c) if int(c) else math.nan
                          for h, c in zip(correct_taken, counts, strict=True)],
        accuracy=int(correct_taken.sum()) / total,
        segment_flops=segments,
        head_flops=heads,
        flops_to_exit=to_exit,
        full_flops=sum(segments) + heads[-1],
        average_flops=sum(r * f for r, f in zip(rates, to_exit, strict=True)),
    )
