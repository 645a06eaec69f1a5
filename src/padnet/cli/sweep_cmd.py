"""``padnet sweep SUITE.yaml``: run an experiment suite, resumably.

Every run of the suite (variants x seeds, see :mod:`padnet.train.sweep`) that has not finished
is trained; a run interrupted earlier resumes from its checkpoint, a finished one is skipped.
``OUT/results.csv`` is rewritten after every run. Config keys given as flags apply to every run
(e.g. ``--device cpu``, ``--data-root PATH``, ``--threads 2``); ``--out-dir DIR`` moves the whole
suite (OUT = DIR, each run in ``DIR/RUN``), for ``--latency`` and ``--report`` too.

After the runs (see :mod:`padnet.train.evidence`): ``--latency`` times the exported model of
the first finished run of each variant beside the static model and writes ``OUT/latency.csv``;
``--report DIR`` copies ``results.csv`` (and ``latency.csv``) to ``DIR/NAME.csv``
(``DIR/NAME_latency.csv``), draws ``DIR/NAME_kappa.png``, ``DIR/NAME_params.png`` and, when the
suite has PAD runs, ``DIR/NAME_layers.png``, writes every run's per-epoch metrics to
``DIR/NAME_curves.csv`` with their learning curves in ``DIR/NAME_curves.png``, and prints the
tables with their ``docs/RESULTS.md`` markers. Neither trains anything: run the suite first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from padnet.cli.options import add_config_arguments, batch_sizes, config_overrides


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run an experiment suite (resumable)", description=__doc__,
                       allow_abbrev=False,
                       usage="%(prog)s SUITE [--only PATTERN] [--dry-run] [--latency] "
                             "[--report DIR] [--KEY VALUE ...]")
    p.add_argument("suite", type=Path, help="a suite file (e.g. configs/experiments/*.yaml)")
    p.add_argument("--only", default=None, help="fnmatch pattern of run names, e.g. 'pad*'")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their status")
    p.add_argument("--progress", action="store_true", help="show each run's epoch lines")
    p.add_argument("--latency", action="store_true",
                   help="time the exported models against static (OUT/latency.csv)")
    p.add_argument("--batch-sizes", default="1,32", help="latency batch sizes (default 1,32)")
    p.add_argument("--reps", type=int, default=30, help="timed repetitions per model")
    p.add_argument("--report", type=Path, default=None, metavar="DIR",
                   help="copy the results to DIR, draw the plots, print the tables")
    add_config_arguments(p, title="config keys (applied to every run)")
    p.set_defaults(run=run)


def _report(suite: Path, directory: Path, overrides: dict) -> None:
    from padnet.train import evidence
    from padnet.train.sweep import RESULT_COLUMNS, load_suite, read_results, suite_name
    from padnet.utils.io import save_csv

    runs = load_suite(suite, overrides)
    name = suite_name(suite)
    results = runs[0].run_dir.parent / "results.csv"
    if not results.is_file():
        raise FileNotFoundError(f"{results} does not exist: run `padnet sweep {suite}` first")
    rows = read_results(results)
    directory.mkdir(parents=True, exist_ok=True)
    save_csv(directory / f"{name}.csv", rows, RESULT_COLUMNS)
    marker = f"summary {directory / name}.csv"
    latency = runs[0].run_dir.parent / "latency.csv"
    if latency.is_file():
        lat = read_results(latency)
        save_csv(directory / f"{name}_latency.csv", lat, evidence.LATENCY_COLUMNS)
        marker += f" latency={directory / name}_latency.csv"
    for path in evidence.plot_suite(rows, directory / name, title=name):
        print(f"wrote {path}")
    pad = [r.run_dir for r in runs if r.status() == "done" and r.cfg.method != "none"
           and r.cfg.dynamic_ratio < 1 and r.cfg.imp.mode != "none" and r.seed == runs[0].seed]
    if pad:
        print(f"wrote {evidence.plot_layer_ratios(pad, directory / f'{name}_layers.png')}")
    curves = evidence.collect_curves(runs)
    if curves:
        save_csv(directory / f"{name}_curves.csv", curves, evidence.CURVE_COLUMNS)
        print(f"wrote {evidence.plot_curves(curves, directory / f'{name}_curves.png', title=name)}")
    print(f"\n<!-- table: {marker} -->\n{evidence.render_table(marker)}")
    variants = {r["variant"] for r in rows}
    for reference in ("dynamic", "moe"):  # the fully dynamic variant, if the suite has one
        if reference in variants:
            spec = f"significance {directory / name}.csv reference={reference}"
            print(f"\n<!-- table: {spec} -->\n{evidence.render_table(spec)}")


def run(args: argparse.Namespace) -> int:
    from padnet.train.sweep import run_suite

    overrides = config_overrides(args)
    if args.latency or args.report is not None:
        from padnet.train.evidence import measure_suite_latency
        from padnet.utils.checks import check_int

        check_int(args.reps, "--reps", 1)
        if args.latency:
            measure_suite_latency(args.suite, batch_sizes=batch_sizes(args.batch_sizes),
                                  reps=args.reps, overrides=overrides)
        if args.report is not None:
            _report(args.suite, args.report, overrides)
        return 0
    run_suite(args.suite, overrides=overrides, only=args.only,
              dry_run=args.dry_run, quiet=not args.progress)
    return 0
