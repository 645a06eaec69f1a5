"""``padnet tradeoff RUN_DIR``: accuracy against compute of a run with early exits or dynamic
tokens, over a list of settings (docs/method.md §6.1).

The knob (``--knob``, by default the exit threshold for a run with ``exits``, else the keep ratio
for ``tokens: select`` or the merged tokens per layer ``r`` for ``tokens: merge``) takes each
of ``--values`` on the run's validation split (``--split test`` for the test split). Per value:
accuracy, FLOPs per sample (counted over the whole split), the median latency of a batch of
``--latency-batch`` samples (default 32; the mean over ``--latency-batches`` batches of
consecutive samples) measured side by side with the full model (no early exit; every token kept /
none merged), and the speedup, full latency / latency. Writes
``RUN_DIR/tradeoff_<knob>.csv`` and, when matplotlib is installed, ``RUN_DIR/tradeoff_<knob>.png``
(accuracy against FLOPs and against latency); ``--out PREFIX`` writes them elsewhere.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from padnet.cli.options import add_config_arguments, config_overrides

COLUMNS = ("knob", "value", "accuracy", "flops_per_sample", "latency_ms", "speedup",
           "flops_ratio", "exit_rates")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from padnet.conditional.criteria import CRITERIA
    from padnet.conditional.tradeoff import KNOBS

    p = sub.add_parser("tradeoff", help="accuracy vs FLOPs and latency of early exits / tokens",
                       description=__doc__, allow_abbrev=False,
                       usage="%(prog)s RUN_DIR [--knob {threshold,keep,r}] [--values V,...] "
                             "[--criterion NAME] [--split {val,test}] [--latency-batch N] "
                             "[--latency-batches N] [--reps N] [--out PREFIX] [--no-plot] "
                             "[--checkpoint] "
                             "[--KEY VALUE ...]")
    p.add_argument("run_dir", type=Path, help="a run directory written by `padnet train`")
    p.add_argument("--knob", choices=KNOBS, default=None,
                   help="what to sweep (default: threshold for exits, else keep or r)")
    p.add_argument("--values", default=None,
                   help="comma-separated values (default: a range that fits the knob)")
    p.add_argument("--criterion", choices=tuple(CRITERIA), default=None,
                   help="exit rule of a threshold sweep (default: the run's exit_criterion)")
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--latency-batch", type=int, default=32, help="latency batch size")
    p.add_argument("--latency-batches", type=int, default=4,
                   help="batches timed per repetition (consecutive samples; default 4)")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per value")
    p.add_argument("--out", type=Path, default=None,
                   help="path prefix of the CSV and plot (default RUN_DIR/tradeoff_<knob>)")
    p.add_argument("--no-plot", action="store_true", help="write the CSV only")
    p.add_argument("--checkpoint", action="store_true", help="use the latest checkpoint")
    add_config_arguments(p, title="config keys (override the run's config.yaml)")
    p.set_defaults(run=run)


def _values(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--values must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError("--values must name at least one value")
    return [int(v) if v.is_integer() else v for v in values]


def _knob(args: argparse.Namespace, cfg) -> str:  # noqa: ANN001
    if args.knob is not None:
        return args.knob
    if cfg.exits is not None:
        return "threshold"
    if cfg.tokens == "select":
        return "keep"
    if cfg.tokens == "merge":
        return "r"
    raise ValueError(f"{args.run_dir} has neither early exits nor dynamic tokens (exits is "
                     "none, tokens is none): there is no trade-off to sweep")


def _plot(rows: list, path: Path, title: str) -> Path:  # noqa: ANN001
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from padnet.utils.io import atomic_write

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    full, points = rows[0], rows[1:]
    for ax, key, label in ((axes[0], "flops_per_sample", "FLOPs per sample"),
                           (axes[1], "latency_ms", "latency (ms per batch)")):
        ax.plot([getattr(r, key) for r in points], [r.accuracy for r in points], "o-",
                color="tab:blue", label=points[0].knob if points else "")
        for r in points:
            ax.annotate(f"{r.value:g}", (getattr(r, key), r.accuracy), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
        ax.plot([getattr(full, key)], [full.accuracy], "s", color="tab:grey", label="full model")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader

    from padnet.conditional.tradeoff import sweep
    from padnet.train.build import load_run
    from padnet.train.distributed import resolve_device
    from padnet.utils.checks import check_int
    from padnet.utils.io import save_csv

    check_int(args.latency_batch, "--latency-batch", 1)
    check_int(args.latency_batches, "--latency-batches", 1)
    check_int(args.reps, "--reps", 1)
    values = _values(args.values)
    loaded = load_run(args.run_dir, overrides=config_overrides(args), checkpoint=args.checkpoint)
    cfg, splits = loaded.cfg, loaded.splits
    knob = _knob(args, cfg)
    if knob == "threshold" and cfg.exits is None:
        raise ValueError(f"--knob threshold needs a run with early exits; {args.run_dir} has "
                         "exits none")
    if knob in ("keep", "r") and cfg.tokens != {"keep": "select", "r": "merge"}[knob]:
        raise ValueError(f"--knob {knob} needs a run with tokens "
                         f"{'select' if knob == 'keep' else 'merge'}; {args.run_dir} has tokens "
                         f"{cfg.tokens}")
    criterion = args.criterion or cfg.exit.criterion
    data = getattr(splits, args.split)
    if data is None:
        raise ValueError(f"the data of this run has no {args.split} split")
    device = resolve_device(cfg.device)
    model = loaded.model.to(device)
    loader = DataLoader(data, batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                        collate_fn=splits.collate, num_workers=cfg.num_workers)
    with torch.no_grad():
        rows = sweep(model, loader, knob, values, criterion=criterion,
                     batch_size=args.latency_batch, latency_batches=args.latency_batches,
                     reps=args.reps, device=device)
    prefix = args.out if args.out is not None else args.run_dir / f"tradeoff_{knob}"
    csv_path = save_csv(prefix.with_name(prefix.name + ".csv"), [r.as_dict() for r in rows],
                        COLUMNS)
    what = f"{knob} ({criterion})" if knob == "threshold" else knob
    print(f"{what} on {args.split} ({len(data)} examples); latency per batch of "
          f"{args.latency_batch} (mean over {args.latency_batches}, median of {args.reps} "
          "repetitions)")
    head = (f"{'value':>8}  {'accuracy':>8}  {'FLOPs/sample':>12}  {'FLOPs':>6}  "
            f"{'ms':>8}  {'speedup':>7}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        value = "full" if r.value is None else f"{r.value:g}"
        print(f"{value:>8}  {r.accuracy:>8.4f}  {r.flops_per_sample:>12,.0f}  "
              f"{r.flops_ratio:>5.2f}x  {r.latency_ms:>8.2f}  {r.speedup:>6.2f}x")
    print(f"wrote {csv_path}")
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("matplotlib is not installed: no plot (pip install 'padnet[plots]')")
            return 0
        png = _plot(rows, prefix.with_name(prefix.name + ".png"),
                    f"{args.run_dir.name}: {what} on {args.split}")
        print(f"wrote {png}")
    return 0
