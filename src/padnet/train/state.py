"""The counters and records of the training loop, saved in every checkpoint as plain data."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

__all__ = ["SUM_KEYS", "LoopState", "StepStats", "format_row", "zero_sums"]

#: the running sums of an epoch: summed loss, summed auxiliary loss, correct predictions, examples
SUM_KEYS = ("loss", "aux", "correct", "count")


def zero_sums() -> dict[str, float]:
    """Running sums at the start of an epoch."""
    return dict.fromkeys(SUM_KEYS, 0.0)


@dataclass(frozen=True)
class StepStats:
    """What one training step adds to the epoch's sums (per-example means times ``count``)."""

    loss: float
    aux: float
    correct: float
    count: int


@dataclass
class LoopState:
    """Where the loop stands: steps done, the epoch and the step within it, this epoch's running
    sums (this process's share, or the sum over ranks in a checkpoint), one history row per
    finished epoch, whether one-shot IMP ran, the training time so far and the training time of
    the current epoch (summed over its parts when checkpoints or a resume split it)."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    sums: dict[str, float] = field(default_factory=zero_sums)
    history: list[dict[str, Any]] = field(default_factory=list)
    oneshot_done: bool = False
    train_time_s: float = 0.0
    epoch_time_s: float = 0.0

    def add_step(self, stats: StepStats) -> None:
        """Count one optimizer step and add its numbers to the sums."""
        n = stats.count
        self.sums["loss"] += stats.loss * n
        self.sums["aux"] += stats.aux * n
        self.sums["correct"] += stats.correct
        self.sums["count"] += n
        self.global_step += 1
        self.step_in_epoch += 1

    def global_sums(self, device: torch.device | str = "cpu") -> dict[str, float]:
        """The epoch's sums added over ranks (a collective: every rank must call it)."""
        from padnet.train.distributed import all_reduce_sum

        local = torch.tensor([self.sums[k] for k in SUM_KEYS], dtype=torch.float64,
                             device=device)
        return dict(zip(SUM_KEYS, all_reduce_sum(local).tolist(), strict=True))

    def mean_loss(self) -> float:
        """Mean training loss of this epoch so far (this process)."""
        return self.sums["loss"] / max(self.sums["count"], 1)

    def add_time(self, seconds: float) -> None:
        """Count ``seconds`` of training in this epoch and in the run."""
        self.train_time_s += seconds
        self.epoch_time_s += seconds

    def end_epoch(self, row: dict[str, Any]) -> None:
        """Record the epoch's row and move to the next epoch."""
        self.history.append(row)
        self.epoch += 1
        self.step_in_epoch = 0
        self.sums = zero_sums()
        self.epoch_time_s = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable) for a checkpoint."""
        return {"global_step": self.global_step, "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch, "sums": dict(self.sums),
                "history": [dict(row) for row in self.history],
                "oneshot_done": self.oneshot_done, "train_time_s": self.train_time_s,
                "epoch_time_s": self.epoch_time_s}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopState:
        """Inverse of :meth:`to_dict`; ValueError when a field is missing (``epoch_time_s``,
        absent from older checkpoints, counts from 0)."""
        missing = [f.name for f in fields(cls) if f.name not in data and f.name != "epoch_time_s"]
        if missing:
            raise ValueError(f"the checkpoint's loop state lacks {missing}")
        sums = {k: float(data["sums"][k]) for k in SUM_KEYS}
        return cls(int(data["global_step"]), int(data["epoch"]), int(data["step_in_epoch"]),
                   sums, [dict(row) for row in data["history"]], bool(data["oneshot_done"]),
                   float(data["train_time_s"]), float(data.get("epoch_time_s", 0.0)))


def format_row(row: dict[str, Any], epochs: int) -> str:
    """One history row as the line printed after an epoch."""
    parts = [f"epoch {row['epoch']}/{epochs}", f"train loss {row['train_loss']:.4f}",
             f"acc {row['train_acc']:.4f}"]
    for split in ("val", "test"):
        if f"{split}_acc" in row:
            parts.append(f"{split} acc {row[f'{split}_acc']:.4f} f1 {row[f'{split}_f1']:.4f} "
                         f"mcc {row[f'{split}_mcc']:.4f}")
    if row.get("dynamic_ratio") is not None:
        parts.append(f"kappa {row['dynamic_ratio']:.3f}")
    parts.append(f"{row['epoch_time_s']:.1f}s")
    return " | ".join(parts)
