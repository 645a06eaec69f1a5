"""How busy the rest of the machine was while a benchmark ran (read from ``/proc/stat``), so
that results files can say whether other processes competed for the cores."""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["OtherLoad", "busy_seconds"]


def busy_seconds() -> float:
    """CPU seconds all processes of the machine have been busy (from /proc/stat; 0 if absent)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Share of the machine's CPU time used by other processes while a block runs (0..1):
    ``with OtherLoad() as load: ...; load.share``. ``cores`` defaults to the usable cores."""

    def __init__(self, cores: int | None = None) -> None:
        if cores is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
                else os.cpu_count() or 1
        self.cores = cores
        self.share = 0.0

    def __enter__(self) -> OtherLoad:
        self.t0, self.busy0, self.own0 = time.perf_counter(), busy_seconds(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.t0
        other = (busy_seconds() - self.busy0) - (time.process_time() - self.own0)
        self.share = max(0.0, other) / max(wall * self.cores, 1e-9)
