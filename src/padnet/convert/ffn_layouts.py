"""Where the feed-forward network (FFN) of a block sits, for MoE upcycling (docs/method.md §2.3,
§3): a table of known layouts, which :func:`register_ffn_layout` extends, and structural rules
for modules that no layout names.

An FFN is ``out(act(in(x)))`` or, gated, ``out(act(gate(x)) * in(x))``, with projections ``in``
and ``gate`` mapping ``hidden -> intermediate`` and ``out`` mapping ``intermediate -> hidden``.
A :class:`FFNLayout` names its parts by their paths inside one *parent* module and says where the
MoE goes:

* ``moe_at=''``: the MoE replaces the parent, whose forward must be the FFN and nothing else
  (Llama's ``LlamaMLP``, ViT's ``ViTMLP``, timm's ``Mlp``; a dropout inside it is dropped);
* ``moe_at='intermediate'`` (BERT) or ``'c_fc'`` (GPT-2): the MoE takes the place of that
  submodule and every part of the FFN outside it (out projection, activation) becomes
  ``nn.Identity``, so the parent's own forward runs unchanged around the MoE, keeping its
  dropout, residual and LayerNorm. ``residual`` names the module that adds the residual (and
  normalises) around the out projection when that happens in the same module as the projection
  (BERT's ``BertOutput``: ``LayerNorm(dropout(dense(h)) + x)``; ``''`` for the parent itself, as
  in ALBERT's ``AlbertLayer``): the MoE may not swallow it.

Gated FFNs take ``moe_at=''`` (their two input projections run side by side).

A layout matches a module by structure, never by class name: every path resolves, the
projections are ``nn.Linear`` (or, with ``transposed``, modules whose 2-D ``weight`` is stored
``(in, out)`` and that compute ``x @ weight + bias``, as GPT-2's ``Conv1D``), their sizes chain
``H -> I -> H`` and the activation is callable. :func:`match_ffn` tries the layouts a user
registered (the latest first), then the built-in ones, then the structural rules: a module with
exactly two projections ``H -> I``, ``I -> H`` (in registration order) and one activation, or
exactly three, ``H -> I`` twice and ``I -> H``, and one activation (gated: the gate is the one
whose name says ``gate``, else the one the module's own forward puts through the activation).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from padnet.registry import Registry

__all__ = ["ACTIVATION_NAMES", "FFNLayout", "FFNMatch", "FFN_LAYOUTS", "Projection",
           "builtin_layout_names", "match_ffn", "match_layout", "register_ffn_layout",
           "search_order"]

#: Attribute names searched for the activation when a layout names none.
ACTIVATION_NAMES = ("act", "act_fn", "activation", "activation_fn", "intermediate_act_fn")

_PATH = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")  # attribute names, Sequential indices


@dataclass(frozen=True)
class FFNLayout:
    """How to find an FFN in a parent module (see the module docstring); paths are relative to
    the parent, dotted (``'output.dense'``)."""

    name: str
    in_proj: str  # hidden -> intermediate (the up projection of a gated FFN)
    out_proj: str  # intermediate -> hidden
    gate_proj: str | None = None  # hidden -> intermediate, the activated one (gated FFNs)
    activation: str | None = None  # None: the first of ACTIVATION_NAMES the parent has
    transposed: bool = False  # weights stored (in, out), x @ weight + bias (GPT-2's Conv1D)
    moe_at: str = ""  # where the MoE goes: '' replaces the parent
    residual: str | None = None  # module adding the residual around out_proj ('' = the parent)
    description: str = ""

    @property
    def gated(self) -> bool:
        return self.gate_proj is not None


#: The layout table, searched by :func:`match_ffn` (user layouts first, latest first).
FFN_LAYOUTS: Registry[FFNLayout] = Registry("FFN layout")
_BUILTIN: list[str] = []


def _inside(path: str, outer: str) -> bool:
    """True when ``path`` is ``outer`` or lies inside it (``''`` contains everything)."""
    return outer == "" or path == outer or path.startswith(outer + ".")


def _check_path(value: object, name: str, *, optional: bool = False, empty: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not (value == "" and empty or _PATH.fullmatch(value)):
        allowed = "a dotted attribute path" + (" or ''" if empty else "") + (
            " or None" if optional else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _validate(layout: FFNLayout) -> None:
    """Raise ValueError unless the layout's paths fit together (module docstring)."""
    _check_path(layout.in_proj, "in_proj")
    _check_path(layout.out_proj, "out_proj")
    _check_path(layout.gate_proj, "gate_proj", optional=True)
    _check_path(layout.activation, "activation", optional=True)
    _check_path(layout.moe_at, "moe_at", empty=True)
    _check_path(layout.residual, "residual", optional=True, empty=True)
    if not isinstance(layout.transposed, bool):
        raise TypeError(f"transposed must be a bool, got {layout.transposed!r}")
    parts = [p for p in (layout.in_proj, layout.out_proj, layout.gate_proj) if p is not None]
    if len(set(parts)) != len(parts):
        raise ValueError(f"in_proj, out_proj and gate_proj must differ, got {parts}")
    if layout.gated and layout.moe_at != "":
        raise ValueError(f"a gated layout (gate_proj={layout.gate_proj!r}) needs moe_at='' (the "
                         f"MoE replaces the parent), got moe_at={layout.moe_at!r}")
    if not _inside(layout.in_proj, layout.moe_at):
        raise ValueError(f"moe_at={layout.moe_at!r} must be in_proj ({layout.in_proj!r}), a "
                         "module holding it, or '' (the parent): the MoE takes its input")
    if layout.residual is not None and _inside(layout.residual, layout.moe_at):
        raise ValueError(f"moe_at={layout.moe_at!r} would replace the residual module "
                         f"{layout.residual!r}: put the MoE beside it (e.g. at in_proj)")


