"""Model registry: ``register_model`` decorator, ``list_models`` and ``create_model``.

A builder is a function ``builder(*, num_classes, in_chans, **kwargs) -> nn.Module`` registered
under its own name (or an explicit one). ``create_model`` validates the common arguments, calls the
builder, and loads pretrained weights through :mod:`padnet.models.pretrained` when asked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from padnet.models.pretrained import PRETRAINED_WEIGHTS, load_pretrained
from padnet.registry import Registry
from padnet.utils.checks import check_int

__all__ = ["MODELS", "create_model", "list_models", "register_model"]

ModelBuilder = Callable[..., nn.Module]

#: The model table: name -> builder.
MODELS: Registry[ModelBuilder] = Registry("model")


def register_model(
    fn: ModelBuilder | None = None, *, name: str | None = None
) -> ModelBuilder | Callable[[ModelBuilder], ModelBuilder]:
    """Register a model builder under ``name`` (default: the function's ``__name__``).

    Usable bare (``@register_model``) or with a name (``@register_model(name="resnet20_wide")``).
    Registering a name twice raises ValueError.
    """

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        return MODELS.register(name if name is not None else builder.__name__, builder)

    return decorator(fn) if fn is not None else decorator


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered model names, filtered by an fnmatch ``pattern`` (e.g. "resnet*")."""
    return sorted(MODELS.names(pattern))


def create_model(
    name: str,
    *,
    num_classes: int = 1000,
    in_chans: int = 3,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build the registered model ``name``.

    Args:
        name: a name from :func:`list_models`.
        num_classes: size of the classifier output, the model maps (B, in_chans, H, W) to
            (B, num_classes).
        in_chans: number of input channels.
        pretrained: load the reference weights (see :mod:`padnet.models.pretrained`); with a
            different ``num_classes`` the classifier stays freshly initialised, with a different
            ``in_chans`` the stem weight is adapted.
        **kwargs: builder-specific options (``width`` for ResNets, ``width_mult`` and ``dropout``
            for MobileNetV2).
    """
    builder = MODELS.get(name)
    check_int(num_classes, "num_classes", 1)
    check_int(in_chans, "in_chans", 1)
    if pretrained and name not in PRETRAINED_WEIGHTS:
        raise ValueError(
            f"model {name!r} has no pretrained weights (pretrained=True); models with weights: "
            f"{', '.join(sorted(PRETRAINED_WEIGHTS))}"
        )
    model = builder(num_classes=num_classes, in_chans=in_chans, **kwargs)
    if pretrained:
        load_pretrained(model, name, num_classes=num_classes, in_chans=in_chans)
    # how to rebuild it (padnet.save records it; the weights come from the file)
    model.padnet_arch = {"registry": name, "num_classes": num_classes, "in_chans": in_chans,
                         **kwargs}
    return model
