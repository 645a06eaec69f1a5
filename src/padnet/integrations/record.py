"""The conversion record: how a model's PAD layers were made, as plain JSON data, and how to make
them again in a fresh copy of the static model.

:func:`conversion_record` reads every PAD layer of a converted model (what ``padnet.dynamize``
put there) and writes down, per layer, the method and the options that rebuild it and, under
``expect``, what the static module itself decides (the layer type, an activation taken from the
FFN block, gated experts), checked after the rebuild; and the scale-factor mode of every PAD
weight. Everything else -- the weights, the mode masks, the scale factors ``phi``, the router
temperatures -- is state-dict data and travels with the weights. :func:`apply_record` runs
``padnet.dynamize`` on the static model with those options (``init='kaiming'``: the weights are
loaded afterwards), one call per group of layers with equal options, and restores the modes.

Record (``format``, ``version``, ``padnet_version``)::

    {"layers": [{"name": "bert.encoder.layer.0.intermediate", "method": "moe",
                 "options": {"num_experts": 4, "top_k": 2, ...},
                 "expect": {"type": "MoE", "activation_name": "GELUActivation", ...}}, ...],
     "scale_modes": {"bert.encoder.layer.0.intermediate.w1": "both", ...}}

Supported: the built-in methods' layers (MoE, DynamicConv2d with softmax or sigmoid routing,
ODConv2d). A router's hidden width is recorded as ``min_hidden`` with a ``reduction`` that
leaves it at that width, so the rebuilt router has the same shape whatever ``reduction`` the
conversion used.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["FORMAT", "VERSION", "apply_record", "check_record", "conversion_record"]

FORMAT = "padnet-conversion"
VERSION = 1


def _hinted_layers(model: nn.Module) -> set[int]:
    """ids of the MoE layers that an attention-mask hook of ``model`` feeds."""
    from padnet.convert.moe import AttentionMaskHint

    ids: set[int] = set()
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, AttentionMaskHint):
                ids.update(id(m) for m in hook.layers)
    return ids


def _router_width(in_channels: int, hidden: int) -> dict[str, Any]:
    """Router options that give exactly ``hidden`` units: ``max(in // reduction, min_hidden)``
    is ``hidden`` for ``reduction > in_channels``."""
    return {"reduction": float(in_channels + 1), "min_hidden": int(hidden)}


def _describe(name: str, layer: nn.Module,
              hinted: set[int]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(method, dynamize options, expected attributes)`` that rebuild ``layer`` from the
    static module it replaced; the expected attributes come from that module (an activation
    taken from the block, a gated FFN) and are checked after the rebuild."""
    from padnet.layers import DynamicConv2d, MoE, ODConv2d
    from padnet.layers.activations import ACTIVATIONS

    kind = type(layer)
    expect: dict[str, Any] = {"type": kind.__name__}
    if kind is MoE:
        options: dict[str, Any] = {
            "num_experts": layer.num_experts, "top_k": layer.top_k,
            "capacity_factor": layer.capacity_factor, "router_noise": layer.router_noise,
            "router_noise_std": layer.router_noise_std,
            "load_balance_coef": layer.load_balance_coef, "z_loss_coef": layer.z_loss_coef,
            "path": layer.path, "static_path": layer.static_path,
            "padding_from_attention_mask": id(layer) in hinted}
        if ACTIVATIONS.get(layer.activation_name) is layer.act:
            options["activation"] = layer.activation_name  # given by name at conversion
        expect["activation_name"] = layer.activation_name
        if hasattr(layer, "gated"):  # gated experts come from a gated FFN block
            expect["gated"] = bool(layer.gated)
        return "moe", options, expect
    if kind is DynamicConv2d:
        options = {"num_kernels": layer.num_kernels, "path": layer.path,
                   "temperature": float(layer.router.temperature)}
        if layer.routing == "softmax":
            options.update(_router_width(layer.in_channels, layer.router.fc1.out_features))
            return "dyconv", options, expect
        return "condconv", options, expect
    if kind is ODConv2d:
        options = {"num_kernels": layer.num_kernels, "path": layer.path,
                   "temperature": float(layer.router.temperature),
                   **_router_width(layer.in_channels, layer.router.fc.out_features)}
        return "odconv", options, expect
    raise ValueError(
        f"cannot record the PAD layer {name!r} of type {kind.__name__}: the conversion record "
        "knows the layers of the built-in methods (MoE, DynamicConv2d, ODConv2d); save this "
        "model with padnet.save instead")


def conversion_record(model: nn.Module) -> dict[str, Any]:
    """The conversion record of ``model`` (module docstring): JSON-serialisable plain data.

    Raises ValueError for a PAD layer of a type the record does not know, or a model that is
    itself a PAD layer."""
    from padnet import __version__
    from padnet.layers import find_pad_layers, find_pad_weights

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    hinted = _hinted_layers(model)
    layers = []
    for name, layer in find_pad_layers(model):
        if not name:
            raise ValueError(f"the model is itself a PAD layer ({type(model).__name__}); the "
                             "conversion record describes layers inside a model")
        method, options, expect = _describe(name, layer, hinted)
        layers.append({"name": name, "method": method, "options": options, "expect": expect})
    record = {"format": FORMAT, "version": VERSION, "padnet_version": __version__,
              "layers": layers,
              "scale_modes": {w.name: w.mode_mask.scale_mode for w in find_pad_weights(model)}}
    return json.loads(json.dumps(record))  # plain data, checked to be JSON


def check_record(record: Any, where: str = "the conversion record") -> dict[str, Any]:
    """``record`` if it is a conversion record this padnet reads; ValueError saying what is
    wrong otherwise."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{where} is not a padnet conversion record (format "
                         f"{record.get('format') if isinstance(record, dict) else record!r})")
    if not isinstance(record.get("version"), int) or record["version"] > VERSION:
        raise ValueError(f"{where} has version {record.get('version')!r}; this padnet reads "
                         f"versions up to {VERSION}: upgrade padnet")
    layers, modes = record.get("layers"), record.get("scale_modes")
    if not isinstance(layers, list) or not isinstance(modes, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("name"), str)
            and isinstance(e.get("method"), str) and isinstance(e.get("options"), dict)
            for e in layers):
        raise ValueError(f"{where} is damaged: 'layers' must be a list of {{name, method, "
                         "options}} and 'scale_modes' a mapping")
    return record


def _groups(layers: Iterable[dict[str, Any]]) -> list[tuple[str, dict[str, Any], list[str]]]:
    """Layers with the same method and options, in first-seen order: one dynamize call each."""
    groups: dict[str, tuple[str, dict[str, Any], list[str]]] = {}
    for entry in layers:
        key = json.dumps([entry["method"], entry["options"]], sort_keys=True)
        groups.setdefault(key, (entry["method"], entry["options"], []))[2].append(entry["name"])
    return list(groups.values())


def _check_expected(entry: dict[str, Any], layer: nn.Module | None) -> None:
    """ValueError unless the rebuilt ``layer`` has the attributes the record expects."""
    for attr, wanted in entry.get("expect", {}).items():
        got = type(layer).__name__ if attr == "type" else getattr(layer, attr, None)
        if got != wanted:
            why = (" (an activation callable given at conversion cannot be recorded: convert "
                   "with its name)" if attr == "activation_name" else "")
            raise ValueError(f"the rebuilt layer {entry['name']!r} has {attr}={got!r}, the "
                             f"record says {wanted!r}{why}")


def apply_record(model: nn.Module, record: dict[str, Any]) -> nn.Module:
    """Convert the static ``model`` in place as ``record`` says; returns it. The new layers'
    weights are random (load the saved state dict next); masks start fully dynamic.

    Raises ValueError when the model does not have the recorded modules (another
    architecture), or the rebuilt layers differ from the recorded ones."""
    import padnet
    from padnet.convert.report import ConversionReport
    from padnet.layers import find_pad_layers, find_pad_weights

    record = check_record(record)
    reports = []
    for method, options, names in _groups(record["layers"]):
        try:
            padnet.dynamize(model, method, include=names, init="kaiming", dynamic_ratio=1.0,
                            **options)
        except (ValueError, TypeError) as err:
            raise ValueError(f"cannot rebuild the recorded {method} layer(s) {names[:3]} in "
                             f"{type(model).__name__}: {err}") from None
        reports.append(model.padnet_report)
    layers = dict(find_pad_layers(model))
    for entry in record["layers"]:
        _check_expected(entry, layers.get(entry["name"]))
    weights = {w.name: w.mode_mask for w in find_pad_weights(model)}
    if set(weights) != set(record["scale_modes"]):
        raise ValueError(f"the rebuilt model has PAD weights {sorted(weights)[:4]}..., the "
                         f"record {sorted(record['scale_modes'])[:4]}...: it is a model of "
                         "another architecture")
    for name, mode in record["scale_modes"].items():
        weights[name].set_scale_mode(mode)
    methods = list(dict.fromkeys(r.method for r in reports))
    model.padnet_report = ConversionReport(
        "+".join(methods) if methods else "none",
        converted=[e for r in reports for e in r.converted])
    return model
