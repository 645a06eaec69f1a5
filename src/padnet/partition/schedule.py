"""Schedules of Iterative Mode Partition (docs/method.md §4): the target ratio of each iteration and
the training step at which it runs.

Over T iterations ``t = 1..T`` the dynamic ratio falls from 1 towards the target ``kappa``:

* ``exponential`` (the authors' default): ``kappa_t = kappa ** (t / T)``;
* ``linear``: ``kappa_t = 1 - (1 - kappa) * t / T``.

Both end exactly at ``kappa_T = kappa``. In interleaved mode the T iterations are spread evenly
over the training window ``(start_step, end_step]``: iteration t runs once
``step_t = start_step + round(t * (end_step - start_step) / T)`` training steps are done, so the
network trains for ``(end_step - start_step) / T`` steps before each iteration and the last one
(which freezes the mask) runs at ``end_step``.
"""

from __future__ import annotations

from padnet.utils.checks import check_choice, check_int, check_ratio

__all__ = ["SCHEDULES", "iteration_steps", "kappa_schedule"]

#: Names of the ratio schedules.
SCHEDULES = ("exponential", "linear")


def kappa_schedule(
    dynamic_ratio: float, iterations: int, schedule: str = "exponential"
) -> list[float]:
    """Target dynamic ratios ``[kappa_1, ..., kappa_T]``; the last equals ``dynamic_ratio``.

    Raises ValueError for a ratio outside [0, 1], ``iterations < 1`` or an unknown schedule.
    """
    kappa = check_ratio(dynamic_ratio, "dynamic_ratio")
    t_max = check_int(iterations, "iterations", 1)
    check_choice(schedule, "schedule", SCHEDULES)
    if schedule == "exponential":
        kappas = [kappa ** (t / t_max) for t in range(1, t_max + 1)]
    else:
        kappas = [1.0 - (1.0 - kappa) * t / t_max for t in range(1, t_max + 1)]
    kappas[-1] = kappa  # exact end point, free of rounding
    return kappas


def iteration_steps(iterations: int, start_step: int = 0, end_step: int = 0) -> list[int]:
    """Training steps ``[step_1, ..., step_T]`` after which iteration t is due (non-decreasing,
    ``step_T == end_step``). With ``start_step == end_step`` every iteration is due at once."""
    t_max = check_int(iterations, "iterations", 1)
    start = check_int(start_step, "start_step", 0)
    end = check_int(end_step, "end_step", 0)
    if end < start:
        raise ValueError(f"end_step must be >= start_step={start}, got {end}")
    return [start + round(t * (end - start) / t_max) for t in range(1, t_max + 1)]
