"""``padnet convert``: make a model (partially) dynamic and check that nothing changed.

Builds a registry model (optionally with pretrained weights), converts it with
:func:`padnet.dynamize`, runs both versions on a batch of real images (Fashion-MNIST when its files
are found, random inputs otherwise), and prints the conversion report, the output difference,
the top-1 agreement, the latency ratio and the storage table. ``--out`` saves the converted
weights (safetensors) and a JSON summary, both written atomically.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a model to a (partially) dynamic one and check it",
                       description=__doc__)
    p.add_argument("--model", default="resnet20", help="registry name (see `padnet list`)")
    p.add_argument("--pretrained", action="store_true", help="load pretrained weights")
    p.add_argument("--num-classes", type=int, default=None, help="default: 1000 if pretrained, "
                   "else 10")
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--method", default="dyconv", help="dyconv, condconv or odconv")
    p.add_argument("--num-kernels", type=int, default=4)
    p.add_argument("--dynamic-ratio", type=float, default=1.0,
                   help="fraction of dynamic positions per layer (random mask until partitioned)")
    p.add_argument("--scale-mode", default="both")
    p.add_argument("--init", default="copy", help="copy, copy_noise or kaiming")
    p.add_argument("--include", nargs="*", default=None, help="module-name patterns to convert")
    p.add_argument("--exclude", nargs="*", default=None, help="module-name patterns to keep")
    p.add_argument("--check", action="store_true", help="compare outputs before and after")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST directory for --check")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=None,
                   help="input side length (default: 224 for pretrained models, else 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="directory for weights and summary")
    p.set_defaults(run=run)


def check_batch(args: argparse.Namespace, size: int) -> tuple[torch.Tensor, str]:
    """A batch of Fashion-MNIST test images shaped for the model, or random inputs."""
    from padnet.data import find_fashion_mnist, load_fashion_mnist

    if find_fashion_mnist(args.data_dir) is None:
        if args.data_dir is not None:
            load_fashion_mnist(args.data_dir, "test")  # raises with instructions
        gen = torch.Generator().manual_seed(args.seed)
        return torch.randn(args.batch_size, args.in_chans, size, size, generator=gen), "random"
    images, _ = load_fashion_mnist(args.data_dir, "test")
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    x = images[idx[: args.batch_size]].float().div(255.0)[:, None]  # (B, 1, 28, 28)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.expand(-1, args.in_chans, -1, -1)
    if args.pretrained and args.in_chans == 3:
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (x - mean) / std, "Fashion-MNIST test images"
    return (x - 0.5) / 0.5, "Fashion-MNIST test images"


def run(args: argparse.Namespace) -> int:
    import padnet
    from padnet.bench import measure_latency
    from padnet.models import create_model
    from padnet.utils.io import save_json, save_safetensors

    torch.manual_seed(args.seed)
    num_classes = args.num_classes or (1000 if args.pretrained else 10)
    model = create_model(args.model, num_classes=num_classes, in_chans=args.in_chans,
                         pretrained=args.pretrained).eval()
    summary: dict = {"model": args.model, "pretrained": args.pretrained, "method": args.method}
    size = args.image_size or (224 if args.pretrained else 32)
    if args.check:
        x, source = check_batch(args, size)
        with torch.no_grad():
            before = model(x)
        static = copy.deepcopy(model)  # timed side by side with the converted model

    padnet.dynamize(
        model, args.method, num_kernels=args.num_kernels, include=args.include,
        exclude=args.exclude, init=args.init, dynamic_ratio=args.dynamic_ratio,
        scale_mode=args.scale_mode,
    )
    report, table = model.padnet_report, padnet.stats(model)
    print(report)
    print()
    print(table)
    summary.update(conversion=report.to_dict(), stats=table.to_dict()["total"])

    if args.check:
        with torch.no_grad():
            after = model(x)
        rel = float((after - before).abs().max() / before.abs().max())
        agree = float((after.argmax(1) == before.argmax(1)).float().mean())
        ms = measure_latency({"static": static, "converted": model}, x[:1], reps=10)
        t_static, t_dynamic = ms["static"], ms["converted"]
        print(f"\ncheck on {len(x)} {source} ({size}x{size}): max |difference| / max |output| "
              f"= {rel:.2e}, top-1 agreement {agree:.1%}")
        print(f"latency at batch 1: static {t_static:.1f} ms, converted {t_dynamic:.1f} ms "
              f"({t_dynamic / t_static:.2f}x)")
        summary["check"] = {"inputs": source, "batch": len(x), "relative_max_diff": rel,
                            "top1_agreement": agree, "latency_static_ms": t_static,
                            "latency_converted_ms": t_dynamic}
    if args.out is not None:
        meta = {"model": args.model, "method": args.method, "num_classes": num_classes,
                "in_chans": args.in_chans}
        save_safetensors(args.out / "model.safetensors", model.state_dict(), meta)
        save_json(args.out / "summary.json", summary)
        print(f"\nwrote {args.out / 'model.safetensors'} and {args.out / 'summary.json'}")
    return 0
