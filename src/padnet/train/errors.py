"""The errors a training run reports to its user (``padnet`` prints their message, no traceback).

The ValueErrors are problems the user can fix by changing the config, the data or the command
(status 2 from ``padnet``); :class:`TrainingInterrupted` is a KeyboardInterrupt that says where
the run stands and how to resume it (status 130).
"""

from __future__ import annotations

__all__ = ["ConfigMismatch", "TrainingDiverged", "TrainingInterrupted"]


class TrainingDiverged(ValueError):
    """The loss or the weights became NaN or infinite; nothing from that step on was saved."""


class ConfigMismatch(ValueError):
    """A resume asked for another experiment than the run's own config (the differences are
    listed in the message)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message names the last checkpoint and the resume command."""
