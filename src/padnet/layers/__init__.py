"""Neural network layers: PAD mechanism, dynamic convolutions, routers."""

from padnet.layers.aux import aux_loss
from padnet.layers.dynamic_conv import DynamicConv2d, PerSampleConv2d
from padnet.layers.moe import MoE
from padnet.layers.odconv import ODConv2d
from padnet.layers.pad import SCALE_MODES, ModeMask, mask_from_scores, pad_modules, set_scale_mode
from padnet.layers.routing import (
    ConvRouter,
    ODAttention,
    ODConvRouter,
    set_temperature,
    temperature_schedule,
)

__all__ = [
    "SCALE_MODES",
    "ConvRouter",
    "DynamicConv2d",
    "MoE",
    "ModeMask",
    "ODAttention",
    "ODConv2d",
    "ODConvRouter",
    "PerSampleConv2d",
    "aux_loss",
    "mask_from_scores",
    "pad_modules",
    "set_scale_mode",
    "set_temperature",
    "temperature_schedule",
]
