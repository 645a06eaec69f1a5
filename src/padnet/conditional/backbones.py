"""How early exits cut a host model into units: padnet's (and torchvision's) ResNets and
MobileNetV2, and Hugging Face BERT encoders (docs/method.md §6).

A backbone description holds no modules and no tensors: it names the host's *units* (the pieces
between which an exit may sit) in execution order and knows how to run a list of them on a
*state*, what an exit head sees of the state, how to keep some rows of a state (the batch shrinks
as samples exit), and the host's own classifier (the final exit). Modules are looked up on the
host at every call, so a host converted after the exits were added (``padnet.dynamize``) runs its
new layers. A ResNet stage that no exit cuts is called as a whole; hooks on a container that a
segment boundary cuts through (MobileNetV2's ``features``, BERT's ``encoder``) do not fire.

* CNN state: the feature map ``(B, C, H, W)``.
* BERT state: :class:`TextState`, the hidden states ``(B, T, H)`` and the ``(B, T)`` attention
  mask (1 = token, 0 = padding); they are indexed together, and the additive attention mask the
  layers need is rebuilt from the ``(B, T)`` mask by transformers' own helper.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["Backbone", "ClsHead", "PoolHead", "TextState", "backbone_for", "padding_hints"]


class PoolHead(nn.Module):
    """Exit head for a feature map: global average pool, then a linear classifier.
    ``(B, in_channels, H, W) -> (B, num_classes)``."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))  # (B, C) -> (B, num_classes)


class ClsHead(nn.Module):
    """Exit head for a transformer encoder: the ``[CLS]`` (first) token's hidden state through
    dense + tanh (like BERT's pooler), dropout and a linear classifier.
    ``(B, T, hidden) -> (B, num_classes)``."""

    def __init__(self, hidden_size: int, num_classes: int, *, dropout: float = 0.1) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_classes)

    def forward(self, hidden: Tensor) -> Tensor:
        pooled = torch.tanh(self.dense(hidden[:, 0]))  # (B, hidden)
        return self.classifier(self.dropout(pooled))


@contextlib.contextmanager
def padding_hints(module: nn.Module, valid: Tensor | None) -> Iterator[None]:
    """While active, every submodule of ``module`` that takes a padding-mask hint (an attribute
    ``padding_mask_hint``: padnet's MoE layers, trained or deployed) gets ``valid`` ``(B, T)``
    (nonzero = token), so that padding stays out of its routing statistics and auxiliary loss
    when the layers run on other sequences than the host model's input (a segment of an
    early-exit model, the selected or merged tokens of a layer). The previous hints are
    restored afterwards."""
    holders = [m for m in module.modules() if hasattr(m, "padding_mask_hint")]
    saved = [m.padding_mask_hint for m in holders]
    for m in holders:
        m.padding_mask_hint = valid
    try:
        yield
    finally:
        for m, hint in zip(holders, saved, strict=True):
            m.padding_mask_hint = hint


class TextState(NamedTuple):
    """What flows between BERT units: hidden states ``(B, T, H)`` and attention mask ``(B, T)``."""

    hidden: Tensor
    mask: Tensor


def _out_channels(module: nn.Module) -> int:
    """Channels of a CNN unit's output: its ``out_channels`` attribute, else its last
    BatchNorm's features, else the last ``out_channels`` found in it."""
    own = getattr(module, "out_channels", None)
    if isinstance(own, int):
        return own
    norms = [m.num_features for m in module.modules() if isinstance(m, _BatchNorm)]
    if norms:
        return norms[-1]
    found = [m.out_channels for m in module.modules() if isinstance(getattr(m, "out_channels",
                                                                            None), int)]
    if not found:
        raise ValueError(f"cannot tell the output channels of {type(module).__name__}; pass "
                         "head_factory with heads that infer their input size")
    return found[-1]


