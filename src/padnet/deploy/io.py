"""``padnet.save`` / ``padnet.load``: one self-describing ``.safetensors`` file per model.

The file is a plain safetensors file (the state dict; tensors sharing storage are stored once
each) whose metadata holds, under the key ``padnet``, a JSON header:

* ``format`` (``"padnet"``) and ``version``;
* ``form``: ``deployed`` (the model has layers made by :func:`padnet.export`) or ``training``;
* ``architecture``: how to rebuild the base model (for an early-exit model: its host) --
  ``{"kind": "registry", "model": {"registry": name, "num_classes": ..., "in_chans": ...,
  **kwargs}}`` for models of :func:`padnet.models.create_model`,
  ``{"kind": "huggingface", "class": ..., "config": {...}}`` for Hugging Face models, or
  ``{"kind": "custom", "class": ...}`` (then ``load`` needs ``model=``);
* ``conditional`` (format version 2; absent from files without it, which are version 1): the
  model's dynamic tokens and early exits (:func:`padnet.deploy.arch.conditional_record`):
  token selection per layer (keep ratio, gate, router-loss weight) or merging (``r`` per
  layer), the exit points, classes and default criterion; ``load`` puts them back before the
  deployed layers, whose names then include the wrapper's ``backbone.`` prefix;
* ``layers``: for each deployed layer its qualified module name, type and ``spec``;
* ``identities``: modules replaced by ``nn.Identity`` relative to the base model (the
  ``output.dense`` of a BERT layer whose FFN became a MoE);
* ``mask_hints``: the attention-mask hooks (:class:`padnet.convert.moe.AttentionMaskHint`) that
  feed deployed MoE layers their padding mask: the module they sit on and the layers they feed;
* ``pad_layers``: PAD layers still in training form (``load`` cannot rebuild those by itself);
* ``tensors``: the sha256 of every tensor's bytes, its dtype and shape, checked on load.

A second metadata key, ``padnet_sha256``, holds the sha256 of the header text itself.

Loading reads the file with :mod:`safetensors` and :mod:`json` only (nothing is unpickled),
rebuilds the base model (or takes ``model=``), puts empty deployed layers made from their specs
and the identities in place, re-installs the attention-mask hooks and loads the state dict
strictly. Writes are atomic (:func:`padnet.utils.io.save_safetensors`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from padnet.deploy.arch import (
    DEPLOYED,
    apply_conditional_record,
    build_base,
    conditional_record,
    deployed_layers,
    describe_architecture,
    identities,
    mask_hints,
    pad_layers,
    stored_bytes,
)
from padnet.deploy.header import (
    DIGEST,
    FORMAT,
    KEY,
    VERSION,
    few,
    read_file,
    read_header,
    verify,
)
from padnet.deploy.moe import DeployedMoE

__all__ = ["FORMAT", "VERSION", "load", "read_header", "save", "stored_bytes"]

_ACT_ATTRS = ("intermediate_act_fn", "act", "act_fn", "activation", "activation_fn")


def _unshared(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU contiguous tensors, copies where one shares storage with an earlier one (safetensors
    refuses shared tensors)."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        value = value.detach().cpu().contiguous()
        ptr = value.untyped_storage().data_ptr() if value.numel() else -1
        out[key] = value.clone() if ptr in seen else value
        if ptr != -1:
            seen.add(ptr)
    return out


def _float_dtype(state: dict[str, Tensor]) -> str | None:
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    return str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else None


def save(model: nn.Module, path: str | Path) -> int:
    """Write ``model`` (deployed by :func:`padnet.export`, or in training form) to the
    safetensors file ``path``, atomically; returns the number of bytes written.

    The file describes the architecture (module docstring): :func:`load` rebuilds registry
    and Hugging Face models by itself, with their early exits and dynamic tokens
    (``padnet.conditional``), and any other model on ``model=``.
    """
    from padnet import __version__
    from padnet.utils.io import save_safetensors, tensor_sha256

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    state = _unshared(model.state_dict())
    digests = {k: tensor_sha256(v) for k, v in state.items()}  # one pass, for both records
    arch = describe_architecture(model)
    conditional = conditional_record(model)
    layers = deployed_layers(model)
    header = {
        "format": FORMAT,
        "version": VERSION if conditional else 1,
        "padnet_version": __version__,
        "form": "deployed" if layers else "training",
        "architecture": arch,
        **({"conditional": conditional} if conditional else {}),
        "layers": layers,
        "identities": identities(model, arch, conditional),
        "mask_hints": mask_hints(model),
        "pad_layers": pad_layers(model),
        "dtype": _float_dtype(state),
        "stored_bytes": stored_bytes(model),
        "tensors": {k: {"sha256": digests[k], "dtype": str(v.dtype).removeprefix("torch."),
                        "shape": list(v.shape)} for k, v in state.items()},
    }
    try:
        text = json.dumps(header)
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot save {type(model).__name__} to {path}: its description is "
                         f"not JSON ({err})") from err
    meta = {"format": "pt", KEY: text, DIGEST: hashlib.sha256(text.encode()).hexdigest()}
    written = save_safetensors(path, state, meta, digests=digests)
    return written.stat().st_size


# ---- load ------------------------------------------------------------------------------------
def _activation(module: nn.Module | None) -> Any:
    """The activation held by the module a MoE replaces (BERT intermediate, fc1/fc2 MLP,
    Sequential(Linear, act, Linear)), or None."""
    if module is None:
        return None
    for attr in _ACT_ATTRS:
        act = getattr(module, attr, None)
        if callable(act):
            return act
    if isinstance(module, nn.Sequential) and len(module) == 3:
        return module[1]
    return None


def _empty_layer(path: Path, entry: dict[str, Any], replaced: nn.Module | None) -> nn.Module:
    cls = DEPLOYED.get(entry.get("type"))
    if cls is None:
        raise ValueError(f"{path}: unknown deployed layer type {entry.get('type')!r} at "
                         f"{entry.get('name')!r}; upgrade padnet")
    spec = entry["spec"]
    if cls is DeployedMoE:
        from padnet.layers.activations import ACTIVATIONS

        act = None
        if spec.get("activation") not in ACTIVATIONS:
            act = _activation(replaced)
            if act is None:
                raise ValueError(
                    f"{path}: the MoE at {entry['name']!r} has activation "
                    f"{spec.get('activation')!r}, not a known name, and the model has no module "
                    "there holding it: pass model= a model whose module at that name holds "
                    "the activation")
        return DeployedMoE(spec, activation=act)
    return cls(spec)


def _reference(*modules: nn.Module) -> Tensor | None:
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            if t.is_floating_point():
                return t
    return None


def _install_hints(model: nn.Module, hints: list[dict[str, Any]]) -> None:
    """Re-install the attention-mask hooks, dropping layers no longer in the model from those
    the model has already."""
    from padnet.convert.moe import AttentionMaskHint, _install_mask_hint

    present = {id(m) for m in model.modules()}
    for hint in hints:
        owner = model.get_submodule(hint["module"])
        layers = [model.get_submodule(n) for n in hint["layers"]]
        for hook in owner._forward_pre_hooks.values():
            if isinstance(hook, AttentionMaskHint):
                hook.layers = [m for m in hook.layers if id(m) in present]
                layers = [m for m in layers if all(m is not h for h in hook.layers)]
        if layers:
            _install_mask_hint(owner, layers)


def _rebuild(path: Path, header: dict[str, Any], model: nn.Module) -> nn.Module:
    """Put the recorded deployed layers and identities into ``model``."""
    from padnet.convert.methods import replace_module

    for entry in header.get("layers", []):
        name = entry["name"]
        try:
            replaced = model.get_submodule(name) if name else None
        except AttributeError:
            raise ValueError(
                f"{path}: the model has no module {name!r} where the file has a "
                f"{entry['type']}; it is a model of another architecture: pass model= a fresh "
                "model of the architecture that was saved") from None
        new = _empty_layer(path, entry, replaced)
        ref = _reference(replaced if replaced is not None else model, model)
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype)
        if not name:
            return new
        replace_module(model, name, new)
    for name in header.get("identities", []):
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"{path}: the model has no module {name!r} (nn.Identity in the file); it is a "
                "model of another architecture") from None
        if not isinstance(current, nn.Identity):
            replace_module(model, name, nn.Identity())
    return model


def state_mismatch(
    expected: dict[str, Tensor], tensors: dict[str, Tensor],
    aliases: dict[str, Collection[str]] | None = None,
) -> tuple[list[str], list[str], list[str]]:
    """How ``tensors`` (read from a file) fail to fit a model's state dict ``expected``: keys
    missing in the file (a key counts as present when one of its ``aliases`` is, e.g. tied
    weights stored once), keys the model does not have (sorted), and shape mismatches as
    ``"KEY (file shape) in the file, (model shape) in the model"``."""
    aliases = aliases or {}
    missing = [k for k in expected if k not in tensors
               and not any(a in tensors for a in aliases.get(k, ()))]
    unexpected = sorted(k for k in tensors if k not in expected)
    shapes = [f"{k} {tuple(tensors[k].shape)} in the file, {tuple(expected[k].shape)} in the "
              "model" for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    return missing, unexpected, shapes


def _check_match(path: Path, model: nn.Module, tensors: dict[str, Tensor],
                 header: dict[str, Any]) -> None:
    missing, unexpected, shapes = state_mismatch(model.state_dict(), tensors)
    if not (missing or unexpected or shapes):
        return
    parts = [f"{what}: {few(names)}" for what, names in (
        ("missing in the file", missing), ("unexpected in the file", unexpected),
        ("shape mismatch", shapes)) if names]
    todo = "pass model= a fresh model of the architecture that was saved"
    if header.get("pad_layers"):
        pad = few([d["name"] for d in header["pad_layers"]])
        todo = (f"the file holds PAD layers in training form ({pad}): pass model= a model "
                "converted the same way with padnet.dynamize, or save padnet.export(model) "
                "instead")
    raise ValueError(f"{path}: the model ({type(model).__name__}) is not the architecture in "
                     f"the file ({'; '.join(parts)}); {todo}")


def _with_conditional(path: Path, header: dict[str, Any], model: nn.Module,
                      built: bool) -> nn.Module:
    """``model`` given the recorded early exits and dynamic tokens (those it lacks)."""
    record = header.get("conditional")
    if not record:
        return model
    try:
        return apply_conditional_record(model, record)
    except (TypeError, ValueError) as err:
        given = "the model built from the file" if built else "model="
        raise ValueError(f"{path}: cannot give {given} the recorded early exits / dynamic "
                         f"tokens: {err}") from None


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Read a model written by :func:`save` (eval mode).

    Registry and Hugging Face models are rebuilt from the file alone; any other model needs
    ``model=``, a fresh instance of its static architecture (or one already converted), into
    which the recorded deployed layers and identities are put before the state dict is loaded
    strictly. A training-form file with PAD layers needs ``model=`` converted the same way.
    Recorded early exits and dynamic tokens are put back first (on ``model=`` too, unless it
    has them already); custom exit heads or token routers need ``model=`` with them in place.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a padnet file (checked without unpickling anything), truncated,
            corrupted (checksum mismatch), or a model of another architecture.
    """
    from safetensors.torch import load as load_bytes

    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
    path, data, st_header, header = read_file(path)
    verify(path, data, st_header, header)
    arch = header.get("architecture") or {"kind": "custom", "class": "?"}
    layers = header.get("layers", [])
    self_contained = any(not d["name"] for d in layers)  # the model is one deployed layer
    built = model is None
    if built and self_contained:
        model = nn.Module()  # placeholder: the deployed layer is the model
    elif built:
        if arch["kind"] == "custom":
            raise ValueError(f"{path} holds a {arch.get('class')} (not a registry or Hugging "
                             "Face model), which the file cannot rebuild: pass model= a fresh "
                             "instance of it")
        if header.get("pad_layers"):
            pad = few([d["name"] for d in header["pad_layers"]])
            raise ValueError(
                f"{path} holds PAD layers in training form ({pad}), which padnet.load cannot "
                "rebuild: pass model= a model converted the same way with padnet.dynamize, or "
                "save padnet.export(model) instead")
        model = build_base(arch)
    model = _with_conditional(path, header, model, built)
    model = _rebuild(path, header, model)
    if built and header.get("dtype"):
        model = model.to(getattr(torch, header["dtype"]))
    try:
        tensors = load_bytes(data)
    except Exception as err:  # safetensors' own consistency checks
        raise ValueError(f"{path}: unreadable tensors ({err}); the file is damaged: write it "
                         "again with padnet.save") from None
    del data
    odd = sorted(k for k, t in tensors.items()
                 if str(t.dtype).removeprefix("torch.") != header["tensors"][k].get("dtype"))
    if odd:
        raise ValueError(f"{path}: checksum mismatch in {len(odd)} tensor(s) ({few(odd)}): "
                         "their dtype is not the recorded one; the file is corrupted: write it "
                         "again with padnet.save")
    _check_match(path, model, tensors, header)
    model.load_state_dict(tensors, strict=True)
    if header.get("mask_hints"):
        _install_hints(model, header["mask_hints"])
    return model.eval()
