"""The pieces of the loop that depend only on their arguments: seeding, mixed precision, the
learning-rate and temperature schedules of a step, one optimizer step, and evaluation.

A model with early exits (``exits``) trains on the joint loss of its exits
(:func:`~padnet.conditional.exit_loss`, docs/method.md §6.1) and is evaluated by its final
exit, which is the whole network; evaluation adds each intermediate exit's accuracy."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from padnet.train.build import batch_inputs, lr_at, model_outputs
from padnet.train.config import TrainConfig
from padnet.train.distributed import all_reduce_sum
from padnet.train.metrics import classification_metrics, confusion_matrix
from padnet.train.state import StepStats
from padnet.utils.io import fault_point

__all__ = ["autocast_for", "evaluate", "has_aux_loss", "seed_everything", "set_schedules",
           "task_loss", "train_step"]


def seed_everything(seed: int) -> None:
    """Seed the torch, Python and NumPy generators."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def autocast_for(device: torch.device, amp: str) -> Callable[[], Any]:
    """A factory of ``torch.autocast`` contexts on CUDA with ``amp`` set to ``bf16``/``fp16``;
    of no-op contexts otherwise."""
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return lambda: torch.autocast("cuda", dtype=dtype)


def has_aux_loss(cfg: TrainConfig) -> bool:
    """True when layers add auxiliary losses: methods converting FFNs (MoE), and token
    selection with a router loss (``token_aux_coef > 0``)."""
    from padnet.convert import get_method

    if cfg.tokens == "select" and cfg.token.aux_coef > 0:
        return True
    return cfg.method != "none" and get_method(cfg.method).target == "ffn"


def task_loss(outputs: tuple[torch.Tensor, ...], targets: torch.Tensor,
              cfg: TrainConfig) -> torch.Tensor:
    """The loss a run trains on (no auxiliary losses): cross-entropy of the logits, or for an
    early-exit model (several ``outputs``) the joint exit loss with the ``exit_*`` keys."""
    if len(outputs) == 1:
        return F.cross_entropy(outputs[0].float(), targets, label_smoothing=cfg.label_smoothing)
    from padnet.conditional import exit_loss

    ex = cfg.exit
    return exit_loss(outputs, targets, weights=ex.weights, distill=ex.distill,
                     temperature=ex.temperature, label_smoothing=cfg.label_smoothing)


def set_schedules(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                  step: int, *, total_steps: int, warmup: int,
                  steps_per_epoch: int) -> tuple[float, float | None]:
    """Set the learning rate of optimizer step ``step`` and, for methods that anneal it, the
    router temperature; returns ``(lr, temperature or None)``."""
    from padnet.convert import get_method

    lr = lr_at(step, base=cfg.lr, min_lr=cfg.min_lr, total=total_steps, warmup=warmup,
               schedule=cfg.schedule)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if cfg.method == "none" or not get_method(cfg.method).anneals_temperature:
        return lr, None
    import padnet

    temperature = padnet.temperature_schedule(
        step / steps_per_epoch, start=cfg.temperature_start, end=cfg.temperature_end,
        anneal_epochs=cfg.temperature_anneal_epochs)
    padnet.set_temperature(model, temperature)
    return lr, temperature


def train_step(
    model: nn.Module, batch: Any, optimizer: torch.optim.Optimizer, cfg: TrainConfig, *,
    device: torch.device, net: nn.Module | None = None, scaler: Any = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> StepStats:
    """Forward (through ``net``, e.g. the DDP wrapper of ``model``; default ``model``),
    the task loss (:func:`task_loss`: cross-entropy, or the joint loss of the exits) plus
    ``aux_weight`` times the auxiliary losses, backward (scaled when a GradScaler is given),
    gradient clipping and the optimizer step. The accuracy counted is the final exit's."""
    from padnet.layers import aux_loss

    inputs, targets = batch_inputs(batch, device)
    with autocast():
        outputs = model_outputs(net if net is not None else model, inputs)
        logits = outputs[-1]
        loss = task_loss(outputs, targets, cfg)
        aux = aux_loss(model).float()
        total = loss + cfg.aux_weight * aux if has_aux_loss(cfg) else loss
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
    else:
        total.backward()
    fault_point("train_step")  # tests: a kill between backward and the optimizer step
    if cfg.grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return StepStats(float(loss.detach()), float(aux.detach()),
                     float((logits.detach().argmax(-1) == targets).sum()), len(targets))


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device,
             autocast: Any = contextlib.nullcontext) -> dict[str, float]:
    """Mean loss, accuracy, macro F1 and MCC of ``model`` on ``loader`` (summed over ranks).

    For an early-exit model these are the final exit's (the whole network), and
    ``exit{i}_acc`` adds the accuracy of intermediate exit ``i`` (0 = the first)."""
    was_training = model.training
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum = torch.zeros((), dtype=torch.float64)
    # correct predictions of the intermediate exits (the same count on every rank)
    exit_correct = torch.zeros(getattr(model, "num_exits", 1) - 1, dtype=torch.int64)
    for batch in loader:
        inputs, targets = batch_inputs(batch, device)
        with autocast():
            outputs = model_outputs(model, inputs)
        logits = outputs[-1].float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").double().cpu()
        cm += confusion_matrix(logits.argmax(-1), targets, num_classes)
        for i, z in enumerate(outputs[:-1]):
            exit_correct[i] += int((z.argmax(-1) == targets).sum())
    model.train(was_training)
    flat = torch.cat([cm.view(-1).double(), loss_sum.view(1), exit_correct.double()]).to(device)
    flat = all_reduce_sum(flat).cpu()
    n_cm = num_classes * num_classes
    cm = flat[:n_cm].round().long().view(num_classes, num_classes)
    count = int(cm.sum())
    metrics = {"loss": float(flat[n_cm]) / max(count, 1), **classification_metrics(cm)}
    for i, correct in enumerate(flat[n_cm + 1:].tolist()):
        metrics[f"exit{i}_acc"] = correct / count if count else 0.0
    return metrics
