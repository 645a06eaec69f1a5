"""``padnet train -c CONFIG [--key value ...]``: train one configuration.

Every config key is also a flag (``--lr 0.05``, ``--dynamic-ratio 0.3``); without ``-c`` the
defaults are the base. ``padnet list`` shows the shipped configs. ``--resume [RUN_DIR]``
continues a run from its latest checkpoint (the run in ``out_dir`` when no directory is given;
without ``-c`` the run's own ``config.yaml`` is used). Under
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


def run(args: argparse.Namespace) -> int:
    from padnet.train import load_config, train

    config = args.config
    if config is None and isinstance(args.resume, str):
        config = Path(args.resume) / "config.yaml"
    cfg = load_config(config, config_overrides(args))
    result = train(cfg, resume=args.resume, quiet=args.quiet, overwrite=args.overwrite)
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
