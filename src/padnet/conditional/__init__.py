"""Conditional computation beyond dynamic parameters (docs/method.md §6.1): early exits,
token selection and token merging; :mod:`padnet.conditional.tradeoff` sweeps their settings
for accuracy against FLOPs and latency."""

from padnet.conditional.backbones import ClsHead, PoolHead
from padnet.conditional.criteria import (
    CRITERIA,
    Entropy,
    ExitCriterion,
    MaxProbability,
    Patience,
    make_criterion,
)
from padnet.conditional.exits import (
    EarlyExitModel,
    ExitOutput,
    add_exits,
    exit_decisions,
    exit_loss,
)
from padnet.conditional.report import ExitReport, exit_report
from padnet.conditional.tokens import (
    LayerTokens,
    TokenReport,
    bipartite_merge,
    bypass_tokens,
    eager_attention,
    merge_tokens,
    proportional_attention,
    select_tokens,
    select_topk_tokens,
    token_report,
)

__all__ = [
    "CRITERIA",
    "ClsHead",
    "EarlyExitModel",
    "Entropy",
    "ExitCriterion",
    "ExitOutput",
    "ExitReport",
    "LayerTokens",
    "MaxProbability",
    "Patience",
    "PoolHead",
    "TokenReport",
    "add_exits",
    "bipartite_merge",
    "bypass_tokens",
    "eager_attention",
    "exit_decisions",
    "exit_loss",
    "exit_report",
    "make_criterion",
    "merge_tokens",
    "proportional_attention",
    "select_tokens",
    "select_topk_tokens",
    "token_report",
]
