"""The explicit training loop: :func:`train` runs one configuration end to end.

Per optimizer step: learning rate (warm-up, then cosine/linear), router temperature (DY-Conv
annealing), forward under autocast (CUDA only), cross-entropy plus ``aux_weight`` times the MoE
auxiliary losses, backward (GradScaler for fp16), gradient clipping, optimizer step, then one
step of interleaved IMP. Every ``eval_every`` epochs: evaluation (loss, accuracy, macro F1,
Matthews correlation) on val, and on test after the last epoch; every epoch a row of
``metrics.csv`` and a checkpoint; ``save_every`` adds checkpoints within epochs. A resumed run
continues bit for bit on CPU: the data order of epoch e comes from ``seed + e`` and is
fast-forwarded mid-epoch, and the RNG, optimizer, IMP and loop states are restored from the
checkpoint.

Run directory: ``config.yaml``, ``metrics.csv``, ``checkpoint/`` (latest), ``model.safetensors``
(final weights) and ``summary.json``. Under torchrun only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from padnet.train import checkpoint as ckpt
from padnet.train.build import (
    CONV_METHODS,
    batch_inputs,
    build_data,
    build_model,
    build_optimizer,
    lr_at,
    model_logits,
)
from padnet.train.config import TrainConfig
from padnet.train.distributed import (
    EpochSampler,
    all_reduce_sum,
    barrier,
    check_same_across_ranks,
    cleanup_distributed,
    init_distributed,
    sync_buffers,
)
from padnet.train.files import METRIC_COLUMNS, RunFiles
from padnet.train.metrics import classification_metrics, confusion_matrix

__all__ = ["METRIC_COLUMNS", "TrainResult", "Trainer", "evaluate", "seed_everything", "train"]



@dataclass
class TrainResult:
    """What :func:`train` returns: the trained (unwrapped) model and the run's records."""

    model: nn.Module
    run_dir: Path
    history: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    stopped: bool = False  # ended by ``stop_after`` (resume it to finish)
    splits: Any = None
    is_main: bool = True  # rank 0 (or a single process): the process that wrote the files


