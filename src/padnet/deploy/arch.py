"""What a saved model is made of: its architecture (registry, Hugging Face or custom), its
deployed layers, the modules a conversion replaced by ``nn.Identity``, the attention-mask hooks,
and how many bytes its tensors take (the parts of the header :mod:`padnet.deploy.io` writes)."""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
from torch import nn

from padnet.deploy.conv import DeployedConv2d
from padnet.deploy.moe import DeployedMoE

__all__ = ["DEPLOYED", "build_base", "deployed_layers", "describe_architecture", "identities",
           "mask_hints", "pad_layers", "stored_bytes"]

#: The deployed layer types a file may name.
DEPLOYED: dict[str, type[nn.Module]] = {"DeployedConv2d": DeployedConv2d,
                                        "DeployedMoE": DeployedMoE}


# ---- what a model is made of ---------------------------------------------------------------
def _hf_model_class(model: nn.Module) -> type | None:
    """``type(model)`` when it is a Hugging Face ``PreTrainedModel`` (transformers not imported:
    it cannot be one)."""
    tf = sys.modules.get("transformers")
    if tf is None:
        return None
    base = getattr(tf, "PreTrainedModel", None)
    return type(model) if base is not None and isinstance(model, base) else None


def describe_architecture(model: nn.Module) -> dict[str, Any]:
    """How to rebuild the base (static) form of ``model`` (module docstring)."""
    arch = getattr(model, "padnet_arch", None)
    if isinstance(arch, dict) and isinstance(arch.get("registry"), str):
        try:
            return {"kind": "registry", "model": json.loads(json.dumps(arch))}
        except (TypeError, ValueError):  # builder arguments that JSON cannot hold
            pass
    cls = _hf_model_class(model)
    if cls is not None:
        config = json.loads(model.config.to_json_string(use_diff=False))
        return {"kind": "huggingface", "class": cls.__name__, "module": cls.__module__,
                "config": config}
    return {"kind": "custom", "class": f"{type(model).__module__}.{type(model).__qualname__}"}


def build_base(arch: dict[str, Any]) -> nn.Module:
    """A fresh base model from an architecture description (registry or Hugging Face)."""
    if arch["kind"] == "registry":
        from padnet.models import create_model

        kwargs = dict(arch["model"])
        name = kwargs.pop("registry")
        kwargs.pop("pretrained", None)
        return create_model(name, pretrained=False, **kwargs)
    if arch["kind"] == "huggingface":
        import transformers

        cls = getattr(transformers, arch["class"], None)
        if cls is None or not hasattr(cls, "config_class"):
            raise ValueError(f"transformers {transformers.__version__} has no model class "
                             f"{arch['class']!r}")
        return cls(cls.config_class.from_dict(arch["config"]))
    raise ValueError(f"no rebuild for architecture kind {arch['kind']!r}")


def deployed_layers(model: nn.Module) -> list[dict[str, Any]]:
    return [{"name": name, "type": type(m).__name__, "spec": dict(m.spec)}
            for name, m in model.named_modules() if type(m).__name__ in DEPLOYED
            and isinstance(m, DEPLOYED[type(m).__name__])]


def pad_layers(model: nn.Module) -> list[dict[str, str]]:
    from padnet.layers.protocol import find_pad_layers

    return [{"name": name, "type": type(m).__name__} for name, m in find_pad_layers(model)]


def identities(model: nn.Module, arch: dict[str, Any]) -> list[str]:
    """Names of the ``nn.Identity`` modules of ``model`` that the base model has as something
    else (all of them when there is no base to compare with: restoring an identity that was
    there anyway changes nothing)."""
    names = [n for n, m in model.named_modules() if n and isinstance(m, nn.Identity)]
    if not names or arch["kind"] == "custom":
        return names
    try:
        with torch.device("meta"):
            base = dict(build_base(arch).named_modules())
    except Exception:  # no meta-device build: keep them all
        return names
    return [n for n in names if not isinstance(base.get(n), nn.Identity)]


def mask_hints(model: nn.Module) -> list[dict[str, Any]]:
    from padnet.convert.moe import AttentionMaskHint

    names = {id(m): n for n, m in model.named_modules()}
    hints = []
    for owner_name, owner in model.named_modules():
        for hook in owner._forward_pre_hooks.values():
            if isinstance(hook, AttentionMaskHint):
                layers = [names[id(m)] for m in hook.layers if id(m) in names]
                if layers:
                    hints.append({"module": owner_name, "layers": layers})
    return hints


def _pad_prefixes(model: nn.Module) -> list[str]:
    return [d["name"] for d in deployed_layers(model)] + [d["name"] for d in pad_layers(model)]


def stored_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the state dict that :func:`save` stores: ``total``, ``pad_layers`` (the state of
    the deployed and PAD layers: for deployed ones the compact mask bits and values, their
    routers and biases), ``other`` (everything else) and ``num_tensors``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    prefixes = _pad_prefixes(model)
    total = pad = 0
    state = model.state_dict()
    for key, value in state.items():
        n = value.numel() * value.element_size()
        total += n
        if any(not p or key.startswith(f"{p}.") for p in prefixes):
            pad += n
    return {"total": total, "pad_layers": pad, "other": total - pad, "num_tensors": len(state)}


# ---- save ------------------------------------------------------------------------------------
