"""One line describing the device a benchmark ran on, recorded next to every figure."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def device_description(*, load: bool = True) -> str:
    """CPU model, thread count, torch version, GPU (when CUDA is available) and load average."""
    cpu = platform.processor() or "unknown CPU"
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    parts = [cpu, f"{torch.get_num_threads()} threads", f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name()}")
    avg = _read("/proc/loadavg").split()
    if load and avg:
        parts.append(f"1-min load average {avg[0]}")
    return ", ".join(parts)
