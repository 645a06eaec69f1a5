"""``padnet partition``: one-shot Iterative Mode Partition of a model, with a per-layer report.

The model is a trained run (``--run RUN_DIR``: its config and weights) or built fresh from a
config (``-c CONFIG``: made fully dynamic with the config's method). IMP scores the positions on
``imp_num_batches`` training batches and keeps ``round(dynamic_ratio * N)`` of them dynamic over
``imp_iterations`` iterations; every option is a config key (``--dynamic-ratio 0.3
--imp-score taylor --imp-granularity channel ...``). Writes ``model.safetensors``,
``masks.safetensors``, ``partition.json`` and ``config.yaml`` to ``--out`` (default:
``RUN_DIR/partition`` for ``--run``, ``OUT_DIR/partition`` for ``-c``), so that ``padnet eval``
can evaluate the result. An output directory that already holds a run (a trained run, an earlier
partition) is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from padnet.cli.options import add_config_arguments, config_overrides


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("partition", help="run one-shot IMP on a model and save the masks",
                       description=__doc__, allow_abbrev=False,
                       usage="%(prog)s (-c CONFIG | --run RUN_DIR) [--out OUT] [--overwrite] "
                             "[--eval] [--KEY VALUE ...]",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-c", "--config", type=Path, help="build the model from a YAML config")
    src.add_argument("--run", dest="run_dir", type=Path,
                     help="a run directory written by `padnet train`")
    p.add_argument("--out", type=Path, default=None, help="output directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run or an earlier partition in the output directory")
    p.add_argument("--eval", action="store_true", help="validation accuracy before and after")
    add_config_arguments(p)
    p.set_defaults(run=run)


def _model(args: argparse.Namespace) -> tuple:
    from padnet.train import load_config
    from padnet.train.build import build_data, build_model, input_channels, load_run
    from padnet.train.rundir import model_info
    from padnet.train.step import seed_everything

    if args.run_dir is not None:
        loaded = load_run(args.run_dir, overrides=config_overrides(args))
        return loaded.cfg, loaded.model, loaded.splits, loaded.info
    cfg = load_config(args.config, config_overrides(args))
    if cfg.method == "none":
        raise ValueError("partition needs a dynamic method (the config has method 'none')")
    seed_everything(cfg.seed)
    splits = build_data(cfg)
    in_chans = input_channels(cfg, splits)
    model = build_model(cfg, num_classes=splits.num_classes, in_chans=in_chans,
                        dynamic_ratio=1.0)
    return cfg, model, splits, model_info(splits, in_chans)


def _val_accuracy(model, splits, cfg) -> float:  # noqa: ANN001
    import torch
    from torch.utils.data import DataLoader

    from padnet.train.step import evaluate

    val = DataLoader(splits.val, batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                     collate_fn=splits.collate)
    return evaluate(model, val, splits.num_classes, torch.device("cpu"))["acc"]


#: the files ``padnet partition`` writes besides those of a run directory
PARTITION_FILES = ("masks.safetensors", "partition.json")


def _output_dir(args: argparse.Namespace, cfg) -> Path:  # noqa: ANN001
    """``--out``, else ``partition/`` inside the run given (never the directory named in its
    config: a copied run writes into the copy), else inside the config's out_dir. Raises
    ValueError when it holds a run or a partition and ``--overwrite`` is not given."""
    from padnet.train.rundir import RunDir

    if args.out is not None:
        out = args.out
    elif args.run_dir is not None:
        out = args.run_dir / "partition"
    else:
        out = Path(cfg.out_dir) / "partition"
    if out.exists() and not out.is_dir():
        raise ValueError(f"output directory {out} is a file; choose another --out")
    existing = [p.name for p in RunDir(out).run_files()]
    existing += [n for n in PARTITION_FILES if (out / n).exists()]
    if existing and not args.overwrite:
        what = ("the trained run itself" if args.run_dir is not None
                and out.resolve() == args.run_dir.resolve() else "a run")
        raise ValueError(f"{out} already holds {what} ({', '.join(existing)}); pass "
                         "--overwrite to replace it, or choose another --out")
    return out


def _save(out: Path, cfg, model, info: dict, result) -> None:  # noqa: ANN001
    """The partitioned model as a run directory (``padnet eval`` reads it), with its masks and
    the partition report; what an earlier run left there (checkpoints, metrics, summary) goes
    (``--overwrite`` was given)."""
    from padnet.layers import mode_masks
    from padnet.train.config import absolute_paths
    from padnet.train.rundir import RunDir, weights_metadata
    from padnet.utils.io import save_json, save_safetensors

    run_dir = RunDir(out)
    run_dir.clear()
    out_cfg = absolute_paths(cfg.replace(imp_mode="none", out_dir=str(out)))
    run_dir.write_weights(model.state_dict(), weights_metadata(out_cfg, info))
    save_safetensors(out / "masks.safetensors",
                     {f"{name}.mask": m.mask for name, m in mode_masks(model)})
    save_json(out / "partition.json", result.to_dict())
    run_dir.write_config(out_cfg)


def run(args: argparse.Namespace) -> int:
    import padnet
    from padnet.layers import mode_masks
    from padnet.train.imp import run_partition, scoring_loader

    cfg, model, splits, info = _model(args)
    if not mode_masks(model):
        raise ValueError("the model has no PAD layers: its config has method 'none'")
    out = _output_dir(args, cfg)
    loader = scoring_loader(splits.train, batch_size=cfg.batch_size, collate=splits.collate,
                            seed=cfg.seed)
    check = bool(args.eval and splits.val)
    before = _val_accuracy(model, splits, cfg) if check else None
    result = run_partition(model, loader, cfg)
    print(result)
    print()
    print(padnet.stats(model))
    if check:
        after = _val_accuracy(model, splits, cfg)
        print(f"\nvalidation accuracy: {before:.4f} before, {after:.4f} after partitioning")
    _save(out, cfg, model, info, result)
    print(f"\nwrote {out}/model.safetensors, masks.safetensors, partition.json, config.yaml")
    return 0
