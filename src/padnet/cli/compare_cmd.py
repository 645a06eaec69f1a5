"""``padnet compare -c CONFIG``: train the static, fully dynamic and PAD variants of one
configuration and print one table.

Columns: accuracy (val, test), stored parameters, dynamic ratio, forward FLOPs per sample as
trained and as exported (routers and weight aggregation included, only executed experts
counted; docs/method.md §5.1), latency ratio to the static model at batch 1 and at the eval
batch size (measured side by side after training), training time. Writes ``compare.csv``,
``compare.md``, ``compare.png`` and one run directory per variant (``static/``, ``dynamic/``,
``pad/``, each with ``model.safetensors``) to ``--out`` (default: the config's ``out_dir``);
earlier results there are replaced. Config keys may be overridden.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from padnet.cli.options import add_config_arguments, config_overrides


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train static, dynamic and PAD variants; one table",
                       description=__doc__, allow_abbrev=False,
                       usage="%(prog)s -c CONFIG [--out OUT] [--reps REPS] [--quiet] "
                             "[--KEY VALUE ...]")
    p.add_argument("-c", "--config", type=Path, required=True, help="YAML config file")
    p.add_argument("--out", type=Path, default=None, help="output directory")
    p.add_argument("--reps", type=int, default=20, help="latency repetitions per variant")
    p.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    add_config_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import time

    from padnet.train import compare, load_config
    from padnet.utils.checks import check_int

    check_int(args.reps, "--reps", 1)
    start = time.perf_counter()
    cfg = load_config(args.config, config_overrides(args))
    result = compare(cfg, out_dir=args.out, reps=args.reps, quiet=args.quiet)
    if result.is_main:
        out = result.out_dir
        print()
        print(result.table())
        print(f"\nwrote {out / 'compare.csv'}, {out / 'compare.md'}, {out / 'compare.png'} and "
              f"the models in {out}/{{static,dynamic,pad}}/ ({time.perf_counter() - start:.0f} s)")
    return 0
