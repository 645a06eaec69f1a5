"""``padnet partition``: one-shot Iterative Mode Partition of a model, with a per-layer report.

The model is a trained run (``--run RUN_DIR``: its config and weights) or built fresh from a
config (``-c CONFIG``: made fully dynamic with the config's method). IMP scores the positions on
``imp_num_batches`` training batches and keeps ``round(dynamic_ratio * N)`` of them dynamic over
``imp_iterations`` iterations; every option is a config key (``--dynamic-ratio 0.3
--imp-score taylor --imp-granularity channel ...``). Writes ``model.safetensors``,
``masks.safetensors``, ``partition.json`` and ``config.yaml`` to ``--out`` (default
``OUT_DIR/partition``), so that ``padnet eval`` can evaluate the result.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from padnet.cli.options import add_config_arguments, config_overrides


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("partition", help="run one-shot IMP on a model and save the masks",
                       description=__doc__, allow_abbrev=False,
                       usage="%(prog)s (-c CONFIG | --run RUN_DIR) [--out OUT] [--eval] "
                             "[--KEY VALUE ...]",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-c", "--config", type=Path, help="build the model from a YAML config")
    src.add_argument("--run", dest="run_dir", type=Path,
                     help="a run directory written by `padnet train`")
    p.add_argument("--out", type=Path, default=None, help="output directory")
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


def _save(out: Path, cfg, model, info: dict, result) -> None:  # noqa: ANN001
    """The partitioned model as a run directory (``padnet eval`` reads it), with its masks and
    the partition report."""
    from padnet.layers import mode_masks
    from padnet.train.rundir import RunDir, weights_metadata
    from padnet.utils.io import save_json, save_safetensors

    run_dir = RunDir(out)
    out_cfg = cfg.replace(imp_mode="none", out_dir=str(out))
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
    out = args.out if args.out is not None else Path(cfg.out_dir) / "partition"
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
