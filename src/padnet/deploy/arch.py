"""What a saved model is made of: its architecture (registry, Hugging Face or custom), its
conditional computation (early exits, dynamic tokens), its deployed layers, the modules a
conversion replaced by ``nn.Identity``, the attention-mask hooks, and how many bytes its tensors
take (the parts of the header :mod:`padnet.deploy.io` writes)."""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
from torch import nn

from padnet.deploy.conv import DeployedConv2d
from padnet.deploy.moe import DeployedMoE

__all__ = ["DEPLOYED", "apply_conditional_record", "build_base", "conditional_record",
           "deployed_layers", "describe_architecture", "host_of", "identities", "mask_hints",
           "pad_layers", "stored_bytes"]

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


def host_of(model: nn.Module) -> nn.Module:
    """The host model inside an early-exit model (its ``backbone``), else ``model``."""
    from padnet.conditional import EarlyExitModel

    return model.backbone if isinstance(model, EarlyExitModel) else model


def describe_architecture(model: nn.Module) -> dict[str, Any]:
    """How to rebuild the base (static) form of ``model`` (module docstring); for an early-exit
    model, that of its host (the exits are in :func:`conditional_record`)."""
    model = host_of(model)
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


# ---- conditional computation ---------------------------------------------------------------
def _token_record(model: nn.Module) -> dict[str, Any] | None:
    """The token selection or merging patches of ``model``'s encoder layers, per layer."""
    from padnet.conditional.tokens import find_encoder_layers, layer_token_mode

    try:
        _, stack = find_encoder_layers(model)
    except (TypeError, ValueError):
        return None
    modes = [layer_token_mode(layer) for layer in stack]
    select = [i for i, mode in enumerate(modes) if mode == "select"]
    if select:
        routers = [stack[i].router for i in select]
        hidden = stack[select[0]].attention.self.query.in_features
        plain = (all(type(r) is nn.Linear and r.in_features == hidden and r.out_features == 1
                     for r in routers) and len({id(r) for r in routers}) == len(routers))
        return {"mode": "select", "router": "linear" if plain else "custom", "layers": [
            {"index": i, "keep": stack[i].keep, "gate": stack[i].gate,
             "aux_loss_coef": stack[i].aux_loss_coef, "protect_cls": stack[i].protect_cls}
            for i in select]}
    if "merge" in modes:
        first = stack[0]
        return {"mode": "merge", "r": [layer.merge_r for layer in stack],
                "metric": first.merge_metric, "proportional": first.proportional,
                "unmerge": first.unmerge, "protect_cls": first.protect_cls}
    return None


def _exit_record(model: nn.Module) -> dict[str, Any] | None:
    from padnet.conditional import ClsHead, EarlyExitModel, PoolHead
    from padnet.conditional.criteria import criterion_record

    if not isinstance(model, EarlyExitModel):
        return None
    heads = [*model.exits, *([model.final_exit] if model.final_exit is not None else [])]
    default = all(type(h) in (PoolHead, ClsHead) for h in heads)
    return {"after": list(model.exit_points), "num_classes": model.num_classes,
            "heads": "default" if default else "custom",
            "criterion": criterion_record(model.criterion)}


def conditional_record(model: nn.Module) -> dict[str, Any] | None:
    """What :func:`apply_conditional_record` needs to rebuild the conditional computation of
    ``model`` (docs/method.md §6.1): ``{"tokens": ..., "exits": ...}`` (each None when absent),
    or None when the model has neither. Token selection records each selecting layer's keep
    ratio, gate, router-loss weight and whether [CLS] is protected, and whether the routers are
    the default ``Linear(hidden, 1)`` (else ``"custom"``); merging records ``r`` per layer and
    its options; exits record the exit points, the classes, whether the heads are the default
    ones and the default criterion (when it is one of the built-in criteria)."""
    record = {"tokens": _token_record(host_of(model)), "exits": _exit_record(model)}
    return record if any(record.values()) else None


def _custom_parts(record: dict[str, Any]) -> list[str]:
    parts = []
    if (record.get("tokens") or {}).get("router") == "custom":
        parts.append("token routers other than the default Linear(hidden, 1)")
    if (record.get("exits") or {}).get("heads") == "custom":
        parts.append("exit heads made by a head_factory")
    return parts


def apply_conditional_record(model: nn.Module, record: dict[str, Any] | None) -> nn.Module:
    """``model`` (a host model, or one already given its exits and tokens) with the dynamic
    tokens and early exits of ``record`` (:func:`conditional_record`); what the model has
    already is kept. ValueError when the record names custom routers or heads (a file can
    rebuild only the default ones: pass the model itself)."""
    from padnet.conditional import (
        EarlyExitModel,
        add_exits,
        make_criterion,
        merge_tokens,
        select_tokens,
    )
    from padnet.conditional.tokens import find_encoder_layers, layer_token_mode

    if not record:
        return model
    host = host_of(model)
    tokens, exits = record.get("tokens"), record.get("exits")
    patched = tokens and any(layer_token_mode(m) for m in find_encoder_layers(host)[1])
    built_tokens = bool(tokens) and not patched
    built_exits = bool(exits) and not isinstance(model, EarlyExitModel)
    custom = _custom_parts({"tokens": tokens if built_tokens else None,
                            "exits": exits if built_exits else None})
    if custom:
        raise ValueError(f"the model has {' and '.join(custom)}, which a file cannot rebuild: "
                         "pass model= the model with its exits and tokens in place")
    if built_tokens and tokens["mode"] == "select":
        for entry in tokens["layers"]:
            select_tokens(host, [entry["index"]], entry["keep"], gate=entry["gate"],
                          aux_loss_coef=entry["aux_loss_coef"],
                          protect_cls=entry["protect_cls"])
    elif built_tokens:
        merge_tokens(host, tokens["r"], metric=tokens["metric"],
                     proportional=tokens["proportional"], unmerge=tokens["unmerge"],
                     protect_cls=tokens["protect_cls"])
    if built_exits:
        crit = exits.get("criterion")
        criterion = make_criterion(crit["name"], crit["threshold"]) if crit else None
        model = add_exits(model, exits["after"], num_classes=exits["num_classes"],
                          criterion=criterion)
    return model


def deployed_layers(model: nn.Module) -> list[dict[str, Any]]:
    return [{"name": name, "type": type(m).__name__, "spec": dict(m.spec)}
            for name, m in model.named_modules() if type(m).__name__ in DEPLOYED
            and isinstance(m, DEPLOYED[type(m).__name__])]


def pad_layers(model: nn.Module) -> list[dict[str, str]]:
    from padnet.layers.protocol import find_pad_layers

    return [{"name": name, "type": type(m).__name__} for name, m in find_pad_layers(model)]


def identities(model: nn.Module, arch: dict[str, Any],
               conditional: dict[str, Any] | None = None) -> list[str]:
    """Names of the ``nn.Identity`` modules of ``model`` that the base model (given the
    ``conditional`` record) has as something else (all of them when there is no base to compare
    with: restoring an identity that was there anyway changes nothing)."""
    names = [n for n, m in model.named_modules() if n and isinstance(m, nn.Identity)]
    if not names or arch["kind"] == "custom":
        return names
    try:
        with torch.device("meta"):
            built = apply_conditional_record(build_base(arch), conditional)
            base = dict(built.named_modules())
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
