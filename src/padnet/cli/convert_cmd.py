"""``padnet convert``: make a model (partially) dynamic and check that nothing changed.

Builds an image model of the registry (optionally with pretrained weights) from the config keys
of ``padnet train`` (``--model``, ``--method``, ``--dynamic-ratio``, ``--include``, ... or
``-c CONFIG``; without a config the base is model resnet20, method dyconv, batch size 16),
converts it as training would, runs both versions on a batch of real images (Fashion-MNIST when
its files are found, random inputs otherwise), and prints the conversion report, the output
difference, the top-1 agreement, the latency ratio and the storage table. ``--out`` saves the
converted weights (safetensors) and a JSON summary, both written atomically.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from padnet.cli.options import add_config_arguments, config_overrides

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: the config keys ``padnet convert`` takes (``batch_size``: images of the check)
CONVERT_KEYS = ("model", "pretrained", "width", "width_mult", "in_chans", "method",
                "num_kernels", "include", "exclude", "init", "dynamic_ratio", "scale_mode",
                "temperature_start", "image_size", "batch_size", "seed")
#: the base values without ``-c CONFIG``
CONVERT_DEFAULTS = {"model": "resnet20", "method": "dyconv", "batch_size": 16}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a model to a (partially) dynamic one and check it",
                       description=__doc__, allow_abbrev=False,
                       usage="%(prog)s [-c CONFIG] [--check] [--data-dir DIR] [--num-classes N] "
                             "[--out OUT [--overwrite]] [--KEY VALUE ...]")
    p.add_argument("-c", "--config", type=Path, default=None,
                   help="YAML config of the model (default: the base values below)")
    p.add_argument("--check", action="store_true", help="compare outputs before and after")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST directory for --check")
    p.add_argument("--num-classes", type=int, default=None, help="default: 1000 if pretrained, "
                   "else 10")
    p.add_argument("--out", type=Path, default=None, help="directory for weights and summary")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the files of an earlier --out")
    add_config_arguments(p, CONVERT_KEYS, defaults=CONVERT_DEFAULTS,
                         title="config keys of the model and the check")
    add_config_arguments(p, _other_keys(), title="the other config keys (as in padnet train, "
                         "so that a training config applies; not used by convert)")
    p.set_defaults(run=run)


def _other_keys() -> list[str]:
    from padnet.train.config import TrainConfig

    return [k for k in TrainConfig.keys() if k not in CONVERT_KEYS]


def check_batch(cfg, data_dir: str | None, size: int,  # noqa: ANN001
                in_chans: int) -> tuple[torch.Tensor, str]:
    """A batch of ``cfg.batch_size`` Fashion-MNIST test images shaped for the model, or random
    inputs when the files are not found."""
    from padnet.data import find_fashion_mnist, load_fashion_mnist

    if find_fashion_mnist(data_dir) is None:
        if data_dir is not None:
            load_fashion_mnist(data_dir, "test")  # raises with instructions
        gen = torch.Generator().manual_seed(cfg.seed)
        return torch.randn(cfg.batch_size, in_chans, size, size, generator=gen), "random"
    images, _ = load_fashion_mnist(data_dir, "test")
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed))
    x = images[idx[: cfg.batch_size]].float().div(255.0)[:, None]  # (B, 1, 28, 28)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.expand(-1, in_chans, -1, -1)
    if cfg.pretrained and in_chans == 3:
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (x - mean) / std, "Fashion-MNIST test images"
    return (x - 0.5) / 0.5, "Fashion-MNIST test images"


def _config(args: argparse.Namespace):  # noqa: ANN202
    from padnet.train import load_config
    from padnet.train.build import is_text_model

    overrides = config_overrides(args)
    cfg = load_config(args.config, overrides if args.config is not None
                      else {**CONVERT_DEFAULTS, **overrides})
    if cfg.method == "none":
        raise ValueError("convert needs a conversion method (method is 'none')")
    if is_text_model(cfg):
        raise ValueError(f"convert checks image models; {cfg.model!r} is a text model")
    return cfg


def run(args: argparse.Namespace) -> int:
    import padnet
    from padnet.train.build import apply_method, build_base_model
    from padnet.utils.io import save_json, save_safetensors

    cfg = _config(args)
    if args.out is not None and not args.overwrite:
        taken = [n for n in ("model.safetensors", "summary.json") if (args.out / n).exists()]
        if taken:
            raise ValueError(f"{args.out} already holds {' and '.join(taken)}; pass --overwrite "
                             "to replace them, or choose another --out")
    torch.manual_seed(cfg.seed)
    num_classes = args.num_classes or (1000 if cfg.pretrained else 10)
    in_chans = cfg.in_chans or 3
    model = build_base_model(cfg, num_classes=num_classes, in_chans=in_chans).eval()
    summary: dict = {"model": cfg.model, "pretrained": cfg.pretrained, "method": cfg.method}
    size = cfg.image_size or (224 if cfg.pretrained else 32)
    if args.check:
        x, source = check_batch(cfg, args.data_dir, size, in_chans)
        with torch.no_grad():
            before = model(x)
        static = copy.deepcopy(model)  # timed side by side with the converted model

    apply_method(cfg, model, dynamic_ratio=cfg.dynamic_ratio)
    report, table = model.padnet_report, padnet.stats(model)
    print(report)
    print()
    print(table)
    summary.update(conversion=report.to_dict(), stats=table.to_dict()["total"])
    if args.check:
        summary["check"] = _compare(static, model, x, before, source)
    if args.out is not None:
        meta = {"model": cfg.model, "method": cfg.method, "num_classes": num_classes,
                "in_chans": in_chans}
        save_safetensors(args.out / "model.safetensors", model.state_dict(), meta)
        save_json(args.out / "summary.json", summary)
        print(f"\nwrote {args.out / 'model.safetensors'} and {args.out / 'summary.json'}")
    return 0


def _compare(static: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor,
             before: torch.Tensor, source: str) -> dict:
    """Print and return the output difference, top-1 agreement and batch-1 latencies of the
    converted ``model`` against the ``static`` original."""
    from padnet.bench import measure_latency

    with torch.no_grad():
        after = model(x)
    rel = float((after - before).abs().max() / before.abs().max())
    agree = float((after.argmax(1) == before.argmax(1)).float().mean())
    ms = measure_latency({"static": static, "converted": model}, x[:1], reps=10)
    t_static, t_dynamic = ms["static"], ms["converted"]
    size = x.shape[-1]
    print(f"\ncheck on {len(x)} {source} ({size}x{size}): max |difference| / max |output| "
          f"= {rel:.2e}, top-1 agreement {agree:.1%}")
    print(f"latency at batch 1: static {t_static:.1f} ms, converted {t_dynamic:.1f} ms "
          f"({t_dynamic / t_static:.2f}x)")
    return {"inputs": source, "batch": len(x),
            "relative_max_diff": rel, "top1_agreement": agree, "latency_static_ms": t_static,
            "latency_converted_ms": t_dynamic}
