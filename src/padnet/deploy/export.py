"""``padnet.export``: the deployment form of a model with PAD layers (docs/method.md §5).

Every PAD layer is replaced by its deployment form, looked up by layer type in a table
(:func:`register_deployer`): :class:`~padnet.deploy.conv.DeployedConv2d` for the PAD
convolutions, :class:`~padnet.deploy.moe.DeployedMoE` for MoE layers. The deployed model is an
inference model (eval mode) computing what the trained model computes in eval mode.

A model with conditional computation (docs/method.md §6.1) keeps it: an early-exit model
(:class:`~padnet.conditional.EarlyExitModel`) stays one, with its heads and criterion, and its
PAD layers inside the host are folded (``forward`` and ``infer`` give what they gave); layers
patched for token selection or merging keep their class and routers, with their MoE blocks
folded inside them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from padnet.convert.methods import replace_module
from padnet.deploy.conv import DEPLOY_PATHS, DeployedConv2d
from padnet.deploy.moe import DeployedMoE
from padnet.layers.moe import MoE
from padnet.layers.odconv import ODConv2d
from padnet.layers.pad_conv import PadConv2d
from padnet.layers.protocol import PadLayer, find_pad_layers
from padnet.utils.checks import check_choice

__all__ = ["DEPLOYED_TYPES", "export", "register_deployer"]

Deployer = Callable[..., nn.Module]
_DEPLOYERS: dict[type, Deployer] = {}


def register_deployer(layer_type: type[PadLayer], deployer: Deployer) -> None:
    """``deployer(layer, path=...) -> nn.Module`` makes the deployment form of ``layer_type``
    (and of its subclasses that have none of their own)."""
    _DEPLOYERS[layer_type] = deployer


register_deployer(PadConv2d, DeployedConv2d.from_layer)
register_deployer(MoE, lambda layer, path="auto": DeployedMoE.from_layer(layer))

#: Module types that :func:`export` produces.
DEPLOYED_TYPES: tuple[type, ...] = (DeployedConv2d, DeployedMoE)


def _deployer(layer: PadLayer) -> Deployer:
    for cls in type(layer).__mro__:
        if cls in _DEPLOYERS:
            return _DEPLOYERS[cls]
    raise ValueError(f"no deployment form for {type(layer).__name__}: register one with "
                     "padnet.deploy.register_deployer")


def _retarget_mask_hints(model: nn.Module, replaced: dict[int, nn.Module]) -> None:
    """Point the attention-mask hooks of converted Hugging Face models at the new layers."""
    from padnet.convert.moe import AttentionMaskHint

    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, AttentionMaskHint):
                hook.layers = [replaced.get(id(m), m) for m in hook.layers]


def export(model: nn.Module, *, path: str = "auto", inplace: bool = False) -> nn.Module:
    """The deployment form of ``model``: a copy (or ``model`` itself with ``inplace``) in which
    every PAD layer is folded (constants, compact storage) and which is in eval mode. Early-exit
    wrappers and token patches stay as they are around the folded layers (module docstring).

    ``path`` sets the execution path of the deployed convolutions (``auto``, ``grouped``,
    ``mixture``, ``unfold``; see :mod:`padnet.deploy.conv`): graph export at a dynamic batch
    size wants ``mixture`` (ODConv layers then take ``unfold``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_choice(path, "path", DEPLOY_PATHS)
    layers = find_pad_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no PAD layers to export (convert it with "
                         "padnet.dynamize first)")
    out = model if inplace else copy.deepcopy(model)
    replaced: dict[int, nn.Module] = {}
    for name, layer in find_pad_layers(out):
        # ODConv's per-sample spatial attention has no mixture form; unfold is batch-size free
        layer_path = "unfold" if path == "mixture" and isinstance(layer, ODConv2d) else path
        new = _deployer(layer)(layer.eval(), path=layer_path)
        replaced[id(layer)] = new
        if not name:
            return new
        replace_module(out, name, new)
    _retarget_mask_hints(out, replaced)
    return out.eval()
