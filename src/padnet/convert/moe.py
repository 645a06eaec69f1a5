"""Turn the feed-forward blocks of a model into (PAD-)MoE layers, in place (docs/method.md §2.2,
§2.3, §3).

FFN blocks are found by walking the module tree, in module order, with
:func:`padnet.convert.ffn_layouts.match_ffn`: a table of known layouts (BERT, RoBERTa and
ELECTRA's ``intermediate``/``output``, DistilBERT, ALBERT, GPT-2's ``Conv1D``, the gated
``gate_proj``/``up_proj``/``down_proj`` MLPs of Llama, Mistral and Qwen2, ``fc1``/``fc2`` MLPs
such as ViT's), which users extend with :func:`padnet.convert.register_ffn_layout`, then
structural rules (two projections around an activation, or a gate/up/down triple) for models no
layout names. Plain FFNs become :class:`MoE` layers, gated ones gated MoE layers (Mixtral-style:
a router and experts that are each a gated MLP). Where a layout puts the MoE inside its parent
(BERT: the MoE replaces ``intermediate`` and ``output.dense`` becomes ``nn.Identity``), the
host's own forward runs unchanged around it: ``LayerNorm(dropout(MoE(h)) + h)`` with the
residual, dropout and LayerNorm of ``BertOutput``.

``init='copy'`` upcycles (``W_s = W_e = W_dense``, ``b_e = b_dense``): since the kept gates sum
to 1 the model is unchanged for any routing and mask. Each conversion is checked on a random
input: the dense FFN of the parts, put where the MoE goes, must leave the parent module's output
unchanged (where its forward takes one tensor), and the upcycled MoE must equal the dense FFN; a
mismatch raises ValueError and leaves the block as it was.

Two model hooks are installed: when the model's forward takes an ``attention_mask``, it becomes
the MoE layers' padding mask (padding left out of the auxiliary losses); and each forward of the
model is one *aux pass* of its MoE layers (:meth:`MoE.start_aux_pass`), so a layer applied several
times per forward reports the sum of its losses. That is how shared layers are handled (ALBERT
applies one ``AlbertLayer`` at every depth): a shared FFN becomes one shared MoE, counted once by
``layers`` and by :func:`padnet.aux_loss`, whose loss sums over its applications, as the losses
of unrolled layers would.
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from padnet.convert.ffn_layouts import (
    ACTIVATION_NAMES,
    FFNMatch,
    match_ffn,
    search_order,
)
from padnet.convert.methods import register_method
from padnet.convert.report import ConversionEntry, ConversionReport
from padnet.layers.activations import resolve_activation
from padnet.layers.moe import MoE
from padnet.layers.pad_conv import INITS
from padnet.utils.checks import check_choice

__all__ = ["AttentionMaskHint", "AuxPassHook", "FFNBlock", "dynamize_moe", "find_ffn_blocks"]

_WHAT = ("a layout of padnet.convert.FFN_LAYOUTS ({}), two projections around an activation, or "
         "a gate/up/down triple; describe other FFNs with padnet.convert.register_ffn_layout")


def _recognised() -> str:
    return _WHAT.format(", ".join(layout.name for layout in search_order()))


@dataclass
class FFNBlock:
    """One convertible FFN: where the MoE goes (``name``), the dense parts, and its kind."""

    name: str  # qualified name the MoE has or will have
    aliases: tuple[str, ...]  # other names of the block: its parent's, other registrations
    kind: str  # the layout's name ('bert', 'gpt2', 'gated', 'mlp'...), or 'moe' (converted)
    fc1: nn.Module | None  # the in (up) projection
    fc2: nn.Module | None  # the out (down) projection
    activation: Callable[[Tensor], Tensor] | None
    owner: nn.Module  # the parent module that holds the block
    gate: nn.Module | None = None  # the gate projection of a gated FFN
    match: FFNMatch | None = None  # where each part sits (None for 'moe')
    moe_at: str = ""  # where the MoE goes in the parent ('': it replaces the parent)
    places: list[str] = field(default_factory=list)  # every name the MoE goes to (moe_at '')


def _converted(name: str, m: nn.Module) -> FFNBlock | None:
    """A block converted before: a MoE, or a parent holding one where a layout puts it."""
    prefix = f"{name}." if name else ""
    if isinstance(m, MoE):
        return FFNBlock(name, (), "moe", None, None, None, m, places=[name])
    for layout in search_order():
        if layout.moe_at and isinstance(_get(m, layout.moe_at), MoE) and isinstance(
                _get(m, layout.out_proj), nn.Identity):
            return FFNBlock(f"{prefix}{layout.moe_at}", (name,), "moe", None, None, None, m,
                            moe_at=layout.moe_at)
    return None


def _get(m: nn.Module, path: str) -> object:
    try:
        return m.get_submodule(path)
    except AttributeError:
        return None


def _as_block(name: str, m: nn.Module) -> FFNBlock | None:
    """The FFN block that ``m`` (named ``name``) is or holds, or None."""
    converted = _converted(name, m)
    if converted is not None:
        return converted
    found = match_ffn(m)
    if found is None:
        return None
    at = found.layout.moe_at
    prefix = f"{name}." if name else ""
    gate = found.gate_proj.module if found.gate_proj is not None else None
    return FFNBlock(f"{prefix}{at}" if at else name, (name,) if at else (), found.layout.name,
                    found.in_proj.module, found.out_proj.module, found.activation, m, gate,
                    found, at, places=[] if at else [name])


def find_ffn_blocks(model: nn.Module) -> list[FFNBlock]:
    """Every FFN block of ``model`` in module order (not descending into a block found),
    including those converted to a MoE already (``kind='moe'``), so indices stay stable. A
    module registered at several places is one block (its other names in ``aliases``)."""
    blocks: list[FFNBlock] = []
    seen: dict[int, FFNBlock] = {}

    def walk(name: str, m: nn.Module) -> None:
        if id(m) in seen:  # the same block registered again: one more name for it
            block = seen[id(m)]
            at = block.moe_at
            block.aliases += (f"{name}.{at}", name) if at else (name,)
            if not at:
                block.places.append(name)
            return
        block = _as_block(name, m)
        if block is not None:
            blocks.append(block)
            seen[id(m)] = block
            return
        for child_name, child in m._modules.items():  # named_children() skips repeats
            if child is not None:
                walk(f"{name}.{child_name}" if name else child_name, child)

    walk("", model)
    return blocks


# ---- checks --------------------------------------------------------------------------------
@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd inside; every submodule's own mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def _first_tensor(out: object) -> Tensor | None:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return None


def _run(module: nn.Module, x: Tensor) -> Tensor | Exception:
    """``module(x)`` in eval mode (its first tensor), or the error it raised."""
    try:
        with _eval_mode(module):
            out = _first_tensor(module(x))
    except Exception as err:  # noqa: BLE001 -- probing a forward that may take other inputs
        return err
    return out if out is not None else TypeError(f"returned {type(out).__name__}")


def _close(got: object, ref: Tensor) -> bool:
    if not isinstance(got, Tensor) or got.shape != ref.shape:
        return False
    rel = max(1e-5, 8 * torch.finfo(ref.dtype).eps)
    return float((got - ref).abs().max()) <= rel * (float(ref.abs().max()) + 1e-3)


def _not_plain(block: FFNBlock, why: str) -> ValueError:
    return ValueError(
        f"cannot convert {block.name or '<model>'!r} ({type(block.owner).__name__}): it is not "
        f"a plain FFN fc2(act(fc1(x))) or fc2(act(gate(x)) * fc1(x)) ({why}); exclude it, or "
        f"describe it with padnet.convert.register_ffn_layout")


# ---- placement -----------------------------------------------------------------------------
def _set(parent: nn.Module, attr: str, value: object) -> None:
    if not isinstance(value, nn.Module):  # restoring a plain attribute (a function)
        parent._modules.pop(attr, None)
    setattr(parent, attr, value)


def _place(model: nn.Module, block: FFNBlock, moe: MoE) -> Callable[[], None]:
    """Put ``moe`` in place (and the identities); returns the function undoing it."""
    changes: list[tuple[nn.Module, str, object]] = []

    def put(root: nn.Module, path: str, new: nn.Module) -> None:
        parent_path, _, attr = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        changes.append((parent, attr, getattr(parent, attr)))
        _set(parent, attr, new)

    at = block.match.layout.moe_at
    if not at:
        for place in block.places:
            put(model, place, moe)
    else:
        put(block.owner, at, moe)
        for path in block.match.identities():
            put(block.owner, path, nn.Identity())

    def undo() -> None:
        for parent, attr, old in reversed(changes):
            _set(parent, attr, old)

    return undo


def _before_name(block: FFNBlock) -> str:
    """What the report calls the module(s) a block's MoE replaces."""
    if block.kind == "moe":
        return "MoE"
    at = block.match.layout.moe_at
    if not at:
        return type(block.owner).__name__
    names = [type(block.owner.get_submodule(at)).__name__]
    for path in block.match.identities():  # e.g. BertIntermediate+BertOutput.dense
        parent_path, _, attr = path.rpartition(".")
        names.append(f"{type(block.owner.get_submodule(parent_path)).__name__}.{attr}")
    return "+".join(names)


