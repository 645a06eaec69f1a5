"""Model surgery: dynamic conversion, parameter statistics."""

from padnet.convert.dynamize import METHODS, dynamize
from padnet.convert.report import ConversionEntry, ConversionReport
from padnet.convert.stats import LayerStats, ModelStats, stats

__all__ = [
    "METHODS",
    "ConversionEntry",
    "ConversionReport",
    "LayerStats",
    "ModelStats",
    "dynamize",
    "stats",
]
