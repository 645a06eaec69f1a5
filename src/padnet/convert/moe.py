"""Turn the feed-forward blocks of a model into (PAD-)MoE layers, in place (docs/method.md §2.2,
§3).

FFN blocks found by walking the module tree, in module order:

* BERT-family layers (Hugging Face ``BertLayer`` and look-alikes): a module with
  ``intermediate.dense`` (Linear), ``intermediate.intermediate_act_fn`` and ``output.dense``
  (Linear) next to ``output.LayerNorm``. The MoE replaces ``intermediate`` and ``output.dense``
  becomes ``nn.Identity``, so HF's own forward runs unchanged:
  ``LayerNorm(dropout(MoE(h)) + h)`` with the residual, dropout and LayerNorm of ``BertOutput``.
  A forward pre-hook on the converted model hands its ``attention_mask`` to the MoE layers as
  the padding mask (padding left out of the auxiliary losses).
* ``nn.Sequential(Linear, activation, Linear)``.
* A module whose Linear children are exactly ``fc1`` and ``fc2`` and that has an activation
  attribute (``act``, ``act_fn``, ``activation``, ``activation_fn``), e.g. timm's ``Mlp``.

``init='copy'`` upcycles (``W_s = W_e = W_dense``, ``b_e = b_dense``): since the kept gates sum
to 1 the model is unchanged for any routing and mask, and each conversion is checked on a random
input (a block that does not compute ``fc2(act(fc1(x)))`` raises ValueError).
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from padnet.convert.methods import register_method
from padnet.convert.report import ConversionEntry, ConversionReport
from padnet.layers.moe import MoE

__all__ = ["AttentionMaskHint", "FFNBlock", "dynamize_moe", "find_ffn_blocks"]

_ACT_NAMES = ("act", "act_fn", "activation", "activation_fn")


@dataclass
class FFNBlock:
    """One convertible FFN: where the MoE goes (``name``), the dense parts, and its kind."""

    name: str  # qualified name the MoE has or will have
    aliases: tuple[str, ...]  # other names that refer to the block (the BERT layer's name)
    kind: str  # 'bert', 'sequential', 'fc', or 'moe' (converted already)
    fc1: nn.Linear | None
    fc2: nn.Linear | None
    activation: Callable[[Tensor], Tensor] | None
    owner: nn.Module  # the module that holds the block


def _is_linear(m: object) -> bool:
    return isinstance(m, nn.Linear)


def _ffn_dims_ok(fc1: nn.Linear, fc2: nn.Linear) -> bool:
    return fc1.out_features == fc2.in_features and fc2.out_features == fc1.in_features


def _as_block(name: str, m: nn.Module) -> FFNBlock | None:
    """The FFN block that ``m`` (named ``name``) is, or None."""
    inter, out = getattr(m, "intermediate", None), getattr(m, "output", None)
    prefix = f"{name}." if name else ""
    if isinstance(m, MoE):
        return FFNBlock(name, (), "moe", None, None, None, m)
    if isinstance(inter, MoE):  # a BERT layer converted before
        return FFNBlock(f"{prefix}intermediate", (name,), "moe", None, None, None, m)
    if (inter is not None and out is not None and _is_linear(getattr(inter, "dense", None))
            and _is_linear(getattr(out, "dense", None)) and hasattr(out, "LayerNorm")):
        act = getattr(inter, "intermediate_act_fn", None)
        return FFNBlock(f"{prefix}intermediate", (name,), "bert", inter.dense, out.dense, act, m)
    if isinstance(m, nn.Sequential) and len(m) == 3 and _is_linear(m[0]) and _is_linear(m[2]):
        act = m[1]
        if not _is_linear(act) and not any(True for _ in act.parameters()):
            if _ffn_dims_ok(m[0], m[2]):
                return FFNBlock(name, (), "sequential", m[0], m[2], act, m)
    linears = {n for n, c in m.named_children() if _is_linear(c)}
    if linears == {"fc1", "fc2"} and _ffn_dims_ok(m.fc1, m.fc2):
        act = next((getattr(m, a) for a in _ACT_NAMES if callable(getattr(m, a, None))), None)
        return FFNBlock(name, (), "fc", m.fc1, m.fc2, act, m)
    return None


def find_ffn_blocks(model: nn.Module) -> list[FFNBlock]:
    """Every FFN block of ``model`` in module order (not descending into a block found),
    including those converted to a MoE already (``kind='moe'``), so indices stay stable."""
    blocks: list[FFNBlock] = []

    def walk(name: str, m: nn.Module) -> None:
        block = _as_block(name, m)
        if block is not None:
            blocks.append(block)
            return
        for child_name, child in m.named_children():
            walk(f"{name}.{child_name}" if name else child_name, child)

    walk("", model)
    return blocks


def _dense_fn(block: FFNBlock) -> Callable[[Tensor], Tensor]:
    """The block's own computation: its forward (generic blocks), or BERT's FFN path."""
    if block.kind != "bert":
        return block.owner
    return lambda x: block.fc2(block.activation(block.fc1(x)))


def _check_preserved(block: FFNBlock, moe: MoE, dense: Callable[[Tensor], Tensor]) -> None:
    """Raise unless ``moe`` equals the dense block on a random input (eval mode, no noise)."""
    w = block.fc1.weight
    x = torch.randn(16, block.fc1.in_features, device=w.device, dtype=w.dtype)
    modes = [(m, m.training) for m in (block.owner, moe)]
    try:
        block.owner.eval()
        moe.eval()
        with torch.no_grad():
            ref, got = dense(x), moe(x)
    except (TypeError, RuntimeError) as err:  # a forward that is not x -> FFN(x)
        ref, got = err, None
    finally:
        for m, mode in modes:
            m.train(mode)
    rel = max(1e-5, 8 * torch.finfo(w.dtype).eps)
    if not isinstance(ref, Tensor) or ref.shape != got.shape or (
        float((got - ref).abs().max()) > rel * (float(ref.abs().max()) + 1e-3)
    ):
        raise ValueError(
            f"cannot convert {block.name or '<model>'!r} ({type(block.owner).__name__}): it is "
            f"not a plain FFN fc2(act(fc1(x))) (the upcycled MoE differs from it); exclude it"
        )


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
            hook.layers.extend(layers)
            return
    hint = AttentionMaskHint(layers)
    model.register_forward_pre_hook(hint, with_kwargs=True)
    model.register_forward_hook(hint.clear, always_call=True)


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
                f"it is not an FFN block (BERT layer, Sequential(Linear, act, Linear) or an "
                f"fc1/fc2 MLP)"
            )
        if not any(fnmatch.fnmatchcase(n, pat) for n in block_names):
            raise ValueError(f"include pattern {pat!r} matches no FFN block of the model")


def _matches(block: FFNBlock, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for n in (block.name, *block.aliases) for p in patterns)


def _before_name(block: FFNBlock) -> str:
    """What the report calls the module(s) a block's MoE replaces."""
    if block.kind == "moe":
        return "MoE"
    if block.kind == "bert":  # the MoE takes the place of intermediate and output.dense
        owner = block.owner
        return f"{type(owner.intermediate).__name__}+{type(owner.output).__name__}.dense"
    return type(block.owner).__name__


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
    """Replace the FFN blocks of ``model`` by :class:`MoE` layers, in place.

    Args:
        model: any module holding FFN blocks (module docstring); a BERT layer may be the model.
        num_experts, top_k: per MoE.
        layers: indices into the FFN blocks in module order, converted ones included (for
            BERT: the encoder layer indices); None converts all.
        include, exclude: fnmatch patterns on the blocks' qualified names (the MoE's name, e.g.
            ``bert.encoder.layer.3.intermediate``, or the BERT layer's, ``bert.encoder.layer.3``).
        init: ``'copy'`` (upcycling, function-preserving, checked), ``'copy_noise'`` (plus
            relative noise ``copy_noise_std`` on the expert copies) or ``'kaiming'`` (random).
        padding_from_attention_mask: for BERT blocks, hook the model's ``attention_mask`` in as
            the MoE padding mask.
        **moe_kwargs: passed to :class:`MoE` (``dynamic_ratio``, ``scale_mode``,
            ``capacity_factor``, ``router_noise``, ``router_noise_std``, ``load_balance_coef``,
            ``activation``...).
    Returns:
        The :class:`ConversionReport` (converted blocks, and skipped ones with the reason).
    Raises:
        ValueError: no FFN block in the model, a bad ``layers`` index, an include pattern that
        matches no block or names a module that is not an FFN, or a block that is not plain.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    inc = [include] if isinstance(include, str) else None if include is None else list(include)
    exc = [exclude] if isinstance(exclude, str) else None if exclude is None else list(exclude)
    blocks = find_ffn_blocks(model)
    if not blocks:
        raise ValueError(
            f"found no FFN block to convert in {type(model).__name__} (BERT layer, "
            f"Sequential(Linear, act, Linear) or an fc1/fc2 MLP)"
        )
    chosen = _select(blocks, layers)
    if inc is not None:
        _check_include(model, blocks, inc)
    report = ConversionReport("moe")
    converted_bert: list[MoE] = []
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
        if block.kind == "bert":
            converted_bert.append(moe)
        report.converted.append(ConversionEntry(block.name, before, type(moe).__name__))
    if converted_bert and padding_from_attention_mask:
        _install_mask_hint(model, converted_bert)
    if not report.converted and all(e.reason == "already a MoE" for e in report.skipped):
        raise ValueError(f"every FFN block of {type(model).__name__} is a MoE already (from an "
                         "earlier conversion): convert a fresh copy of the dense model")
    return report


def _convert(
    model: nn.Module, block: FFNBlock, num_experts: int, top_k: int, init: str,
    copy_noise_std: float, moe_kwargs: dict,
) -> MoE:
    kwargs = dict(moe_kwargs)
    activation = kwargs.pop("activation", block.activation)
    if activation is None:
        raise ValueError(
            f"cannot convert {block.name!r}: no activation attribute ({', '.join(_ACT_NAMES)}) "
            f"found; pass activation=..."
        )
    if block.kind != "bert" and not block.name:
        raise ValueError(
            f"the model itself ({type(model).__name__}) is the FFN and cannot be replaced in "
            f"place; use padnet.layers.moe.MoE.from_dense"
        )
    moe = MoE.from_dense(block.fc1, block.fc2, activation, num_experts=num_experts,
                         top_k=top_k, init=init, copy_noise_std=copy_noise_std, **kwargs)
    m1 = moe.mode_mask1
    lam_s_zero = m1.scale_mode == "prune" and m1.num_dynamic < m1.numel
    if init == "copy" and not lam_s_zero:
        _check_preserved(block, moe, _dense_fn(block))
    if block.kind == "bert":
        block.owner.intermediate = moe
        block.owner.output.dense = nn.Identity()
    else:
        parent_name, _, attr = block.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, moe)
    return moe


register_method("moe", dynamize_moe, target="ffn",
                description="mixture of experts upcycled from feed-forward blocks")