def seed_everything(seed: int) -> None:
    """Seed the torch, Python and NumPy generators."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


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


class Trainer(RunFiles):
    """One run: set-up in ``__init__``, :meth:`fit` trains (see the module doc)."""

    def __init__(self, cfg: TrainConfig, *, splits: Any = None, quiet: bool = False) -> None:
        self.cfg, self.quiet = cfg, quiet
        self.dist = init_distributed(cfg.device)
        self.device = self.dist.device
        self.run_dir = Path(cfg.out_dir)
        seed_everything(cfg.seed)
        self.splits = splits if splits is not None else build_data(cfg)
        s = self.splits
        self.in_chans = cfg.in_chans or (s.input_shape[0] if s.input_shape else None)
        self.model = build_model(cfg, num_classes=s.num_classes, in_chans=self.in_chans)
        self.model.to(self.device).train()
        self.optimizer = build_optimizer(cfg, self.model)
        self.net: nn.Module = self.model
        if self.dist.distributed:
            from padnet.layers.pad import pad_modules

            ids = [self.device.index] if self.device.type == "cuda" else None
            # PAD layers skip unused weights (W_s at kappa = 1, experts no token chose)
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=ids, find_unused_parameters=bool(pad_modules(self.model)))
        self.sampler = EpochSampler(len(s.train), seed=cfg.seed, rank=self.dist.rank,
                                    world_size=self.dist.world_size)
        self.drop_last = self.sampler.num_samples >= cfg.batch_size  # no batch of one for BN
        self.train_loader = self._loader(s.train, self.sampler, cfg.batch_size, self.drop_last)
        n = self.sampler.num_samples
        self.steps_per_epoch = n // cfg.batch_size if self.drop_last else -(-n // cfg.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup = cfg.warmup_steps or round(cfg.warmup_epochs * self.steps_per_epoch)
        self.eval_loaders = {name: self._eval_loader(ds) for name, ds in
                             (("val", s.val), ("test", s.test)) if ds is not None}
        self.use_amp = self.device.type == "cuda" and cfg.amp != "none"
        self.scaler = torch.amp.GradScaler("cuda") if self.use_amp and cfg.amp == "fp16" else None
        self.imp = self._make_imp() if cfg.imp_mode == "interleaved" else None
        self.imp_result: Any = None
        self.loop: dict[str, Any] = {"global_step": 0, "epoch": 0, "step_in_epoch": 0,
                                     "sums": self._zero_sums(), "history": [],
                                     "oneshot_done": False, "train_time_s": 0.0}

    # ---- set-up helpers ------------------------------------------------------------------
    def _loader(self, dataset: Any, sampler: Any, batch_size: int, drop_last: bool) -> DataLoader:
        gen = torch.Generator().manual_seed(self.cfg.seed)  # keeps the global RNG untouched
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                          collate_fn=self.splits.collate, num_workers=self.cfg.num_workers,
                          generator=gen, pin_memory=self.device.type == "cuda")

    def _eval_loader(self, dataset: Any) -> DataLoader:
        indices = list(range(self.dist.rank, len(dataset), self.dist.world_size))
        size = self.cfg.eval_batch_size or 2 * self.cfg.batch_size
        return self._loader(dataset, indices, size, False)

    def _imp_data(self) -> DataLoader:
        """Scoring batches for IMP: one fixed shuffled order (reproducible across resumes)."""
        sampler = EpochSampler(len(self.splits.train), seed=self.cfg.seed + 7919,
                               rank=self.dist.rank, world_size=self.dist.world_size)
        return self._loader(self.splits.train, sampler, self.cfg.batch_size, self.drop_last)

    def _make_imp(self) -> Any:
        from padnet.partition import IterativePartition

        c = self.cfg
        end = max(1, round(c.imp_warmup_fraction * self.total_steps))
        return IterativePartition(
            self.model, self._imp_data(), dynamic_ratio=c.dynamic_ratio, loss_fn=self._imp_loss,
            iterations=c.imp_iterations, start_step=0, end_step=end,
            num_batches=c.imp_num_batches, schedule=c.imp_schedule, scope=c.imp_scope,
            granularity=c.imp_granularity, score=c.imp_score, static_init=c.imp_static_init,
            bn_mode="train", seed=c.seed)

    @staticmethod
    def _imp_loss(model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, targets = batch_inputs(batch, next(model.parameters()).device)
        return F.cross_entropy(model_logits(model, inputs), targets)

    @staticmethod
    def _zero_sums() -> dict[str, float]:
        return {"loss": 0.0, "aux": 0.0, "correct": 0.0, "count": 0.0}

    def global_sums(self) -> dict[str, float]:
        """This epoch's training sums (loss, aux, correct, count) added over ranks."""
        keys = list(self.loop["sums"])
        local = torch.tensor([self.loop["sums"][k] for k in keys], dtype=torch.float64,
                             device=self.device)
        return dict(zip(keys, all_reduce_sum(local).tolist(), strict=True))

    def log(self, message: str) -> None:
        """Print on rank 0 unless quiet."""
        if self.dist.is_main and not self.quiet:
            print(message, flush=True)

    def autocast(self) -> Any:
        """``torch.autocast`` on CUDA with ``amp`` set; a no-op context otherwise."""
        if not self.use_amp:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    # ---- schedules -----------------------------------------------------------------------
    def _set_schedules(self, step: int) -> tuple[float, float | None]:
        c = self.cfg
        lr = lr_at(step, base=c.lr, min_lr=c.min_lr, total=self.total_steps, warmup=self.warmup,
                   schedule=c.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        temperature = None
        if c.method in CONV_METHODS and c.method != "condconv":
            import padnet

            temperature = padnet.temperature_schedule(
                step / self.steps_per_epoch, start=c.temperature_start, end=c.temperature_end,
                anneal_epochs=c.temperature_anneal_epochs)
            padnet.set_temperature(self.model, temperature)
        return lr, temperature

    # ---- one step ------------------------------------------------------------------------
    def train_step(self, batch: Any) -> None:
        """Forward, backward, clip, optimizer step and interleaved IMP for one batch."""
        from padnet.layers.aux import aux_loss

        c, sums = self.cfg, self.loop["sums"]
        self._set_schedules(self.loop["global_step"])
        inputs, targets = batch_inputs(batch, self.device)
        with self.autocast():
            logits = model_logits(self.net, inputs)
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=c.label_smoothing)
            aux = aux_loss(self.model).float()
            total = loss + c.aux_weight * aux if c.method == "moe" else loss
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            total.backward()
        if c.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.imp is not None and not self.imp.done and self.imp.step() is not None:
            self._after_partition(self.imp.result)
        n = len(targets)
        sums["loss"] += float(loss.detach()) * n
        sums["aux"] += float(aux.detach()) * n
        sums["correct"] += float((logits.detach().argmax(-1) == targets).sum())
        sums["count"] += n
        self.loop["global_step"] += 1
        self.loop["step_in_epoch"] += 1

    def _after_partition(self, result: Any) -> None:
        from padnet.layers.pad import pad_modules

        masks = [m.mask for _, m in pad_modules(self.model)]
        check_same_across_ranks(masks, "IMP masks")
        self.imp_result = result
        self.log(f"  IMP iteration {result.iteration}/{result.iterations}: dynamic ratio "
                 f"{result.total_ratio:.4f} (step {self.loop['global_step'] + 1})")

    def oneshot_partition(self) -> None:
        """One-shot IMP before the first step (``imp_mode: oneshot``)."""
        from padnet.partition import partition

        c = self.cfg
        self._set_schedules(0)
        result = partition(
            self.model, self._imp_data(), dynamic_ratio=c.dynamic_ratio, loss_fn=self._imp_loss,
            iterations=c.imp_iterations, schedule=c.imp_schedule, scope=c.imp_scope,
            granularity=c.imp_granularity, score=c.imp_score, static_init=c.imp_static_init,
            num_batches=c.imp_num_batches, bn_mode="eval", seed=c.seed)
        self.loop["oneshot_done"] = True
        self._after_partition(result)

    # ---- epochs --------------------------------------------------------------------------
    def fit(self) -> bool:
        """Train until ``epochs`` are done (True) or ``stop_after`` steps (False)."""
        c, loop = self.cfg, self.loop
        if c.imp_mode == "oneshot" and not loop["oneshot_done"]:
            self.oneshot_partition()
        while loop["epoch"] < c.epochs:
            if not self._run_epoch():
                return False
        return True

    def _progress(self, total: int, initial: int) -> Any:
        from tqdm.auto import tqdm

        disable = self.quiet or not self.dist.is_main or not sys.stderr.isatty()
        return tqdm(total=total, initial=initial, file=sys.stderr, disable=disable, leave=False,
                    desc=f"epoch {self.loop['epoch'] + 1}/{self.cfg.epochs}", dynamic_ncols=True)

    def _run_epoch(self) -> bool:
        c, loop = self.cfg, self.loop
        self.sampler.set_epoch(loop["epoch"], skip=loop["step_in_epoch"] * c.batch_size)
        start = time.perf_counter()
        with self._progress(self.steps_per_epoch, loop["step_in_epoch"]) as bar:
            for batch in self.train_loader:
                self.train_step(batch)
                bar.update(1)
                sums = loop["sums"]
                bar.set_postfix(loss=f"{sums['loss'] / max(sums['count'], 1):.4f}", refresh=False)
                stop = c.stop_after and loop["global_step"] >= c.stop_after
                if stop or (c.save_every and loop["global_step"] % c.save_every == 0):
                    loop["train_time_s"] += time.perf_counter() - start
                    start = time.perf_counter()
                    self.save_checkpoint()
                if stop:
                    self.log(f"stopped after step {loop['global_step']} (stop_after); resume "
                             f"with --resume {self.run_dir}")
                    return False
        loop["train_time_s"] += time.perf_counter() - start
        self._end_epoch(time.perf_counter() - start)
        return True

    def _end_epoch(self, seconds: float) -> None:
        import padnet

        c, loop = self.cfg, self.loop
        sums = self.global_sums()
        loss, aux, correct, count = (sums[k] for k in ("loss", "aux", "correct", "count"))
        lr, temperature = self._set_schedules(max(loop["global_step"] - 1, 0))
        sync_buffers(self.model)
        stats = padnet.stats(self.model)
        row: dict[str, Any] = {
            "epoch": loop["epoch"] + 1, "step": loop["global_step"], "lr": lr,
            "temperature": temperature, "dynamic_ratio": stats.dynamic_ratio if stats.layers
            else None, "train_loss": loss / max(count, 1), "train_acc": correct / max(count, 1),
            "aux_loss": aux / max(count, 1) if c.method == "moe" else None,
            "epoch_time_s": seconds}
        last = loop["epoch"] + 1 == c.epochs
        if last or (loop["epoch"] + 1) % c.eval_every == 0:
            for name, loader in self.eval_loaders.items():
                if name == "test" and not last:  # the test split is looked at once, at the end
                    continue
                metrics = evaluate(self.model, loader, self.splits.num_classes, self.device,
                                   self.autocast)
                row.update({f"{name}_{k}": v for k, v in metrics.items()})
        loop["history"].append(row)
        loop["epoch"] += 1
        loop["step_in_epoch"] = 0
        loop["sums"] = self._zero_sums()
        self.log(_format_row(row, c.epochs))
        self.save_checkpoint()


