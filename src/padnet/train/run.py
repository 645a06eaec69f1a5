"""``train``: one configuration end to end -- the run directory settled, a resume checked
against the run's own experiment, the :class:`~padnet.train.loop.Trainer` fitted, the final files
written, and Ctrl-C turned into a message naming the last checkpoint (see
:mod:`padnet.train.loop` for what a run does)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from padnet.train import checkpoint as ckpt
from padnet.train.config import TrainConfig, absolute_paths, config_differences
from padnet.train.distributed import barrier, cleanup_distributed, init_distributed
from padnet.train.errors import ConfigMismatch, TrainingInterrupted
from padnet.train.loop import Trainer, TrainResult
from padnet.train.rundir import RunDir

__all__ = ["train"]


def _resume_config(cfg: TrainConfig, run_dir: RunDir) -> TrainConfig:
    """``cfg`` (paths absolute) after checking that it is the experiment of the run it resumes:
    ConfigMismatch listing the keys that differ from the run's recorded config, other than
    :data:`~padnet.train.config.RESUME_FREE_KEYS`. ``data_root`` may name a new place when the
    recorded one is gone (the data was moved)."""
    cfg = absolute_paths(cfg)
    recorded = run_dir.recorded_config()
    if recorded is None:
        return cfg
    recorded = absolute_paths(recorded)
    diffs = config_differences(recorded, cfg)
    moved = [d for d in diffs if d[0] == "data_root" and d[1] is not None
             and d[2] is not None and not Path(d[1]).exists()]
    diffs = [d for d in diffs if d not in moved]
    if diffs:
        listed = "; ".join(f"{k}: {a} in the run, {b} now" for k, a, b in diffs)
        from padnet.train.config import RESUME_FREE_KEYS

        raise ConfigMismatch(
            f"this config is another experiment than the run in {run_dir.path} "
            f"({run_dir.recorded_config_source()}): {listed}. A resume continues the run's own "
            f"config (--resume RUN_DIR without -c uses it); only {', '.join(RESUME_FREE_KEYS)} "
            "may change. For another experiment choose another out_dir")
    if moved and run_dir.is_main:
        print(f"note: the run's data_root {moved[0][1]} is gone; reading {moved[0][2]} instead "
              f"(pass --data-root to later commands on this run too)", file=sys.stderr)
    return cfg


def _interrupted(run_dir: RunDir, trainer: Trainer | None) -> str:
    """What Ctrl-C left: the step reached, the last checkpoint and the command that resumes."""
    step = trainer.state.global_step if trainer is not None else 0
    found = ckpt.find_checkpoint(run_dir.path) if run_dir.path.is_dir() else None
    if found is None:
        return (f"interrupted at step {step}, before the first checkpoint of {run_dir.path}: "
                "nothing to resume; start the run again (with --overwrite)")
    saved = ckpt.checkpoint_step(found)
    return (f"interrupted at step {step}; the last checkpoint (step {saved}) is in {found}; "
            f"resume with: padnet train --resume {run_dir.path}")


def train(
    cfg: TrainConfig, *, resume: bool | str | Path | None = None, quiet: bool = False,
    overwrite: bool = False, splits: Any = None,
) -> TrainResult:
    """Train ``cfg`` end to end (see the module doc) and return a :class:`TrainResult`.

    Args:
        resume: True to continue the run in ``cfg.out_dir``, or a run directory to continue;
            ``cfg`` must be that run's experiment (:class:`ConfigMismatch` otherwise).
        quiet: no progress bars and no per-epoch lines.
        overwrite: replace an existing run in ``out_dir`` instead of refusing.
        splits: already loaded :class:`~padnet.data.DatasetSplits` (skips loading).

    Raises:
        TrainingDiverged: the loss or the weights became NaN or infinite.
        TrainingInterrupted: Ctrl-C (a KeyboardInterrupt naming the last checkpoint).
    """
    if isinstance(resume, str | Path) and str(resume):
        cfg = cfg.replace(out_dir=str(resume))
    dist = init_distributed(cfg.device)
    run_dir = RunDir(cfg.out_dir, is_main=dist.is_main)
    trainer = None
    try:
        cfg = _resume_config(cfg, run_dir) if resume else absolute_paths(cfg)
        run_dir.prepare(resume=bool(resume), overwrite=overwrite)
        trainer = Trainer(cfg, run_dir=run_dir, dist=dist, splits=splits, quiet=quiet)
        if not resume:
            run_dir.clear()
        barrier()  # the main process has settled the checkpoints
        if resume:
            trainer.resume(run_dir.path)
        if not resume or not run_dir.config_file.exists():
            run_dir.write_config(cfg)
        finished = trainer.fit()
        summary = trainer.finish() if finished else {}
        barrier()
        return TrainResult(trainer.model, run_dir.path, trainer.state.history, summary,
                           stopped=not finished, splits=trainer.splits, is_main=dist.is_main)
    except KeyboardInterrupt:
        raise TrainingInterrupted(_interrupted(run_dir, trainer)) from None
    finally:
        cleanup_distributed(dist)
