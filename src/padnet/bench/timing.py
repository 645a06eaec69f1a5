"""Side-by-side latency: models timed on the same inputs with interleaved repetitions."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

__all__ = ["measure_latency"]


def _forward(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _sync(inputs: Any) -> None:
    first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs
    if first.is_cuda:
        torch.cuda.synchronize(first.device)


@torch.no_grad()
def measure_latency(models: dict[str, nn.Module], inputs: Any, *, reps: int = 20,
                    warmup: int = 2) -> dict[str, float]:
    """Median forward time in milliseconds of each model on ``inputs`` (a tensor, or a dict of
    keyword arguments), eval mode, repetitions interleaved across models (their order rotated
    every round). Each model's train/eval mode is restored afterwards."""
    names = list(models)
    modes = {n: m.training for n, m in models.items()}
    times: dict[str, list[float]] = {n: [] for n in names}
    try:
        for m in models.values():
            m.eval()
            for _ in range(warmup):
                _forward(m, inputs)
        for r in range(reps):
            for name in names[r % len(names):] + names[: r % len(names)]:
                _sync(inputs)
                start = time.perf_counter()
                _forward(models[name], inputs)
                _sync(inputs)
                times[name].append(time.perf_counter() - start)
    finally:
        for n, m in models.items():
            m.train(modes[n])
    return {n: statistics.median(t) * 1e3 for n, t in times.items()}
