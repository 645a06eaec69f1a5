"""Benchmark: static vs fully dynamic vs PAD convolution layers, every execution path.

For ResNet- and MobileNetV2-shaped layers at several batch sizes, times the forward pass (eval,
no grad) of

* ``static``: ``nn.Conv2d``;
* ``usual``: a faithful reimplementation of the common dynamic-convolution code (attention,
  ``torch.mm`` aggregation of the K kernels, one grouped convolution with ``groups = B``);
* ``dynamic/<path>``: :class:`padnet.layers.DynamicConv2d` fully dynamic (kappa = 1);
* ``pad/<path>``: the same layer with kappa = 0.3.

Repetitions are interleaved (every variant once per round) and the median is reported as a ratio
to the static convolution. Results go to ``benchmarks/results/conv_layers.{csv,md}``.

    python benchmarks/conv_layers.py            # full run
    python benchmarks/conv_layers.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import csv
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from padnet.bench import device_description
from padnet.layers import DynamicConv2d

# name -> (in, out, kernel, stride, groups, spatial)
LAYERS = {
    "resnet 3x3 64ch 16x16": (64, 64, 3, 1, 1, 16),
    "resnet 3x3 128ch 8x8 s2": (64, 128, 3, 2, 1, 16),
    "resnet 3x3 256ch 4x4": (256, 256, 3, 1, 1, 4),
    "bottleneck 1x1 256->64 8x8": (256, 64, 1, 1, 1, 8),
    "mobilenet dw3x3 144ch 16x16": (144, 144, 3, 1, 144, 16),
}
PATHS = ("grouped", "mixture", "unfold")


class UsualDynamicConv(nn.Module):
    """The common DY-Conv implementation: softmax attention, mm aggregation, grouped conv."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, groups: int, K: int = 4):
        super().__init__()
        hidden = max(c_in // 4, 4)
        self.fc1, self.fc2 = nn.Linear(c_in, hidden), nn.Linear(hidden, K)
        self.weight = nn.Parameter(torch.randn(K, c_out, c_in // groups, k, k) * 0.05)
        self.bias = nn.Parameter(torch.zeros(K, c_out))
        self.stride, self.padding, self.groups, self.K = stride, k // 2, groups, K

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        att = torch.softmax(self.fc2(F.relu(self.fc1(x.mean((2, 3))))), dim=1)
        weight = torch.mm(att, self.weight.view(self.K, -1))
        weight = weight.view(b * self.weight.shape[1], *self.weight.shape[2:])
        bias = torch.mm(att, self.bias).view(-1)
        out = F.conv2d(x.reshape(1, b * c, h, w), weight, bias, self.stride, self.padding,
                       1, self.groups * b)
        return out.view(b, -1, *out.shape[-2:])


def variants(spec: tuple, kappa: float) -> dict[str, nn.Module]:
    c_in, c_out, k, stride, groups, _ = spec
    torch.manual_seed(0)
    out: dict[str, nn.Module] = {
        "static": nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups),
        "usual": UsualDynamicConv(c_in, c_out, k, stride, groups),
    }
    for ratio, tag in ((1.0, "dynamic"), (kappa, "pad")):
        for path in PATHS:
            out[f"{tag}/{path}"] = DynamicConv2d(
                c_in, c_out, k, stride, k // 2, groups=groups, num_kernels=4,
                dynamic_ratio=ratio, path=path,
            )
        out[f"{tag}/auto"] = DynamicConv2d(
            c_in, c_out, k, stride, k // 2, groups=groups, num_kernels=4, dynamic_ratio=ratio,
        )
    return {name: m.eval() for name, m in out.items()}


@torch.no_grad()
def time_layer(spec: tuple, batch: int, reps: int, kappa: float) -> dict[str, float]:
    mods = variants(spec, kappa)
    x = torch.randn(batch, spec[0], spec[5], spec[5])
    for m in mods.values():  # warm-up
        m(x)
    times: dict[str, list[float]] = {n: [] for n in mods}
    for _ in range(reps):
        for name, m in mods.items():
            t0 = time.perf_counter()
            m(x)
            times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--kappa", type=float, default=0.3)
    parser.add_argument("--quick", action="store_true", help="batches 1 and 8, 3 repetitions")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.reps = [1, 8], 3

    rows = []
    for layer, spec in LAYERS.items():
        for batch in args.batches:
            reps = max(3, args.reps // (4 if batch >= 128 else 1))
            med = time_layer(spec, batch, reps, args.kappa)
            base = med["static"]
            for name, t in med.items():
                rows.append({"layer": layer, "batch": batch, "variant": name,
                             "ms": round(t * 1e3, 3), "ratio_to_static": round(t / base, 2)})
            best = min((n for n in med if n.startswith("pad/") and n != "pad/auto"),
                       key=med.get)
            print(f"{layer:30s} B={batch:<4d} static {base * 1e3:8.2f} ms | usual "
                  f"{med['usual'] / base:5.2f}x | pad/auto {med['pad/auto'] / base:5.2f}x | "
                  f"best pad path {best} {med[best] / base:5.2f}x", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "conv_layers.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    names = list(dict.fromkeys(r["variant"] for r in rows))
    lines = [
        "# Dynamic convolution layers: forward time as a ratio to nn.Conv2d",
        "",
        "- command: `" + " ".join(["python benchmarks/conv_layers.py", *sys.argv[1:]]) + "`",
        f"- date: {datetime.date.today().isoformat()}",
        f"- device: {device_description()}",
        f"- K = 4 kernels, PAD kappa = {args.kappa}, eval mode, no grad, median of "
        "interleaved repetitions; the static column is in milliseconds.",
        "",
        "| layer | batch | static ms | " + " | ".join(n for n in names if n != "static") + " |",
        "|---|---:|---:|" + "---:|" * (len(names) - 1),
    ]
    for layer in LAYERS:
        for batch in args.batches:
            sel = {r["variant"]: r for r in rows if r["layer"] == layer and r["batch"] == batch}
            cells = [f"{sel[n]['ratio_to_static']:.2f}" for n in names if n != "static"]
            lines.append(f"| {layer} | {batch} | {sel['static']['ms']:.2f} | "
                         + " | ".join(cells) + " |")
    (args.out / "conv_layers.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'conv_layers.md'}")


if __name__ == "__main__":
    main()
