"""The pieces of the loop that depend only on their arguments: seeding, mixed precision, the
learning-rate and temperature schedules of a step, one optimizer step, and evaluation."""

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

from padnet.train.build import batch_inputs, lr_at, model_logits
from padnet.train.config import TrainConfig
from padnet.train.distributed import all_reduce_sum
from padnet.train.metrics import classification_metrics, confusion_matrix
from padnet.train.state import StepStats
from padnet.utils.io import fault_point

__all__ = ["autocast_for", "evaluate", "has_aux_loss", "seed_everything", "set_schedules",
           "train_step"]


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
    """True for methods whose layers add auxiliary losses (those converting FFNs: MoE)."""
    from padnet.convert import get_method

    return cfg.method != "none" and get_method(cfg.method).target == "ffn"


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
    cross-entropy plus ``aux_weight`` times the MoE auxiliary losses, backward (scaled when a
    GradScaler is given), gradient clipping and the optimizer step."""
    from padnet.layers import aux_loss

    inputs, targets = batch_inputs(batch, device)
    with autocast():
        logits = model_logits(net if net is not None else model, inputs)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=cfg.label_smoothing)
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
    """Mean loss, accuracy, macro F1 and MCC of ``model`` on ``loader`` (summed over ranks)."""
    was_training = model.training
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for batch in loader:
        inputs, targets = batch_inputs(batch, device)
        with autocast():
            logits = model_logits(model, inputs).float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").double().cpu()
        cm += confusion_matrix(logits.argmax(-1), targets, num_classes)
    model.train(was_training)
    pair = all_reduce_sum(torch.cat([cm.view(-1).double(), loss_sum.view(1)]).to(device)).cpu()
    cm = pair[:-1].round().long().view(num_classes, num_classes)
    count = int(cm.sum())
    return {"loss": float(pair[-1]) / max(count, 1), **classification_metrics(cm)}
