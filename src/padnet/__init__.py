"""padnet: partially dynamic networks (PAD-Net) and conditional computation in PyTorch."""

from padnet.convert import dynamize, stats
from padnet.layers import (
    DynamicConv2d,
    ModeMask,
    ODConv2d,
    set_scale_mode,
    set_temperature,
    temperature_schedule,
)

__version__ = "0.1.0"

__all__ = [
    "DynamicConv2d",
    "ModeMask",
    "ODConv2d",
    "__version__",
    "dynamize",
    "set_scale_mode",
    "set_temperature",
    "stats",
    "temperature_schedule",
]
