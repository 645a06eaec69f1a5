"""``padnet bench``: forward latency of the static, fully dynamic and PAD versions of a model.

The model comes from config keys (``--model resnet20 --method dyconv --dynamic-ratio 0.3``, or
``-c CONFIG``) or from a trained run (``--run RUN_DIR``, timed beside freshly built static and
fully dynamic versions). Repetitions are interleaved across the versions (order rotated every
round) in eval mode; the median per version and its ratio to the static model are printed for
each batch size. Inputs are random images of side ``image_size`` (default: the run's input
size, else 32), or random token ids for text models.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from padnet.cli.options import add_config_arguments, batch_sizes, config_overrides


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time static vs dynamic vs PAD forward passes",
                       description=__doc__, allow_abbrev=False,
                       usage="%(prog)s [-c CONFIG | --run RUN_DIR] [--batch-sizes B,...] "
                             "[--reps REPS] [--num-classes N] [--threads N] [--out OUT] "
                             "[--KEY VALUE ...]")
    src = p.add_mutually_exclusive_group()
    src.add_argument("-c", "--config", type=Path, help="YAML config of the model")
    src.add_argument("--run", dest="run_dir", type=Path,
                     help="a run directory written by `padnet train`")
    p.add_argument("--batch-sizes", default="1,32", help="comma-separated (default 1,32)")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per version")
    p.add_argument("--num-classes", type=int, default=10, help="for models built from a config")
    p.add_argument("--out", type=Path, default=None, help="also write the table as CSV")
    add_config_arguments(p)
    p.set_defaults(run=run)


def _models(args: argparse.Namespace) -> tuple:
    """``(config, {version: model}, model info)``."""
    from padnet.train import load_config
    from padnet.train.build import build_model, load_run

    if args.run_dir is not None:
        loaded = load_run(args.run_dir, overrides=config_overrides(args), with_data=False)
        cfg, info = loaded.cfg, loaded.info
        trained = {"pad" if cfg.method != "none" and cfg.dynamic_ratio < 1 else
                   "dynamic" if cfg.method != "none" else "static": loaded.model}
    else:
        cfg = load_config(args.config, config_overrides(args))
        info, trained = {"num_classes": args.num_classes, "in_chans": cfg.in_chans or
                         cfg.channels or 3}, {}
    build = {"num_classes": info["num_classes"], "in_chans": info.get("in_chans"),
             "pretrained": False}
    models = {"static": trained.get("static") or build_model(
        cfg.replace(method="none", imp_mode="none"), **build)}
    if cfg.method != "none":
        models["dynamic"] = trained.get("dynamic") or build_model(
            cfg, **build, dynamic_ratio=1.0)
        if cfg.dynamic_ratio < 1:
            models["pad"] = trained.get("pad") or build_model(
                cfg, **build, dynamic_ratio=cfg.dynamic_ratio)
    return cfg, models, info


def run(args: argparse.Namespace) -> int:
    import torch

    import padnet
    from padnet.bench import measure_latency
    from padnet.train.build import random_inputs, use_threads
    from padnet.utils.checks import check_int
    from padnet.utils.io import atomic_write

    sizes = batch_sizes(args.batch_sizes)
    check_int(args.reps, "--reps", 1)
    cfg, models, info = _models(args)
    use_threads(cfg)  # for a model built from flags (load_run set a run's own count)
    rows = []
    for batch in sizes:
        x = random_inputs(cfg, models["static"], info, batch)
        ms = measure_latency(models, x, reps=args.reps)
        for name, model in models.items():
            rows.append((batch, name, padnet.stats(model).stored_params, ms[name],
                         ms[name] / ms["static"]))
    head = f"{'batch':>5}  {'version':<8}  {'stored params':>13}  {'ms':>9}  {'vs static':>9}"
    print(f"{cfg.model}, method {cfg.method}, kappa {cfg.dynamic_ratio}, "
          f"{torch.get_num_threads()} threads, median of {args.reps} interleaved repetitions")
    print(head + "\n" + "-" * len(head))
    for batch, name, params, t, ratio in rows:
        print(f"{batch:>5}  {name:<8}  {params:>13,}  {t:>9.3f}  {ratio:>8.2f}x")
    if args.out is not None:
        text = "batch,version,stored_params,ms,ratio_to_static\n" + "".join(
            f"{b},{n},{p},{t:.6g},{r:.6g}\n" for b, n, p, t, r in rows)
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
    return 0
