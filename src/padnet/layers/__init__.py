"""Neural network layers: the PAD mechanism and protocol, dynamic convolutions, MoE, routers."""

from padnet.layers.auxiliary import aux_loss, aux_losses
from padnet.layers.dynamic_conv import DynamicConv2d
from padnet.layers.moe import MoE, MoERouting
from padnet.layers.odconv import ODConv2d
from padnet.layers.pad import SCALE_MODE_ALIASES, SCALE_MODES, ModeMask, mask_from_scores
from padnet.layers.pad_conv import INITS, PadConv2d
from padnet.layers.protocol import (
    PadLayer,
    PadWeight,
    ThetaTerms,
    find_pad_layers,
    find_pad_weights,
    mode_masks,
    set_scale_mode,
)
from padnet.layers.routing import (
    ConvRouter,
    ODAttention,
    ODConvRouter,
    set_temperature,
    temperature_schedule,
)

__all__ = [
    "INITS",
    "SCALE_MODES",
    "SCALE_MODE_ALIASES",
    "ConvRouter",
    "DynamicConv2d",
    "MoE",
    "MoERouting",
    "ModeMask",
    "ODAttention",
    "ODConv2d",
    "ODConvRouter",
    "PadConv2d",
    "PadLayer",
    "PadWeight",
    "ThetaTerms",
    "aux_loss",
    "aux_losses",
    "find_pad_layers",
    "find_pad_weights",
    "mask_from_scores",
    "mode_masks",
    "set_scale_mode",
    "set_temperature",
    "temperature_schedule",
]
