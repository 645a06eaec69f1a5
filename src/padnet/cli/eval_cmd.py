"""``padnet eval RUN_DIR``: evaluate a saved run on its validation and test splits.

Rebuilds the model from ``RUN_DIR/config.yaml`` and loads ``RUN_DIR/model.safetensors`` (or the
latest checkpoint with ``--checkpoint``, or when the run has not finished). Config keys may be
overridden (``--data-root PATH``, ``--device cpu``, ``--eval-batch-size 256``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from padnet.cli.options import add_config_arguments, config_overrides


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a saved run on val/test", description=__doc__,
                       allow_abbrev=False, usage="%(prog)s RUN_DIR [--split {val,test,all}] "
                       "[--checkpoint] [--out OUT] [--KEY VALUE ...]")
    p.add_argument("run_dir", type=Path, help="a run directory written by `padnet train`")
    p.add_argument("--split", choices=("val", "test", "all"), default="all")
    p.add_argument("--checkpoint", action="store_true", help="use the latest checkpoint")
    p.add_argument("--out", type=Path, default=None, help="also write the metrics as JSON")
    add_config_arguments(p, title="config keys (override the run's config.yaml)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader

    import padnet
    from padnet.train.build import load_run
    from padnet.train.distributed import resolve_device
    from padnet.train.step import evaluate
    from padnet.utils.io import save_json

    loaded = load_run(args.run_dir, overrides=config_overrides(args), checkpoint=args.checkpoint)
    cfg, splits = loaded.cfg, loaded.splits
    device = resolve_device(cfg.device)
    model = loaded.model.to(device)
    names = ("val", "test") if args.split == "all" else (args.split,)
    results: dict = {"run_dir": str(args.run_dir), "weights": str(loaded.weights)}
    print(f"{loaded.weights}: {padnet.stats(model).stored_params:,} stored parameters")
    for name in names:
        data = getattr(splits, name)
        if data is None:
            if args.split != "all":
                raise ValueError(f"the data of this run has no {name} split")
            continue
        loader = DataLoader(data, batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                            collate_fn=splits.collate, num_workers=cfg.num_workers)
        with torch.no_grad():
            metrics = evaluate(model, loader, splits.num_classes, device)
        results[name] = {**metrics, "examples": len(data)}
        print(f"{name:>5}: loss {metrics['loss']:.4f}  acc {metrics['acc']:.4f}  "
              f"f1 {metrics['f1']:.4f}  mcc {metrics['mcc']:.4f}  ({len(data)} examples)")
    if args.out is not None:
        save_json(args.out, results)
    return 0
