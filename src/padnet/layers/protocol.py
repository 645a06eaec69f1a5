"""The PAD-layer protocol: what every partially dynamic layer shows the rest of the library.

A partially dynamic layer (dynamic convolution, ODConv, MoE, or a new kind) subclasses
:class:`PadLayer` and implements two methods (docs/method.md §2):

* :meth:`PadLayer.pad_weights` -- its PAD weights: for each, the mode mask
  (:class:`~padnet.layers.pad.ModeMask`: mask and scale factors), the dynamic factors
  ``W_1..W_K`` ``(K, *shape)`` and the static weight ``W_s`` ``(*shape)``;
* :meth:`PadLayer.theta_terms` -- for the routing of one batch, the terms of the fully dynamic
  weight ``Theta_hat(x)`` of each PAD weight (:class:`ThetaTerms`).

and calls :meth:`PadLayer.emit_routing` in its forward with the routing it used. Whoever needs
``Theta_hat`` (partitioning, analysis) registers a routing hook; the layer keeps no state for it.
:func:`find_pad_layers` and :func:`find_pad_weights` are the one way the library finds them in a
model: statistics, partitioning, reports and export all use them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from padnet.layers.pad import SCALE_MODE_ALIASES, SCALE_MODES, ModeMask
from padnet.utils.checks import check_choice

__all__ = ["PadLayer", "PadWeight", "RoutingHook", "ThetaTerms", "find_pad_layers",
           "find_pad_weights", "mode_masks", "qualified_name", "set_scale_mode"]


@dataclass(frozen=True)
class PadWeight:
    """One partially dynamic weight.

    ``name`` is the weight's name within its layer (``''`` for a layer's only PAD weight) as
    returned by :meth:`PadLayer.pad_weights`, or its qualified name in the model (the layer's
    name, plus ``.name`` when not empty) as returned by :func:`find_pad_weights`.
    """

    name: str
    mode_mask: ModeMask
    dynamic: Tensor  # (K, *shape): the dynamic factors W_1..W_K
    static: Tensor  # (*shape): the static weight W_s

    @property
    def num_factors(self) -> int:
        """K, the number of dynamic factors (kernels or experts)."""
        return int(self.dynamic.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return self.mode_mask.shape


@dataclass(frozen=True)
class ThetaTerms:
    """``Theta_hat(x)`` of the ``n`` samples or tokens of one batch, for one PAD weight, in one of
    two forms: ``coeffs (n, K)`` with ``Theta_hat = coeffs @ W`` over the dynamic factors (the
    cheap form: statistics come from ``coeffs`` without materialising ``n`` weights), or the
    weights themselves, ``theta (n, *shape)``."""

    coeffs: Tensor | None = None
    theta: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.coeffs is None) == (self.theta is None):
            raise ValueError("ThetaTerms takes exactly one of coeffs and theta")


#: ``hook(layer, routing)``, called by :meth:`PadLayer.emit_routing` during the forward.
RoutingHook = Callable[["PadLayer", Any], None]


class PadLayer(nn.Module):
    """Base class of partially dynamic layers (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._routing_hooks: OrderedDict[int, RoutingHook] = OrderedDict()  # weak-referable

    def pad_weights(self) -> list[PadWeight]:
        """The layer's PAD weights (names local to the layer), in a fixed order."""
        raise NotImplementedError

    def theta_terms(self, routing: Any) -> list[ThetaTerms]:
        """The terms of ``Theta_hat`` for ``routing`` as passed to :meth:`emit_routing`, one per
        PAD weight in the order of :meth:`pad_weights`."""
        raise NotImplementedError

    def register_routing_hook(self, hook: RoutingHook) -> RemovableHandle:
        """Call ``hook(layer, routing)`` on every forward from now on; ``.remove()`` the
        returned handle to stop. Hooks are not saved with the layer."""
        handle = RemovableHandle(self._routing_hooks)
        self._routing_hooks[handle.id] = hook
        return handle

    def emit_routing(self, routing: Any) -> None:
        """Hand this forward's routing to the registered hooks (a no-op without hooks)."""
        for hook in list(self._routing_hooks.values()):
            hook(self, routing)

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state["_routing_hooks"] = OrderedDict()  # copies do not inherit observers
        return state


def find_pad_layers(model: nn.Module) -> list[tuple[str, PadLayer]]:
    """Every :class:`PadLayer` of ``model`` with its qualified name, in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PadLayer)]


def qualified_name(layer_name: str, layer: PadLayer, weight_name: str) -> str:
    """Name of a PAD weight in a model: the layer's qualified name, plus ``.weight_name`` when
    the layer has several (the layer's class name for a layer that is the model itself)."""
    name = ".".join(p for p in (layer_name, weight_name) if p)
    return name or type(layer).__name__


def find_pad_weights(model: nn.Module) -> list[PadWeight]:
    """Every PAD weight of ``model`` with its qualified name, in module order; shapes checked."""
    found = []
    for layer_name, layer in find_pad_layers(model):
        for w in layer.pad_weights():
            mask = w.mode_mask
            if tuple(w.dynamic.shape[1:]) != mask.shape or tuple(w.static.shape) != mask.shape:
                raise ValueError(
                    f"{type(layer).__name__}.pad_weights(): weight {w.name!r} has dynamic "
                    f"factors {tuple(w.dynamic.shape)} and static weight "
                    f"{tuple(w.static.shape)}, which do not fit its mask {mask.shape}")
            found.append(replace(w, name=qualified_name(layer_name, layer, w.name)))
    return found


def mode_masks(model: nn.Module) -> list[tuple[str, ModeMask]]:
    """``(qualified PAD-weight name, ModeMask)`` of every PAD weight of ``model``."""
    return [(w.name, w.mode_mask) for w in find_pad_weights(model)]


def set_scale_mode(model: nn.Module, scale_mode: str) -> int:
    """Set the scale-factor mode of every PAD weight in ``model``; returns how many changed."""
    check_choice(SCALE_MODE_ALIASES.get(scale_mode, scale_mode), "scale_mode", SCALE_MODES)
    masks = mode_masks(model)
    for _, m in masks:
        m.set_scale_mode(scale_mode)
    return len(masks)
