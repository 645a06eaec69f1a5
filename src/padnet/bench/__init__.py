"""Benchmark helpers: what machine a figure was measured on."""

from padnet.bench.device import device_description

__all__ = ["device_description"]
