"""Conditional computation beyond dynamic parameters (docs/method.md §6): early exits,
token selection and token merging."""

from padnet.conditional.backbones import ClsHead, PoolHead
from padnet.conditional.criteria import Entropy, ExitCriterion, MaxProbability, Patience
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
    merge_tokens,
    proportional_attention,
    select_tokens,
    select_topk_tokens,
    token_report,
)

__all__ = [
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
    "exit_decisions",
    "exit_loss",
    "exit_report",
    "merge_tokens",
    "proportional_attention",
    "select_tokens",
    "select_topk_tokens",
    "token_report",
]
