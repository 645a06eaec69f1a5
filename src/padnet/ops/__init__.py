"""Stateless tensor functions: MoE routing and expert dispatch."""

from padnet.ops import dispatch, routing

__all__ = ["dispatch", "routing"]
