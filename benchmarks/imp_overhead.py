"""Benchmark: wall time of interleaved IMP against the training it is part of.

Demo configuration: Fashion-MNIST (a seeded subset of the training split), ``resnet8`` with every
block convolution turned into DY-Conv (K = 4, function-preserving copy init), a plain SGD loop
(momentum 0.9, lr 0.05, batch 64) and :class:`padnet.partition.IterativePartition` with T
iterations over the first 30 % of the steps down to kappa = 0.3 (Taylor score, global threshold,
``bn_mode='train'``). Each ``num_batches`` setting is a separate run from the same seed. IMP time
is the wall time spent inside ``imp.step()``; total is the whole training loop (batching,
forward, backward, optimizer, IMP). Target: IMP <= 5 % of the total. One scoring batch costs
about one training step, so the share is about ``T * num_batches / steps``.

    python benchmarks/imp_overhead.py              # full run (~3 min on 2 CPU cores)
    python benchmarks/imp_overhead.py --quick      # smoke run (1,000 images, prints only)
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import padnet
from padnet.bench import device_description
from padnet.data import load_fashion_mnist
from padnet.models import create_model
from padnet.partition import IterativePartition

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST pixel statistics


def load_split(root: Path, split: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_fashion_mnist(root, split)
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
    x = (images[idx].float().div(255.0) - MEAN) / STD
    return x[:, None], labels[idx]  # (n, 1, 28, 28), (n,)


def batches(x: torch.Tensor, y: torch.Tensor, size: int, seed: int) -> list[tuple]:
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return [(x[i], y[i]) for i in order.split(size)]


def run(args: argparse.Namespace, num_batches: int, train: tuple) -> dict:
    torch.manual_seed(args.seed)
    model = padnet.dynamize(create_model("resnet8", num_classes=10, in_chans=1), "dyconv",
                            num_kernels=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = -(-len(train[1]) // args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    end = round(args.warmup_frac * total_steps)
    imp = IterativePartition(model, batches(*train, args.batch_size, seed=args.seed + 1000),
                             dynamic_ratio=args.kappa, iterations=args.iterations, start_step=0,
                             end_step=end, num_batches=num_batches, seed=args.seed)
    imp_time, losses = 0.0, []
    model.train()
    start = time.perf_counter()
    for epoch in range(args.epochs):
        for x, y in batches(*train, args.batch_size, seed=args.seed + epoch):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            t0 = time.perf_counter()
            imp.step()
            imp_time += time.perf_counter() - t0
    total = time.perf_counter() - start
    assert imp.done
    return {"num_batches": num_batches, "steps": total_steps, "imp_steps": imp.schedule_steps,
            "imp_s": imp_time, "total_s": total, "share": imp_time / total,
            "iteration_s": imp.result.seconds, "step_s": (total - imp_time) / total_steps,
            "ratio": imp.result.total_ratio, "loss": sum(losses[-20:]) / len(losses[-20:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="Fashion-MNIST directory")
    parser.add_argument("--subset", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--warmup-frac", type=float, default=0.3)
    parser.add_argument("--kappa", type=float, default=0.3)
    parser.add_argument("--num-batches", type=int, nargs="+", default=[4, 1])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="1,000 images, num_batches 1, prints instead of writing")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.quick:
        args.subset, args.num_batches = 1_000, [1]
    if args.threads:
        torch.set_num_threads(args.threads)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) \
        if Path("/proc/loadavg").exists() else "unknown"
    train = load_split(args.data, "train", args.subset, args.seed)

    rows = []
    for nb in args.num_batches:
        r = run(args, nb, train)
        rows.append(r)
        print(f"num_batches={nb}: IMP {r['imp_s']:.1f} s of {r['total_s']:.1f} s total = "
              f"{100 * r['share']:.1f} %  (train step {1e3 * r['step_s']:.0f} ms, iterations "
              f"{', '.join(f'{s:.2f}' for s in r['iteration_s'])} s; final ratio "
              f"{r['ratio']:.3f}, train loss {r['loss']:.3f})", flush=True)

    lines = [
        "# IMP overhead: interleaved Iterative Mode Partition vs the training around it",
        "",
        f"- command: `{' '.join(['python benchmarks/imp_overhead.py', *sys.argv[1:]])}`",
        f"- date: {datetime.date.today().isoformat()}",
        f"- device: {device_description()}",
        f"- configuration: Fashion-MNIST, {args.subset:,} training images, batch "
        f"{args.batch_size}, {args.epochs} epoch(s) = {rows[0]['steps']} SGD steps; resnet8 "
        f"dynamized with dyconv K = 4; IMP: {args.iterations} iterations (Taylor, global, "
        f"exponential, bn_mode train) after steps {rows[0]['imp_steps']} down to kappa = "
        f"{args.kappa}. Train loss: mean of the last 20 steps (context only: one epoch is "
        "far from convergence).",
        f"- load average when started (the machine is shared): {load}",
        "- IMP time = wall time inside `imp.step()`; total = the whole training loop. "
        "Target: IMP <= 5 % of total.",
        "",
        "| scoring batches per iteration | train step ms | IMP s | total s | IMP share | "
        "target met | iteration s | final kappa | train loss |",
        "|---:|---:|---:|---:|---:|:---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['num_batches']} | {1e3 * r['step_s']:.0f} | {r['imp_s']:.2f} | "
            f"{r['total_s']:.1f} | {100 * r['share']:.1f} % | "
            f"{'yes' if r['share'] <= 0.05 else 'no'} | "
            f"{', '.join(f'{s:.2f}' for s in r['iteration_s'])} | {r['ratio']:.3f} | "
            f"{r['loss']:.3f} |")
    if args.quick:  # smoke run: print only
        print("\n".join(lines))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "imp_overhead.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'imp_overhead.md'}")


if __name__ == "__main__":
    main()
