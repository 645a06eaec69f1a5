"""Activations of feed-forward experts, by name or as a callable."""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "activation_key", "resolve_activation"]

#: Activations by name; ``gelu`` is the exact (erf) GELU of PyTorch and Hugging Face BERT.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def resolve_activation(
    activation: str | Callable[[Tensor], Tensor],
) -> tuple[str, Callable[[Tensor], Tensor]]:
    """``(display name, callable)`` of a name from :data:`ACTIVATIONS` or a callable. An in-place
    ``nn.Module`` activation is copied with ``inplace=False`` (the backward needs its input)."""
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)} or a callable, "
                             f"got {activation!r}")
        return activation, ACTIVATIONS[activation]
    if not callable(activation):
        raise TypeError(f"activation must be a string or a callable, got {activation!r}")
    if isinstance(activation, nn.Module) and getattr(activation, "inplace", False):
        activation = copy.copy(activation)
        activation.inplace = False
    return type(activation).__name__, activation


#: Module classes (by class name) whose function is one of :data:`ACTIVATIONS`.
_MODULE_KEYS = {"ReLU": "relu", "SiLU": "silu", "Tanh": "tanh", "GELUActivation": "gelu",
                "NewGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh",
                "SiLUActivation": "silu"}


def activation_key(activation: Callable[[Tensor], Tensor]) -> str | None:
    """The :data:`ACTIVATIONS` name computing the same function as ``activation`` (a function of
    the table, or a known parameter-free module), or None when there is none."""
    for name, fn in ACTIVATIONS.items():
        if activation is fn:
            return name
    if isinstance(activation, nn.GELU):
        return "gelu" if activation.approximate == "none" else "gelu_tanh"
    if isinstance(activation, nn.Module) and not any(True for _ in activation.parameters()):
        return _MODULE_KEYS.get(type(activation).__name__)
    return None
