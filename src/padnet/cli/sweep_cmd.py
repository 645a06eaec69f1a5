"""``padnet sweep SUITE.yaml``: run an experiment suite, resumably.

Every run of the suite (variants x seeds, see :mod:`padnet.train.sweep`) that has not finished
is trained; a run interrupted earlier resumes from its checkpoint, a finished one is skipped.
``OUT/results.csv`` is rewritten after every run. Config keys given as flags apply to every run
(e.g. ``--device cpu``, ``--data-root PATH``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from padnet.cli.options import add_config_arguments, config_overrides


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run an experiment suite (resumable)", description=__doc__,
                       allow_abbrev=False,
                       usage="%(prog)s SUITE [--only PATTERN] [--dry-run] [--KEY VALUE ...]")
    p.add_argument("suite", type=Path, help="a suite file (e.g. configs/experiments/*.yaml)")
    p.add_argument("--only", default=None, help="fnmatch pattern of run names, e.g. 'pad*'")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their status")
    p.add_argument("--progress", action="store_true", help="show each run's epoch lines")
    add_config_arguments(p, title="config keys (applied to every run)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from padnet.train.sweep import run_suite

    run_suite(args.suite, overrides=config_overrides(args), only=args.only,
              dry_run=args.dry_run, quiet=not args.progress)
    return 0