# ---- model hooks ---------------------------------------------------------------------------
class AttentionMaskHint:
    """Forward pre-hook (with kwargs): pass the model's ``attention_mask`` to its MoE layers as
    their padding mask hint, for the duration of the forward (a picklable callable)."""

    def __init__(self, layers: Iterable[MoE]) -> None:
        self.layers = list(layers)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and args:
            try:
                mask = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
                mask = mask.get("attention_mask")
            except TypeError:
                mask = None
        mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
        for layer in self.layers:
            layer.padding_mask_hint = mask

    def clear(self, module: nn.Module, args: tuple, output: object) -> None:  # forward hook
        for layer in self.layers:
            layer.padding_mask_hint = None


def _install_mask_hint(model: nn.Module, layers: list[MoE]) -> None:
    if "attention_mask" not in inspect.signature(model.forward).parameters:
        return
    for hook in model._forward_pre_hooks.values():
        if isinstance(hook, AttentionMaskHint):  # converted before: extend the same hook
            hook.layers.extend(m for m in layers if m not in hook.layers)
            return
    hint = AttentionMaskHint(layers)
    model.register_forward_pre_hook(hint, with_kwargs=True)
    model.register_forward_hook(hint.clear, always_call=True)


class AuxPassHook:
    """Forward pre-hook and (``end``) forward hook of a converted model: each forward of the
    model is one aux pass of its MoE layers (:meth:`MoE.start_aux_pass`), so a layer applied
    several times in it (a shared layer) reports the sum of its auxiliary losses. Holds the
    layers' qualified names, not the layers: copies and exported models stay consistent (a
    name that no longer holds a MoE is passed over)."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = list(names)

    def _layers(self, model: nn.Module) -> Iterator[MoE]:
        for name in self.names:
            layer = _get(model, name)
            if isinstance(layer, MoE):
                yield layer

    def __call__(self, model: nn.Module, args: tuple) -> None:
        for layer in self._layers(model):
            layer.start_aux_pass()

    def end(self, model: nn.Module, args: tuple, output: object) -> None:
        for layer in self._layers(model):
            layer.end_aux_pass()


def _install_aux_pass(model: nn.Module, names: list[str]) -> None:
    for hook in model._forward_pre_hooks.values():
        if isinstance(hook, AuxPassHook):
            hook.names.extend(n for n in names if n not in hook.names)
            return
    hook = AuxPassHook(names)
    model.register_forward_pre_hook(hook)
    model.register_forward_hook(hook.end, always_call=True)


# ---- selection -----------------------------------------------------------------------------
def _select(blocks: list[FFNBlock], layers: Sequence[int] | None) -> set[int]:
    if layers is None:
        return set(range(len(blocks)))
    if isinstance(layers, int) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in layers
    ):
        raise TypeError(f"layers must be a list of ints or None, got {layers!r}")
    chosen = set()
    for i in layers:
        if not -len(blocks) <= i < len(blocks):
            raise ValueError(f"layers: index {i} out of range for {len(blocks)} FFN block(s)")
        chosen.add(i % len(blocks))
    return chosen


def _check_include(model: nn.Module, blocks: list[FFNBlock], include: list[str]) -> None:
    names = dict(model.named_modules())
    block_names = {n for b in blocks for n in (b.name, *b.aliases)}
    for pat in include:
        if pat in names and pat not in block_names:
            m = names[pat]
            raise ValueError(
                f"cannot convert module {pat!r} of type {type(m).__name__} with method='moe': "
                f"it is not an FFN block ({_recognised()})"
            )
        if not any(fnmatch.fnmatchcase(n, pat) for n in block_names):
            raise ValueError(f"include pattern {pat!r} matches no FFN block of the model")


def _matches(block: FFNBlock, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for n in (block.name, *block.aliases) for p in patterns)


# ---- conversion ----------------------------------------------------------------------------
def dynamize_moe(
    model: nn.Module,
    *,
    num_experts: int = 8,
    top_k: int = 2,
    layers: Sequence[int] | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    init: str = "copy",
    copy_noise_std: float = 0.0,
    padding_from_attention_mask: bool = True,
    **moe_kwargs,
) -> ConversionReport:
    """Replace the FFN blocks of ``model`` by :class:`MoE` layers (gated ones for gated FFNs),
    in place.

    Args:
        model: any module holding FFN blocks (module docstring); a BERT layer may be the model.
        num_experts, top_k: per MoE.
        layers: indices into the FFN blocks in module order, converted ones included (for
            BERT: the encoder layer indices; a shared block counts once); None converts all.
        include, exclude: fnmatch patterns on the blocks' qualified names (the MoE's name, e.g.
            ``bert.encoder.layer.3.intermediate``, or the parent's, ``bert.encoder.layer.3``).
        init: ``'copy'`` (upcycling, function-preserving, checked), ``'copy_noise'`` (plus
            relative noise ``copy_noise_std`` on the expert copies) or ``'kaiming'`` (random).
        padding_from_attention_mask: when the model's forward takes an ``attention_mask``, hook
            it in as the MoE padding mask.
        **moe_kwargs: passed to :class:`MoE` (``dynamic_ratio``, ``scale_mode``,
            ``capacity_factor``, ``router_noise``, ``router_noise_std``, ``load_balance_coef``,
            ``activation``...; not ``gated``, which the FFN decides).
    Returns:
        The :class:`ConversionReport` (converted blocks, and skipped ones with the reason).
    Raises:
        ValueError: no FFN block in the model, a bad ``layers`` index, an include pattern that
        matches no block or names a module that is not an FFN, or a block whose conversion does
        not preserve its function (checked on a random input).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_choice(init, "init", INITS)
    if "gated" in moe_kwargs:
        raise ValueError(f"gated={moe_kwargs['gated']!r}: whether experts are gated follows the "
                         "FFN being converted; leave it out")
    inc = [include] if isinstance(include, str) else None if include is None else list(include)
    exc = [exclude] if isinstance(exclude, str) else None if exclude is None else list(exclude)
    blocks = find_ffn_blocks(model)
    if not blocks:
        raise ValueError(f"found no FFN block to convert in {type(model).__name__} "
                         f"(recognised: {_recognised()})")
    chosen = _select(blocks, layers)
    if inc is not None:
        _check_include(model, blocks, inc)
    report = ConversionReport("moe")
    converted: list[tuple[str, MoE]] = []
    for i, block in enumerate(blocks):
        before = _before_name(block)
        reason = ("already a MoE" if block.kind == "moe"
                  else "not in layers" if i not in chosen
                  else "not in include" if inc is not None and not _matches(block, inc)
                  else "excluded" if exc is not None and _matches(block, exc) else "")
        if reason:
            report.skipped.append(ConversionEntry(block.name, before, reason=reason))
            continue
        moe = _convert(model, block, num_experts, top_k, init, copy_noise_std, moe_kwargs)
        converted.append((block.name, moe))
        report.converted.append(ConversionEntry(block.name, before, type(moe).__name__))
    if converted:
        if padding_from_attention_mask:
            _install_mask_hint(model, [m for _, m in converted])
        _install_aux_pass(model, [n for n, _ in converted])
    if not report.converted and all(e.reason == "already a MoE" for e in report.skipped):
        raise ValueError(f"every FFN block of {type(model).__name__} is a MoE already (from an "
                         "earlier conversion): convert a fresh copy of the dense model")
    return report