class Backbone:
    """One family of host models; subclasses fill in the methods (module docstring)."""

    family = ""

    def __init__(self, units: list[str], aliases: dict[str, str] | None = None) -> None:
        self.units = units  # every unit, in execution order
        self.aliases = aliases or {}  # extra accepted exit names -> unit name

    def exit_candidates(self) -> list[str]:
        """Names after which an exit may sit (every unit but the last)."""
        last = self.units[-1]
        return ([u for u in self.units[:-1] if u != "stem"]
                + [a for a, u in self.aliases.items() if u != last])

    def prepare(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def run(self, model: nn.Module, units: list[str], state: Any) -> Any:
        raise NotImplementedError

    def features(self, state: Any) -> Tensor:
        return state

    def final(self, model: nn.Module, state: Any) -> Tensor | None:
        """The host's own classifier on the last state, or None when it has none."""
        raise NotImplementedError

    def width(self, model: nn.Module, unit: str) -> int:
        raise NotImplementedError

    def num_classes(self, model: nn.Module) -> int | None:
        raise NotImplementedError

    def default_head(self, model: nn.Module, in_features: int, num_classes: int) -> nn.Module:
        return PoolHead(in_features, num_classes)

    def select(self, state: Any, index: Tensor) -> Any:
        return state.index_select(0, index)

    def batch_size(self, state: Any) -> int:
        return int(state.shape[0])


def _image_input(args: tuple, kwargs: dict, family: str) -> Tensor:
    if kwargs or len(args) != 1:
        raise TypeError(f"a {family} early-exit model takes one image batch (B, C, H, W), got "
                        f"{len(args)} positional and keyword arguments {sorted(kwargs)}")
    x = args[0]
    if not isinstance(x, Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be an image batch of shape (B, C, H, W), got {got}")
    return x


class ResNetBackbone(Backbone):
    """padnet's / torchvision's ResNet: units ``stem``, then every block ``layerI.J``; a stage
    name ``layerI`` stands for its last block."""

    family = "ResNet"

    def __init__(self, model: nn.Module) -> None:
        units, aliases = ["stem"], {}
        self.stages: dict[str, list[str]] = {}  # stage name -> its block units
        stage = 1
        while isinstance(getattr(model, f"layer{stage}", None), nn.Sequential):
            name = f"layer{stage}"
            blocks = [f"{name}.{child}" for child, _ in getattr(model, name).named_children()]
            units += blocks
            if blocks:
                aliases[name] = blocks[-1]
                self.stages[name] = blocks
            stage += 1
        super().__init__(units, aliases)

    @staticmethod
    def matches(model: nn.Module) -> bool:
        names = ("conv1", "bn1", "relu", "maxpool", "layer1", "avgpool", "fc")
        return all(hasattr(model, n) for n in names) and isinstance(model.fc, nn.Linear)

    def prepare(self, model: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
        return _image_input(args, kwargs, self.family)

    def run(self, model: nn.Module, units: list[str], state: Tensor) -> Tensor:
        i = 0
        while i < len(units):
            unit = units[i]
            blocks = self.stages.get(unit.split(".")[0], [])
            if unit == "stem":
                state = model.maxpool(model.relu(model.bn1(model.conv1(state))))
            elif units[i:i + len(blocks)] == blocks:  # a whole stage: call it (and its hooks)
                state = model.get_submodule(unit.split(".")[0])(state)
                i += len(blocks)
                continue
            else:
                state = model.get_submodule(unit)(state)
            i += 1
        return state

    def final(self, model: nn.Module, state: Tensor) -> Tensor:
        return model.fc(torch.flatten(model.avgpool(state), 1))  # (B, C) -> (B, classes)

    def width(self, model: nn.Module, unit: str) -> int:
        return _out_channels(model.bn1 if unit == "stem" else model.get_submodule(unit))

    def num_classes(self, model: nn.Module) -> int:
        return model.fc.out_features


class MobileNetV2Backbone(Backbone):
    """padnet's / torchvision's MobileNetV2: units ``features.N``."""

    family = "MobileNetV2"

    def __init__(self, model: nn.Module) -> None:
        super().__init__([f"features.{name}" for name, _ in model.features.named_children()])

    @staticmethod
    def matches(model: nn.Module) -> bool:
        return (isinstance(getattr(model, "features", None), nn.Sequential)
                and isinstance(getattr(model, "classifier", None), nn.Module)
                and any(isinstance(m, nn.Linear) for m in model.classifier.modules()))

    def prepare(self, model: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
        return _image_input(args, kwargs, self.family)

    def run(self, model: nn.Module, units: list[str], state: Tensor) -> Tensor:
        for unit in units:
            state = model.get_submodule(unit)(state)
        return state

    def final(self, model: nn.Module, state: Tensor) -> Tensor:
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(state, 1), 1)  # (B, C)
        return model.classifier(pooled)

    def width(self, model: nn.Module, unit: str) -> int:
        return _out_channels(model.get_submodule(unit))

    def num_classes(self, model: nn.Module) -> int:
        return [m for m in model.classifier.modules() if isinstance(m, nn.Linear)][-1].out_features


_BERT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")


class BertBackbone(Backbone):
    """A Hugging Face ``BertModel`` (units ``encoder.layer.I``; no classifier of its own) or
    ``BertForSequenceClassification`` (units ``bert.encoder.layer.I``; final exit = its pooler,
    dropout and classifier)."""

    family = "BERT"

    def __init__(self, model: nn.Module) -> None:
        self.prefix = "" if _is_bert_encoder(model) else "bert."
        encoder = self.encoder_model(model)
        if getattr(encoder.config, "is_decoder", False):
            raise ValueError("early exits need a bidirectional encoder; this BERT has "
                             "config.is_decoder=True")
        _refuse_merging(encoder)
        super().__init__([f"{self.prefix}encoder.layer.{i}"
                          for i in range(len(encoder.encoder.layer))])

    @staticmethod
    def matches(model: nn.Module) -> bool:
        if _is_bert_encoder(model):
            return True
        return (_is_bert_encoder(getattr(model, "bert", None))
                and isinstance(getattr(model, "classifier", None), nn.Linear)
                and getattr(model.bert, "pooler", None) is not None)

    def encoder_model(self, model: nn.Module) -> nn.Module:
        return model if self.prefix == "" else model.bert

    def prepare(self, model: nn.Module, *args: Any, **kwargs: Any) -> TextState:
        if len(args) > len(_BERT_INPUTS):
            raise TypeError(f"a BERT early-exit model takes at most {len(_BERT_INPUTS)} "
                            f"positional inputs {_BERT_INPUTS}, got {len(args)}")
        unknown = sorted(set(kwargs) - set(_BERT_INPUTS))
        if unknown:
            raise TypeError(f"unexpected inputs {unknown}; a BERT early-exit model takes "
                            f"{_BERT_INPUTS} (drop 'labels' from the batch)")
        inputs = dict(zip(_BERT_INPUTS, args, strict=False)) | kwargs
        ids, embeds = inputs.get("input_ids"), inputs.get("inputs_embeds")
        if (ids is None) == (embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) and inputs_embeds (B, T, H)")
        encoder = self.encoder_model(model)
        _refuse_merging(encoder)  # merge_tokens may have run on the host after add_exits
        hidden = encoder.embeddings(input_ids=ids, token_type_ids=inputs.get("token_type_ids"),
                                    position_ids=inputs.get("position_ids"),
                                    inputs_embeds=embeds)  # (B, T, H)
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        elif not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(hidden.shape[:2]):
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"attention_mask must have shape {tuple(hidden.shape[:2])} "
                             f"(batch, tokens), got {got}")
        return TextState(hidden, mask)

    def run(self, model: nn.Module, units: list[str], state: TextState) -> TextState:
        encoder = self.encoder_model(model)
        additive = _layer_mask(encoder, state)
        hidden = state.hidden
        for unit in units:
            layer = model.get_submodule(unit)
            with padding_hints(layer, state.mask):  # the host's own mask hook does not run
                out = layer(hidden, additive)
            hidden = out[0] if isinstance(out, tuple) else out  # older transformers: tuples
        return TextState(hidden, state.mask)

    def features(self, state: TextState) -> Tensor:
        return state.hidden

    def final(self, model: nn.Module, state: TextState) -> Tensor | None:
        if self.prefix == "":
            return None
        return model.classifier(model.dropout(model.bert.pooler(state.hidden)))

    def width(self, model: nn.Module, unit: str) -> int:
        return int(self.encoder_model(model).config.hidden_size)

    def num_classes(self, model: nn.Module) -> int | None:
        return None if self.prefix == "" else model.classifier.out_features

    def default_head(self, model: nn.Module, in_features: int, num_classes: int) -> nn.Module:
        dropout = getattr(self.encoder_model(model).config, "hidden_dropout_prob", 0.1)
        return ClsHead(in_features, num_classes, dropout=dropout)

    def select(self, state: TextState, index: Tensor) -> TextState:
        return TextState(state.hidden.index_select(0, index), state.mask.index_select(0, index))

    def batch_size(self, state: TextState) -> int:
        return int(state.hidden.shape[0])


def _is_bert_encoder(model: Any) -> bool:
    encoder = getattr(model, "encoder", None)
    return (isinstance(model, nn.Module) and hasattr(model, "embeddings")
            and hasattr(model, "config") and isinstance(getattr(encoder, "layer", None),
                                                        nn.ModuleList))


def _refuse_merging(encoder: nn.Module) -> None:
    """ValueError for an encoder whose layers merge tokens (``merge_tokens``): merged
    sequences are shorter than the attention mask an exit carries, and the merge state would
    not follow a batch that shrinks as samples exit."""
    if any(getattr(layer, "merge_state", None) is not None for layer in encoder.encoder.layer):
        raise ValueError("early exits cannot be combined with token merging (merge_tokens): "
                         "use token selection (select_tokens) with early exits, or merging "
                         "without them")


def _layer_mask(encoder: nn.Module, state: TextState) -> Tensor | None:
    """The attention mask BERT's layers take, built from the ``(B, T)`` mask the way the host
    builds it (it depends on the attention implementation; None means "attend everywhere")."""
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers 4.x
        return encoder.get_extended_attention_mask(state.mask, state.mask.shape)
    return create_bidirectional_mask(config=encoder.config, inputs_embeds=state.hidden,
                                     attention_mask=state.mask)


_BACKBONES: tuple[type[Backbone], ...] = (ResNetBackbone, MobileNetV2Backbone, BertBackbone)


def backbone_for(model: nn.Module) -> Backbone:
    """The backbone description of ``model``; TypeError for a model of no supported family."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for kind in _BACKBONES:
        if kind.matches(model):
            return kind(model)
    families = ", ".join(k.family for k in _BACKBONES)
    raise TypeError(f"early exits support {families} models (ResNet: conv1/layerN/fc; "
                    "MobileNetV2: features/classifier; BertModel or "
                    f"BertForSequenceClassification), got {type(model).__name__}")

