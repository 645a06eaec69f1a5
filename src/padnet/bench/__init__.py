"""Benchmark helpers: side-by-side latency, and what machine a figure was measured on."""

from padnet.bench.device import device_description
from padnet.bench.timing import measure_latency

__all__ = ["device_description", "measure_latency"]