def _build(match: FFNMatch, activation: Callable[[Tensor], Tensor], num_experts: int,
           top_k: int, init: str, copy_noise_std: float, kwargs: dict) -> MoE:
    """The MoE upcycled from the matched FFN (``W1`` from the gate of a gated FFN, ``W3`` from
    its up projection; transposed weights read as ``(out, in)``)."""
    gated = match.gate_proj is not None
    first = match.gate_proj if gated else match.in_proj  # the activated projection: w1
    projs = [p for p in (match.in_proj, match.out_proj, match.gate_proj) if p is not None]
    w = first.weight
    moe = MoE(match.hidden_size, match.intermediate_size, num_experts, top_k,
              activation=activation, gated=gated, bias=any(p.bias is not None for p in projs),
              device=w.device, dtype=w.dtype, **kwargs)
    if init != "kaiming":
        up = {"w3": match.in_proj.weight, "b3": match.in_proj.bias} if gated else {}
        moe.load_dense(first.weight, first.bias, match.out_proj.weight, match.out_proj.bias,
                       **up, copy_noise_std=copy_noise_std if init == "copy_noise" else 0.0)
    return moe


class _DenseProbe(nn.Module):
    """The dense FFN of a match as a module, put where the MoE will go to check the placement."""

    def __init__(self, match: FFNMatch, activation: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.compute = lambda x: match.dense(x, activation)  # not registering the parts

    def forward(self, x: Tensor) -> Tensor:
        return self.compute(x)


def _check_structure(model: nn.Module, block: FFNBlock,
                     activation: Callable[[Tensor], Tensor], x: Tensor) -> None:
    """Raise unless the dense FFN of the block's parts, put where the MoE goes (the parts
    outside it made ``nn.Identity``), leaves the parent's output on ``x`` unchanged. A parent
    that does not run on ``x`` alone is not checked (it must be the FFN when the MoE replaces
    it)."""
    at = block.match.layout.moe_at
    before = _run(block.owner, x)
    if not isinstance(before, Tensor):
        if not at:
            raise _not_plain(block, f"its forward does not take one tensor: {before}") from before
        return
    probe = _DenseProbe(block.match, activation)
    undo = _place(model, block, probe)
    try:
        after = _run(probe if not at else block.owner, x)
    finally:
        undo()
    if not _close(after, before):
        if not at:
            raise _not_plain(block, "its forward is not the FFN of its parts")
        raise ValueError(f"layout {block.kind!r} does not describe {block.name!r} "
                         f"({type(block.owner).__name__}): with the FFN at {at!r} and "
                         f"{block.match.identities()} made nn.Identity its output changed; fix "
                         "the layout, or exclude the block")


def _convert(
    model: nn.Module, block: FFNBlock, num_experts: int, top_k: int, init: str,
    copy_noise_std: float, moe_kwargs: dict,
) -> MoE:
    kwargs = dict(moe_kwargs)
    activation = kwargs.pop("activation", block.activation)
    if activation is None:
        raise ValueError(
            f"cannot convert {block.name!r}: no activation found (attributes "
            f"{', '.join(ACTIVATION_NAMES)}, or one parameter-free child); pass activation=..."
        )
    if not block.moe_at and not block.name:
        raise ValueError(
            f"the model itself ({type(model).__name__}) is the FFN and cannot be replaced in "
            f"place; use padnet.layers.moe.MoE.from_dense"
        )
    w = block.match.in_proj.weight
    x = torch.randn(2, 4, block.match.hidden_size, device=w.device, dtype=w.dtype)
    host_act = block.activation if block.activation is not None else \
        resolve_activation(activation)[1]  # a name given: its function
    checked = w.device.type != "meta"  # meta tensors hold no values to compare
    if checked:
        _check_structure(model, block, host_act, x)
    moe = _build(block.match, activation, num_experts, top_k, init, copy_noise_std, kwargs)
    moe.train(block.owner.training)
    exact = checked and init == "copy" and not any(  # prune: static positions are zero
        p.mode_mask.pruned and p.mode_mask.num_dynamic < p.mode_mask.numel
        for p in moe.pad_weights())
    if exact:  # the upcycled MoE equals the dense FFN
        with _eval_mode(moe):
            same = _close(moe(x), block.match.dense(x, host_act))
        moe.aux_loss, moe.aux_terms = None, {}  # nothing from the check
        if not same:
            raise _not_plain(block, "the upcycled MoE differs from it" + (
                "; activation= differs from its own" if activation is not block.activation
                and block.activation is not None else ""))
    _place(model, block, moe)
    return moe


register_method("moe", dynamize_moe, target="ffn",
                description="mixture of experts upcycled from feed-forward blocks")
