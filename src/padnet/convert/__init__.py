"""Model surgery: dynamic conversion (a table of methods), parameter statistics."""

from padnet.convert.dynamize import dynamize
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
    "METHODS",
    "ConversionEntry",
    "ConversionReport",
    "LayerStats",
    "Method",
    "ModelStats",
    "dynamize",
    "dynamize_moe",
    "get_method",
    "method_names",
    "register_method",
    "replace_modules",
    "stats",
]