def register_ffn_layout(
    name: str,
    *,
    in_proj: str,
    out_proj: str,
    gate_proj: str | None = None,
    activation: str | None = None,
    transposed: bool = False,
    moe_at: str = "",
    residual: str | None = None,
    description: str = "",
    replace: bool = False,
) -> FFNLayout:
    """Add an FFN layout to the table that ``padnet.dynamize(model, 'moe')`` searches; it is
    tried before the built-in layouts. Returns the layout.

    Example, a block ``Block`` with ``self.up``, ``self.down`` and ``self.nonlin`` whose forward
    is ``x + drop(down(nonlin(up(norm(x)))))``::

        register_ffn_layout("my-block", in_proj="up", out_proj="down", activation="nonlin",
                            moe_at="up", residual="")

    (the MoE takes ``up``'s place, ``nonlin`` and ``down`` become ``nn.Identity``). Arguments:
    the fields of :class:`FFNLayout`; ``replace`` overwrites a layout of the same name.
    Raises ValueError for paths that do not fit together (module docstring).
    """
    layout = FFNLayout(name, in_proj, out_proj, gate_proj, activation, transposed, moe_at,
                       residual, description)
    _validate(layout)
    if name in _BUILTIN and replace:
        _BUILTIN.remove(name)
    return FFN_LAYOUTS.register(name, layout, replace=replace)


def builtin_layout_names() -> list[str]:
    """Names of the layouts padnet ships, in search order."""
    return list(_BUILTIN)


def _builtin(name: str, **fields: object) -> None:
    register_ffn_layout(name, **fields)
    _BUILTIN.append(name)


_builtin("bert", in_proj="intermediate.dense", out_proj="output.dense",
         activation="intermediate.intermediate_act_fn", moe_at="intermediate", residual="output",
         description="BERT, RoBERTa, ELECTRA and look-alikes (ViTIntermediate/ViTOutput of "
                     "transformers < 5): BertIntermediate + BertOutput")
_builtin("distilbert", in_proj="lin1", out_proj="lin2", activation="activation", moe_at="lin1",
         description="DistilBERT's FFN (lin1, activation, lin2, dropout)")
_builtin("albert", in_proj="ffn", out_proj="ffn_output", activation="activation", moe_at="ffn",
         residual="", description="ALBERT's AlbertLayer (shared across depth: one MoE)")
