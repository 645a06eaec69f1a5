"""The explicit training loop: the :class:`Trainer` of one run (:func:`padnet.train.run.train`
runs a configuration end to end with it).

Per optimizer step (:func:`~padnet.train.step.train_step`): learning rate (warm-up, then
cosine/linear), router temperature (annealed for the methods that take it), forward under
autocast (CUDA only), cross-entropy (early exits: their joint loss) plus ``aux_weight`` times the
auxiliary losses (MoE, token routers), backward (GradScaler for fp16), gradient clipping,
optimizer step, then one step of interleaved IMP.
Every ``eval_every`` epochs: evaluation (loss, accuracy, macro F1, Matthews correlation) on val,
and on test after the last epoch (for a model with early exits: of the final exit, plus each
intermediate exit's accuracy; ``summary.json`` adds them per exit and what early-exit inference
at ``exit_criterion`` / ``exit_threshold`` gives on val and test); every epoch a row of
``metrics.csv`` and a checkpoint; ``save_every`` adds checkpoints within epochs. A resumed run
continues bit for bit on CPU: the data order of epoch e comes from ``seed + e`` and is
fast-forwarded mid-epoch, and the RNG, optimizer, IMP and loop states
(:class:`~padnet.train.state.LoopState`) are restored from the checkpoint.

A resume continues the run's own experiment: a config that differs from the run's in anything
but :data:`~padnet.train.config.RESUME_FREE_KEYS` is refused (:class:`ConfigMismatch`), and the
run's ``config.yaml`` is left as it is. ``data_root`` is stored absolute.

A NaN or infinite loss, or non-finite weights at a checkpoint, stop the run
(:class:`TrainingDiverged`) before anything from that step is saved: the last good checkpoint
stays. Ctrl-C raises :class:`TrainingInterrupted`, naming the last checkpoint.

The files go to a :class:`~padnet.train.rundir.RunDir`; under torchrun only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from padnet.train import checkpoint as ckpt
from padnet.train.build import (
    build_data,
    build_loader,
    build_model,
    build_optimizer,
    input_channels,
    use_threads,
)
from padnet.train.config import TrainConfig
from padnet.train.distributed import (
    DistInfo,
    EpochSampler,
    all_reduce_sum,
    check_same_across_ranks,
    init_distributed,
    sync_buffers,
    wrap_ddp,
)
from padnet.train.errors import ConfigMismatch, TrainingDiverged, TrainingInterrupted
from padnet.train.imp import build_partition, run_partition, scoring_loader
from padnet.train.rundir import RunDir, model_info, weights_metadata
from padnet.train.state import LoopState, format_row, zero_sums
from padnet.train.step import (
    autocast_for,
    evaluate,
    has_aux_loss,
    seed_everything,
    set_schedules,
    train_step,
)

__all__ = ["ConfigMismatch", "TrainResult", "Trainer", "TrainingDiverged", "TrainingInterrupted"]


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


class Trainer:
    """One run: set-up in ``__init__``, :meth:`fit` trains, :meth:`finish` writes the results.

    Args:
        cfg: the run's config.
        run_dir: where the files go (default: ``cfg.out_dir``, written by the main process).
        dist: this process's place in the process group (default: :func:`init_distributed`;
            the caller cleans it up).
        splits: already loaded :class:`~padnet.data.DatasetSplits` (default: loaded from cfg).
        quiet: no progress bars and no per-epoch lines.
    """

    def __init__(self, cfg: TrainConfig, *, run_dir: RunDir | None = None,
                 dist: DistInfo | None = None, splits: Any = None, quiet: bool = False) -> None:
        self.cfg, self.quiet = cfg, quiet
        self.dist = dist if dist is not None else init_distributed(cfg.device)
        self.device = self.dist.device
        self.run_dir = run_dir if run_dir is not None else RunDir(cfg.out_dir, self.dist.is_main)
        use_threads(cfg)
        seed_everything(cfg.seed)
        self.splits = splits if splits is not None else build_data(cfg)
        self.in_chans = input_channels(cfg, self.splits)
        self.model = build_model(cfg, num_classes=self.splits.num_classes, in_chans=self.in_chans)
        self.model.to(self.device).train()
        self.optimizer = build_optimizer(cfg, self.model)
        self.net = wrap_ddp(self.model, self.dist)
        self._make_loaders()
        self.autocast = autocast_for(self.device, cfg.amp)
        fp16 = self.device.type == "cuda" and cfg.amp == "fp16"
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        self.imp = None
        if cfg.imp.mode == "interleaved":
            self.imp = build_partition(self.model, self._scoring_loader(), cfg,
                                       total_steps=self.total_steps)
        self.imp_result: Any = None
        self.state = LoopState()
        self.saved_step: int | None = None  # step of the last checkpoint written or resumed

    # ---- set-up --------------------------------------------------------------------------
    def _make_loaders(self) -> None:
        cfg, s, d = self.cfg, self.splits, self.dist
        self._loader_kw = {"collate": s.collate, "num_workers": cfg.num_workers, "seed": cfg.seed,
                           "pin_memory": self.device.type == "cuda"}
        self.sampler = EpochSampler(len(s.train), seed=cfg.seed, rank=d.rank,
                                    world_size=d.world_size)
        self.drop_last = self.sampler.num_samples >= cfg.batch_size  # no batch of one for BN
        self.train_loader = self._loader(s.train, self.sampler, cfg.batch_size, self.drop_last)
        n = self.sampler.num_samples
        self.steps_per_epoch = n // cfg.batch_size if self.drop_last else -(-n // cfg.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup = cfg.warmup_steps or round(cfg.warmup_epochs * self.steps_per_epoch)
        eval_size = cfg.eval_batch_size or 2 * cfg.batch_size
        self.eval_loaders = {
            name: self._loader(ds, list(range(d.rank, len(ds), d.world_size)), eval_size, False)
            for name, ds in (("val", s.val), ("test", s.test)) if ds is not None}

    def _loader(self, dataset: Any, sampler: Any, batch_size: int, drop_last: bool) -> Any:
        return build_loader(dataset, batch_size=batch_size, sampler=sampler,
                            drop_last=drop_last, **self._loader_kw)

    def _scoring_loader(self) -> Any:
        return scoring_loader(self.splits.train, batch_size=self.cfg.batch_size,
                              rank=self.dist.rank, world_size=self.dist.world_size,
                              **self._loader_kw)

    def log(self, message: str) -> None:
        """Print on rank 0 unless quiet."""
        if self.dist.is_main and not self.quiet:
            print(message, flush=True)

    def _schedules(self, step: int) -> tuple[float, float | None]:
        return set_schedules(self.cfg, self.model, self.optimizer, step,
                             total_steps=self.total_steps, warmup=self.warmup,
                             steps_per_epoch=self.steps_per_epoch)

    # ---- steps and partitions ------------------------------------------------------------
    def step(self, batch: Any) -> None:
        """One optimizer step on ``batch``, then one step of interleaved IMP."""
        self._schedules(self.state.global_step)
        stats = train_step(self.model, batch, self.optimizer, self.cfg, device=self.device,
                           net=self.net, scaler=self.scaler, autocast=self.autocast)
        if self._any_rank(not (math.isfinite(stats.loss) and math.isfinite(stats.aux))):
            value = stats.loss if not math.isfinite(stats.loss) else stats.aux
            what = "loss" if not math.isfinite(stats.loss) else "auxiliary loss"
            raise self._diverged(self.state.global_step + 1, f"the {what} is {value}")
        if self.imp is not None and not self.imp.done and self.imp.step() is not None:
            self._after_partition(self.imp.result)
        self.state.add_step(stats)

    def _any_rank(self, flag: bool) -> bool:
        """True when ``flag`` is set on any rank (a collective under torchrun)."""
        if not self.dist.distributed:
            return flag
        return bool(all_reduce_sum(torch.tensor([float(flag)], device=self.device)).item())

    def _diverged(self, step: int, what: str) -> TrainingDiverged:
        cfg = self.cfg
        kept = (f"the last good checkpoint (step {self.saved_step}) in "
                f"{self.run_dir.checkpoint_dir} is kept" if self.saved_step is not None
                else "no checkpoint was written")
        return TrainingDiverged(
            f"training diverged at step {step} (epoch {self.state.epoch + 1}): {what}; nothing "
            f"from this step on was saved and {kept}. Start again (--overwrite, or another "
            f"out_dir) with a lower lr (now {cfg.lr:g}), gradient clipping (grad_clip, now "
            f"{cfg.grad_clip:g}; e.g. --grad-clip 1), a learning-rate warm-up (--warmup-epochs "
            "1), or check the data for extreme or non-finite values")

    def check_finite_weights(self) -> None:
        """TrainingDiverged when a weight or buffer of the model is NaN or infinite."""
        bad = next((k for k, v in self.model.state_dict().items()
                    if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
        if self._any_rank(bad is not None):
            raise self._diverged(self.state.global_step,
                                 f"the weights are not finite (e.g. {bad or 'on another rank'})")

    def _after_partition(self, result: Any) -> None:
        from padnet.layers import mode_masks

        check_same_across_ranks([m.mask for _, m in mode_masks(self.model)], "IMP masks")
        self.imp_result = result
        self.log(f"  IMP iteration {result.iteration}/{result.iterations}: dynamic ratio "
                 f"{result.total_ratio:.4f} (step {self.state.global_step + 1})")

    def oneshot_partition(self) -> None:
        """One-shot IMP before the first step (``imp_mode: oneshot``)."""
        self._schedules(0)
        result = run_partition(self.model, self._scoring_loader(), self.cfg)
        self.state.oneshot_done = True
        self._after_partition(result)

    # ---- epochs --------------------------------------------------------------------------
    def fit(self) -> bool:
        """Train until ``epochs`` are done (True) or ``stop_after`` steps (False)."""
        if self.cfg.imp.mode == "oneshot" and not self.state.oneshot_done:
            self.oneshot_partition()
        while self.state.epoch < self.cfg.epochs:
            if not self._run_epoch():
                return False
        return True

    def _progress(self, total: int, initial: int) -> Any:
        from tqdm.auto import tqdm

        disable = self.quiet or not self.dist.is_main or not sys.stderr.isatty()
        return tqdm(total=total, initial=initial, file=sys.stderr, disable=disable, leave=False,
                    desc=f"epoch {self.state.epoch + 1}/{self.cfg.epochs}", dynamic_ncols=True)

    def _run_epoch(self) -> bool:
        """Train the rest of the epoch; the time of its steps (not of its checkpoints) adds to
        the epoch's and the run's training time."""
        cfg, st = self.cfg, self.state
        self.sampler.set_epoch(st.epoch, skip=st.step_in_epoch * cfg.batch_size)
        start = time.perf_counter()
        with self._progress(self.steps_per_epoch, st.step_in_epoch) as bar:
            for batch in self.train_loader:
                self.step(batch)
                bar.update(1)
                bar.set_postfix(loss=f"{st.mean_loss():.4f}", refresh=False)
                stop = cfg.stop_after and st.global_step >= cfg.stop_after
                # the epoch's last step is saved by the epoch-end checkpoint that follows
                due = (cfg.save_every and st.global_step % cfg.save_every == 0
                       and st.step_in_epoch < self.steps_per_epoch)
                if stop or due:
                    st.add_time(time.perf_counter() - start)
                    self.save_checkpoint()
                    start = time.perf_counter()
                if stop:
                    self.log(f"stopped after step {st.global_step} (stop_after); resume with "
                             f"--resume {self.run_dir.path}")
                    return False
        st.add_time(time.perf_counter() - start)
        self._end_epoch()
        return True

    def _end_epoch(self) -> None:
        import padnet

        cfg, st = self.cfg, self.state
        sums = self.state.global_sums(self.device)
        count = max(sums["count"], 1)
        lr, temperature = self._schedules(max(st.global_step - 1, 0))
        sync_buffers(self.model)
        stats = padnet.stats(self.model)
        row: dict[str, Any] = {
            "epoch": st.epoch + 1, "step": st.global_step, "lr": lr, "temperature": temperature,
            "dynamic_ratio": stats.dynamic_ratio if stats.layers else None,
            "train_loss": sums["loss"] / count, "train_acc": sums["correct"] / count,
            "aux_loss": sums["aux"] / count if has_aux_loss(cfg) else None,
            "epoch_time_s": st.epoch_time_s}
        row.update(self._evaluate(last=st.epoch + 1 == cfg.epochs))
        st.end_epoch(row)
        self.log(format_row(row, cfg.epochs))
        self.save_checkpoint()

    def _evaluate(self, *, last: bool) -> dict[str, float]:
        """Metrics of this epoch on val (every ``eval_every`` epochs) and test (the last one:
        the test split is looked at once, at the end)."""
        if not (last or (self.state.epoch + 1) % self.cfg.eval_every == 0):
            return {}
        results: dict[str, float] = {}
        for name, loader in self.eval_loaders.items():
            if name != "test" or last:
                metrics = evaluate(self.model, loader, self.splits.num_classes, self.device,
                                   self.autocast)
                results.update({f"{name}_{k}": v for k, v in metrics.items()})
        return results

    # ---- checkpoints and results ---------------------------------------------------------
    def _metadata(self) -> dict[str, str]:
        return weights_metadata(self.cfg, model_info(self.splits, self.in_chans))

    def save_checkpoint(self) -> None:
        """Write ``checkpoint/`` and ``metrics.csv`` (rank 0; every rank must call it: the
        epoch's running sums are added over ranks first). Non-finite weights raise
        TrainingDiverged instead."""
        self.check_finite_weights()
        loop = {**self.state.to_dict(), "sums": self.state.global_sums(self.device)}
        self.saved_step = self.state.global_step
        if not self.run_dir.is_main:
            return
        state = {"optimizer": self.optimizer.state_dict(), "rng": ckpt.rng_state(),
                 "loop": loop, "config": self.cfg.to_dict(), "world_size": self.dist.world_size,
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                 "imp": self.imp.state_dict() if self.imp is not None else None,
                 "imp_result": self.imp_result.to_dict() if self.imp_result else None}
        self.run_dir.write_checkpoint(self.model.state_dict(), state,
                                      step=self.state.global_step, metadata=self._metadata())
        self.run_dir.write_metrics(self.state.history)

    def resume(self, directory: Path) -> None:
        """Load weights, optimizer, scaler, IMP, loop state and RNG states from the newest
        checkpoint of ``directory`` (a run or checkpoint directory) that passes its checks."""
        directory, model_state, state, step = ckpt.load_latest_checkpoint(directory)
        saved_world = state.get("world_size", self.dist.world_size)
        if saved_world != self.dist.world_size:
            raise ConfigMismatch(
                f"the checkpoint in {directory} was written by a run of {saved_world} processes "
                f"and this one has {self.dist.world_size}; the data order differs, so resume "
                f"with {saved_world} processes (torchrun --nproc_per_node={saved_world}) "
                f"({saved_world} processes in the run, {self.dist.world_size} now)")
        try:
            self.model.load_state_dict(model_state)
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"the checkpoint in {directory} does not fit the model and "
                             f"optimizer of this config (was the config changed?): "
                             f"{str(err).splitlines()[0]}") from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.imp is not None and state.get("imp"):
            self.imp.load_state_dict(state["imp"])
            self.imp_result = self.imp.result
        elif self.imp is None and state.get("imp_result"):
            self.imp_result = state["imp_result"]
        self.state = LoopState.from_dict(state["loop"])
        self.state.global_step = step
        if not self.dist.is_main:  # the saved sums are over all ranks: count them once
            self.state.sums = zero_sums()
        ckpt.set_rng_state(state["rng"])
        self.saved_step = step
        self.log(f"resumed {self.run_dir.path} at step {step} (epoch {self.state.epoch + 1}, "
                 f"step {self.state.step_in_epoch} of {self.steps_per_epoch})")

    def summary(self) -> dict[str, Any]:
        """The run's summary (``summary.json``), JSON-safe. ``environment`` records the versions
        and the number of torch threads: on a CPU the thread count changes the order of floating
        point sums, so runs under different counts differ by more than rounding."""
        import padnet

        history, imp = self.state.history, self.imp_result
        return json.loads(json.dumps({
            "config": self.cfg.to_dict(), **model_info(self.splits, self.in_chans),
            "data": self.splits.info, "final": history[-1] if history else {},
            "best_val_acc": max((r["val_acc"] for r in history if "val_acc" in r), default=None),
            "stats": padnet.stats(self.model).to_dict()["total"],
            "imp": imp.to_dict() if hasattr(imp, "to_dict") else imp,
            "exits": self._exit_summary(),
            "steps": self.state.global_step, "train_time_s": self.state.train_time_s,
            "world_size": self.dist.world_size, "device": str(self.device),
            "environment": {"padnet": padnet.__version__, "torch": torch.__version__,
                            "python": platform.python_version(),
                            "torch_threads": torch.get_num_threads()}}, default=str))

    def _exit_summary(self) -> dict[str, Any] | None:
        """Per-exit accuracies of the last evaluation and, in a single process, early-exit
        inference at the config's criterion on val and test
        (:func:`~padnet.conditional.exit_report`); None without exits."""
        from padnet.conditional import EarlyExitModel, exit_report
        from padnet.conditional.criteria import criterion_record

        if not isinstance(self.model, EarlyExitModel):
            return None
        model, final = self.model, (self.state.history[-1] if self.state.history else {})
        out: dict[str, Any] = {"points": [*model.exit_points, "final"],
                               "criterion": criterion_record(model.criterion)}
        for split in ("val", "test"):
            if f"{split}_acc" in final:
                inner = [final.get(f"{split}_exit{i}_acc") for i in range(model.num_exits - 1)]
                out[f"{split}_acc"] = [*inner, final[f"{split}_acc"]]
        if self.dist.distributed:
            return out
        for split, loader in self.eval_loaders.items():
            if f"{split}_acc" not in final:
                continue
            report = exit_report(model, self._batches(loader))
            out[f"{split}_early_exit"] = {k: report.as_dict()[k] for k in (
                "accuracy", "rates", "average_flops", "full_flops", "speedup")}
        return out

    def _batches(self, loader: Any) -> Any:
        from padnet.train.build import batch_inputs

        for batch in loader:
            inputs, targets = batch_inputs(batch, self.device)
            yield ({**inputs, "labels": targets} if isinstance(inputs, dict)
                   else (inputs, targets))

    def finish(self) -> dict[str, Any]:
        """Write the final ``model.safetensors``, ``summary.json`` and ``metrics.csv`` (rank 0);
        returns the summary."""
        self.check_finite_weights()
        summary = self.summary()
        self.run_dir.write_weights(self.model.state_dict(), self._metadata())
        self.run_dir.write_summary(summary)
        self.run_dir.write_metrics(self.state.history)
        return summary
