"""``padnet train -c CONFIG [--key value ...]``: train one configuration.

Every config key is also a flag (``--lr 0.05``, ``--dynamic-ratio 0.3``); without ``-c`` the
defaults are the base. ``padnet list`` shows the shipped configs. ``--resume [RUN_DIR]``
continues a run from its latest checkpoint (the run in ``out_dir`` when no directory is given;
without ``-c`` the run's own ``config.yaml`` is used, and flags may change only what does not
change the experiment: out_dir, stop_after, save_every, eval_every, eval_batch_size,
num_workers, device). Under
``torchrun --nproc_per_node=N -m padnet train ...`` the run is data-parallel (gloo on CPU, nccl
on GPU) and only rank 0 writes files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from padnet.cli.options import add_config_arguments, config_overrides


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a configuration (YAML config plus --key value)",
                       description=__doc__, allow_abbrev=False,
                       usage="%(prog)s [-c CONFIG] [--resume [RUN_DIR]] [--overwrite] [--quiet] "
                             "[--KEY VALUE ...]",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", type=Path, default=None,
                   help="YAML config file (default: the built-in defaults)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR",
                   help="continue a run from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in out_dir")
    p.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    add_config_arguments(p)
    p.set_defaults(run=run)


def _config(args: argparse.Namespace) -> tuple:
    """``(config, run directory to resume or None)``: ``-c`` plus flags, or for a resume without
    ``-c`` the run's own config plus flags."""
    from padnet.train import TrainConfig, load_config
    from padnet.train.rundir import RunDir

    overrides = config_overrides(args)
    if args.config is not None or args.resume is None:
        cfg = load_config(args.config, overrides)
        if args.resume is None:
            return cfg, None
        return cfg, Path(args.resume) if isinstance(args.resume, str) else Path(cfg.out_dir)
    run = Path(args.resume) if isinstance(args.resume, str) else Path(
        overrides.get("out_dir", TrainConfig().out_dir))
    if run.exists() and not run.is_dir():
        raise ValueError(f"{run} is a file, not a run directory")
    recorded = RunDir(run).recorded_config()
    if recorded is None:
        raise FileNotFoundError(f"no run to resume in {run} (no config.yaml and no checkpoint); "
                                "start one with padnet train -c CONFIG")
    return recorded.replace(**{k: v for k, v in overrides.items() if k != "out_dir"}), run


def _where_it_stands(run: Path) -> str:
    from padnet.train.checkpoint import checkpoint_step, find_checkpoint

    found = find_checkpoint(run) if run.is_dir() else None
    if found is None:
        return "no checkpoint was written; start the run again (with --overwrite)"
    return (f"the last checkpoint (step {checkpoint_step(found)}) in {found} is intact; "
            f"resume with: padnet train --resume {run}")


def run(args: argparse.Namespace) -> int:
    from padnet.cli.options import CommandError, os_error_message
    from padnet.train import train

    cfg, resume = _config(args)
    try:
        result = train(cfg, resume=str(resume) if resume is not None else None,
                       quiet=args.quiet, overwrite=args.overwrite)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise
    except OSError as err:
        run_dir = resume if resume is not None else Path(cfg.out_dir)
        raise CommandError(f"{os_error_message(err)}; {_where_it_stands(run_dir)}") from err
    if not result.is_main:
        return 0
    if result.stopped:
        print(f"stopped early; checkpoint in {result.run_dir / 'checkpoint'}")
        return 0
    final = result.summary.get("final", {})
    parts = [f"{k} {final[k]:.4f}" for k in ("val_acc", "test_acc", "val_f1", "val_mcc")
             if final.get(k) is not None]
    stats = result.summary.get("stats", {})
    print(f"done: {', '.join(parts) or 'no evaluation split'}; stored parameters "
          f"{stats.get('stored_params', 0):,}, dynamic ratio {stats.get('dynamic_ratio', 0):.3f}"
          f"; wrote {result.run_dir}")
    return 0
