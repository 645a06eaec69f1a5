"""padnet: partially dynamic networks (PAD-Net) and conditional computation in PyTorch."""

from padnet.convert import dynamize, stats
from padnet.deploy import export, load, save
from padnet.layers import (
    DynamicConv2d,
    ModeMask,
    MoE,
    ODConv2d,
    aux_loss,
    set_scale_mode,
    set_temperature,
    temperature_schedule,
)
from padnet.partition import partition_model

__version__ = "0.1.0"

__all__ = [
    "DynamicConv2d",
    "ModeMask",
    "MoE",
    "ODConv2d",
    "__version__",
    "aux_loss",
    "dynamize",
    "export",
    "load",
    "partition_model",
    "save",
    "set_scale_mode",
    "set_temperature",
    "stats",
    "temperature_schedule",
]
