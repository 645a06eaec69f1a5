"""Model surgery: dynamic conversion (a table of methods, a table of FFN layouts for MoE
upcycling), parameter statistics."""

from padnet.convert.dynamize import dynamize
from padnet.convert.ffn_layouts import FFN_LAYOUTS, FFNLayout, register_ffn_layout
from padnet.convert.methods import (
    METHODS,
    Method,
    get_method,
    method_names,
    register_method,
    replace_modules,
)
from padnet.convert.moe import dynamize_moe
from padnet.convert.report import ConversionEntry, ConversionReport
from padnet.convert.stats import LayerStats, ModelStats, stats

__all__ = [
    "FFN_LAYOUTS",
    "METHODS",
    "ConversionEntry",
    "ConversionReport",
    "FFNLayout",
    "LayerStats",
    "Method",
    "ModelStats",
    "dynamize",
    "dynamize_moe",
    "get_method",
    "method_names",
    "register_ffn_layout",
    "register_method",
    "replace_modules",
    "stats",
]
