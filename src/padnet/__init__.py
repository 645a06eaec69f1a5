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


def __getattr__(name: str) -> object:  # lazy attributes (PEP 562)
    """``padnet.from_pretrained``: :func:`padnet.integrations.hf_io.load_pretrained`, imported
    on first use so that ``import padnet`` does not import transformers."""
    if name == "from_pretrained":
        from padnet.integrations.hf_io import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'padnet' has no attribute {name!r}")


__all__ = [
    "DynamicConv2d",
    "ModeMask",
    "MoE",
    "ODConv2d",
    "__version__",
    "aux_loss",
    "dynamize",
    "export",
    "from_pretrained",
    "load",
    "partition_model",
    "save",
    "set_scale_mode",
    "set_temperature",
    "stats",
    "temperature_schedule",
]