_builtin("gpt2", in_proj="c_fc", out_proj="c_proj", activation="act", transposed=True,
         moe_at="c_fc", description="GPT-2's GPT2MLP (Conv1D c_fc, act, Conv1D c_proj, dropout)")
_builtin("gated", in_proj="up_proj", out_proj="down_proj", gate_proj="gate_proj",
         activation="act_fn", description="gated MLPs of Llama, Mistral, Qwen2, Gemma...")
_builtin("fc1-fc2", in_proj="fc1", out_proj="fc2",
         description="fc1, activation, fc2 MLPs: ViT's ViTMLP, CLIP, timm's Mlp")


# ---- matching ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Projection:
    """One projection of an FFN: its path in the parent, the module, and its dense form."""

    path: str
    module: nn.Module
    transposed: bool

    @property
    def weight(self) -> Tensor:
        """``(out, in)``, as ``nn.Linear`` stores it (a transposed view for Conv1D)."""
        w = self.module.weight
        return w.t() if self.transposed else w

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.module, "bias", None)

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])


@dataclass(frozen=True)
class FFNMatch:
    """A layout found in a parent module: the projections, the activation (None when none was
    found: the converter then needs ``activation=``) and the activation's path."""

    layout: FFNLayout
    in_proj: Projection
    out_proj: Projection
    gate_proj: Projection | None
    activation: Callable[[Tensor], Tensor] | None
    activation_path: str | None

    @property
    def hidden_size(self) -> int:
        return self.in_proj.in_features

    @property
    def intermediate_size(self) -> int:
        return self.in_proj.out_features

    def identities(self) -> list[str]:
        """Paths of the FFN parts outside ``moe_at``, which become ``nn.Identity``."""
        paths = [self.out_proj.path, self.activation_path]
        return [p for p in paths if p is not None and not _inside(p, self.layout.moe_at)]

    def dense(self, x: Tensor, activation: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """The FFN computed from its parts, ``out(act(in(x)))`` or ``out(act(gate(x)) * in(x))``
        (``act``: ``activation`` when given, else the one found)."""
        act = self.activation if activation is None else activation
        if self.gate_proj is None:
            return self.out_proj.module(act(self.in_proj.module(x)))
        return self.out_proj.module(act(self.gate_proj.module(x)) * self.in_proj.module(x))


def _resolve(module: nn.Module, path: str) -> object:
    """``module.a.b`` for ``'a.b'``, or None."""
    obj: object = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _is_conv1d(m: object) -> bool:
    """Hugging Face's ``Conv1D`` (weight ``(in, out)``), told apart without importing it."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(m, nn.Module)


def _projection(module: nn.Module, path: str, transposed: bool | None) -> Projection | None:
    """The projection at ``path``; ``transposed=None``: Linear, or Conv1D taken transposed."""
    m = _resolve(module, path)
    if transposed is None:
        transposed = _is_conv1d(m)
    if transposed:
        w = getattr(m, "weight", None)
        ok = isinstance(m, nn.Module) and isinstance(w, Tensor) and w.dim() == 2
    else:
        ok = isinstance(m, nn.Linear)
    return Projection(path, m, transposed) if ok else None


def _activation_child(module: nn.Module) -> str | None:
    """The one parameter-free child that is not a projection, dropout or identity, if unique."""
    skip = (nn.Dropout, nn.Identity, nn.Linear, nn.ModuleList, nn.ModuleDict, nn.Sequential)
    names = [n for n, c in module.named_children()
             if not isinstance(c, skip) and not _is_conv1d(c) and "Dropout" not in type(c).__name__
             and not any(True for _ in c.parameters()) and not any(True for _ in c.buffers())]
    return names[0] if len(names) == 1 else None


def _find_activation(module: nn.Module, layout: FFNLayout) -> str | None:
    if layout.activation is not None:
        return layout.activation if callable(_resolve(module, layout.activation)) else None
    named = next((a for a in ACTIVATION_NAMES if callable(getattr(module, a, None))), None)
    return named if named is not None else _activation_child(module)


def match_layout(module: nn.Module, layout: FFNLayout) -> FFNMatch | None:
    """``layout`` found in ``module`` by structure (module docstring), or None."""
    inp = _projection(module, layout.in_proj, layout.transposed)
    out = _projection(module, layout.out_proj, layout.transposed)
    gate = None if layout.gate_proj is None else _projection(
        module, layout.gate_proj, layout.transposed)
    if inp is None or out is None or (layout.gated and gate is None):
        return None
    h, i = inp.in_features, inp.out_features
    if (out.in_features, out.out_features) != (i, h) or (
            gate is not None and (gate.in_features, gate.out_features) != (h, i)):
        return None
    if layout.moe_at and not isinstance(_resolve(module, layout.moe_at), nn.Module):
        return None
    act_path = _find_activation(module, layout)
    if act_path is None and layout.activation is not None:
        return None  # the layout names an activation the module does not have
    act = None if act_path is None else _resolve(module, act_path)
    return FFNMatch(layout, inp, out, gate, act, act_path)


def _structural(module: nn.Module) -> FFNMatch | None:
    """The structural rules (module docstring) on ``module``'s direct children."""
    projs = [p for n, _ in module.named_children()
             if (p := _projection(module, n, None)) is not None]
    if len(projs) not in (2, 3) or isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return None
    act_path = _find_activation(module, FFNLayout("", "x", "y"))
    if act_path is None:
        return None
    act = _resolve(module, act_path)
    if len(projs) == 2:
        inp, out = projs
        if (out.in_features, out.out_features) != (inp.out_features, inp.in_features):
            return None
        layout = FFNLayout("mlp", inp.path, out.path, activation=act_path)
        return FFNMatch(layout, inp, out, None, act, act_path)
    a, b, c = projs
    for ups, out in (((a, b), c), ((a, c), b), ((b, c), a)):  # registration order first
        up_shape = (ups[0].in_features, ups[0].out_features)
        if (ups[1].in_features, ups[1].out_features) == up_shape and (
                out.out_features, out.in_features) == up_shape:
            break
    else:
        return None
    candidates = [ups, ups[::-1]]  # (gate, up)
    named = [c for c in candidates if "gate" in c[0].path.lower()]
    gate, inp = named[0] if len(named) == 1 else _gate_by_forward(module, candidates, out, act)
    layout = FFNLayout("gated-mlp", inp.path, out.path, gate.path, act_path)
    return FFNMatch(layout, inp, out, gate, act, act_path)


def _gate_by_forward(module: nn.Module, candidates: list[tuple[Projection, Projection]],
                     out: Projection, act: Callable[[Tensor], Tensor]
                     ) -> tuple[Projection, Projection]:
    """The (gate, up) assignment whose gated FFN equals ``module``'s forward on a random input
    (the first when neither does, and the conversion check then reports the mismatch; the
    first on the meta device, where nothing can be compared)."""
    w = out.weight
    if w.device.type == "meta":
        return candidates[0]
    x = torch.randn(4, out.out_features, device=w.device, dtype=w.dtype)
    tol = max(1e-4, 8 * torch.finfo(w.dtype).eps)
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad():
            ref = module(x)
            for gate, up in candidates:
                got = out.module(act(gate.module(x)) * up.module(x))
                if isinstance(ref, Tensor) and torch.allclose(got, ref, rtol=tol, atol=tol):
                    return gate, up
    except Exception:  # noqa: BLE001 -- probing a forward that may take other inputs
        pass
    finally:
        for m, mode in modes:
            m.training = mode
    return candidates[0]


def search_order() -> list[FFNLayout]:
    """The layouts of the table in the order :func:`match_ffn` tries them: those a user
    registered, the latest first, then the built-in ones."""
    user = [n for n in FFN_LAYOUTS if n not in _BUILTIN][::-1]
    return [FFN_LAYOUTS.get(n) for n in (*user, *_BUILTIN) if n in FFN_LAYOUTS]


def match_ffn(module: nn.Module) -> FFNMatch | None:
    """The first layout of the table found in ``module`` (:func:`search_order`), else the
    structural rules' match, else None."""
    for layout in search_order():
        found = match_layout(module, layout)
        if found is not None:
            return found
    return _structural(module)