def _format_row(row: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"train loss {row['train_loss']:.4f}",
             f"acc {row['train_acc']:.4f}"]
    for split in ("val", "test"):
        if f"{split}_acc" in row:
            parts.append(f"{split} acc {row[f'{split}_acc']:.4f} f1 {row[f'{split}_f1']:.4f} "
                         f"mcc {row[f'{split}_mcc']:.4f}")
    if row.get("dynamic_ratio") is not None:
        parts.append(f"kappa {row['dynamic_ratio']:.3f}")
    parts.append(f"{row['epoch_time_s']:.1f}s")
    return " | ".join(parts)


def _prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); checks and cleans ``run_dir``."""
    if resume:
        found = ckpt.find_checkpoint(run_dir)
        if found is None:
            raise FileNotFoundError(f"no complete checkpoint to resume in {run_dir}")
        return found
    if ckpt.find_checkpoint(run_dir) is not None or (run_dir / "model.safetensors").exists():
        if not overwrite:
            raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it, "
                             "--overwrite to replace it, or choose another out_dir")
    return None


def train(
    cfg: TrainConfig, *, resume: bool | str | Path | None = None, quiet: bool = False,
    overwrite: bool = False, splits: Any = None,
) -> TrainResult:
    """Train ``cfg`` end to end (see the module doc) and return a :class:`TrainResult`.

    Args:
        resume: True to continue the run in ``cfg.out_dir``, or a run directory to continue.
        quiet: no progress bars and no per-epoch lines.
        overwrite: replace an existing run in ``out_dir`` instead of refusing.
        splits: already loaded :class:`~padnet.data.DatasetSplits` (skips loading).
    """
    if isinstance(resume, str | Path) and str(resume):
        cfg = cfg.replace(out_dir=str(resume))
    run_dir = Path(cfg.out_dir)
    found = _prepare_run_dir(run_dir, resume=bool(resume), overwrite=overwrite)
    trainer = Trainer(cfg, splits=splits, quiet=quiet)
    try:
        if found is None and trainer.dist.is_main:
            for name in ("checkpoint", "checkpoint.new", "checkpoint.old"):
                shutil.rmtree(run_dir / name, ignore_errors=True)
            (run_dir / "model.safetensors").unlink(missing_ok=True)
        barrier()
        if found is not None:
            trainer.resume(found)
        trainer.write_config()
        finished = trainer.fit()
        summary = trainer.finish() if finished else {}
        barrier()
        return TrainResult(trainer.model, run_dir, trainer.loop["history"], summary,
                           stopped=not finished, splits=trainer.splits,
                           is_main=trainer.dist.is_main)
    finally:
        cleanup_distributed(trainer.dist)
