"""Benchmark: dense FFN vs MoE (top-1, top-2) vs PAD-MoE vs a naive loop over experts, on CPU.

Shapes of MiniLM (hidden 384, FFN 1536) and BERT-base (768, 3072), 8 experts, 512 to 8192 tokens.
Every variant runs on the same tokens; repetitions are interleaved (variant A, B, C, A, B, C, ...)
and the median is reported, as a ratio to the dense FFN measured in the same rounds. Modes:
``infer`` (eval, no autograd) for every size, ``train`` (forward + backward) at 4096 tokens.
Variants:

* ``dense``: ``fc2(gelu(fc1(x)))``, the FFN the MoE replaces;
* ``moe_top1``, ``moe_top2``: :class:`padnet.layers.moe.MoE`, defaults (sort by expert, each
  expert block through both matrices in one loop step, hand-written backward, ``index_add``
  back); ``moe_top2_bmm``: the padded batched-matmul path;
* ``pad_top2_fold`` (the default), ``pad_top2_shared``: PAD-MoE with dynamic ratio 0.5, each
  expert's effective weight folded just before its matmul, or the static part computed as a
  shared expert;
* ``naive_top1``, ``naive_top2``: the usual loop over experts with boolean-mask gathers
  (``torch.where(experts == e)``, ``index_add_``), nn.Linear experts with the same weights;
* ``naive_pad_top2``: the same loop for PAD-MoE, effective weights folded for all experts with
  ``ModeMask.combine`` each forward (the formula as written).

Target: MoE top-k time <= (k + 0.3) x dense time at 4096 tokens.

Usage: ``python benchmarks/moe_layer.py [--quick] [--out benchmarks/results/moe_layer]``
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from padnet.bench.load import OtherLoad
from padnet.layers.moe import MoE

SHAPES = {"MiniLM": (384, 1536), "BERT-base": (768, 3072)}
TOKENS = (512, 2048, 4096, 8192)
EXPERTS = 8
TRAIN_TOKENS = 4096


class NaiveMoE(nn.Module):
    """The usual loop over experts with a boolean-mask gather per expert (Mixtral style)."""

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        self.moe, self.top_k = moe, moe.top_k
        self.experts = nn.ModuleList()
        for e in range(moe.num_experts):
            fc1, fc2 = nn.Linear(moe.hidden_size, moe.intermediate_size), nn.Linear(
                moe.intermediate_size, moe.hidden_size)
            with torch.no_grad():
                fc1.weight.copy_(moe.w1[e]), fc1.bias.copy_(moe.b1[e])
                fc2.weight.copy_(moe.w2[e]), fc2.bias.copy_(moe.b2[e])
            self.experts.append(nn.Sequential(fc1, nn.GELU(), fc2))

    def forward(self, x: Tensor) -> Tensor:
        logits = F.linear(x.float(), self.moe.router.weight.float())
        values, experts = torch.topk(logits, self.top_k, dim=-1)
        gates = torch.softmax(values, dim=-1).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(experts == e)
            if tok.numel():
                out.index_add_(0, tok, expert(x[tok]) * gates[tok, slot, None])
        return out


class NaivePadMoE(nn.Module):
    """PAD-MoE the obvious way: fold every expert's effective weight with ``ModeMask.combine``
    (docs/method.md §2.2's formula, ``(E, out, in)`` tensors) each forward, then the usual loop."""

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: Tensor) -> Tensor:
        m = self.moe
        w1 = m.mode_mask1.combine(m.w1, m.w1_static).unbind(0)
        w2 = m.mode_mask2.combine(m.w2, m.w2_static).unbind(0)
        b1, b2 = m.b1.unbind(0), m.b2.unbind(0)
        logits = F.linear(x.float(), m.router.weight.float())
        values, experts = torch.topk(logits, m.top_k, dim=-1)
        gates = torch.softmax(values, dim=-1).to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(m.num_experts):
            tok, slot = torch.where(experts == e)
            if tok.numel():
                y = F.linear(F.gelu(F.linear(x[tok], w1[e], b1[e])), w2[e], b2[e])
                out.index_add_(0, tok, y * gates[tok, slot, None])
        return out


def variants(hidden: int, inter: int) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(hidden, inter), nn.Linear(inter, hidden)
    dense = nn.Sequential(fc1, nn.GELU(), fc2)
    out: dict[str, nn.Module] = {"dense": dense}
    for k in (1, 2):
        out[f"moe_top{k}"] = MoE.from_dense(fc1, fc2, num_experts=EXPERTS, top_k=k,
                                            init="copy_noise", copy_noise_std=0.1)
    out["moe_top2_bmm"] = MoE.from_dense(fc1, fc2, num_experts=EXPERTS, top_k=2, path="bmm",
                                         init="copy_noise", copy_noise_std=0.1)
    for path in ("fold", "shared"):
        out[f"pad_top2_{path}"] = MoE.from_dense(
            fc1, fc2, num_experts=EXPERTS, top_k=2, dynamic_ratio=0.5, static_path=path,
            init="copy_noise", copy_noise_std=0.1)
    for k in (1, 2):
        out[f"naive_top{k}"] = NaiveMoE(out[f"moe_top{k}"])
    out["naive_pad_top2"] = NaivePadMoE(out["pad_top2_fold"])
    return out


def step(module: nn.Module, x: Tensor, mode: str) -> Callable[[], None]:
    if mode == "infer":
        module.eval()

        def run() -> None:
            with torch.no_grad():
                module(x)
    else:
        module.train()
        x = x.detach().requires_grad_()  # as inside a network: the input gets a gradient too
        grad = torch.randn_like(x)

        def run() -> None:
            module.zero_grad(set_to_none=True)
            module(x).backward(grad)
    return run


def measure(runs: dict[str, Callable[[], None]], reps: int) -> tuple[dict, dict]:
    """Interleaved rounds (after one warm-up each): per variant the median seconds, and the
    median over rounds of its time divided by the dense time of the same round (robust to
    other load on the machine drifting between rounds)."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    dense = times["dense"]
    seconds = {name: statistics.median(ts) for name, ts in times.items()}
    ratios = {name: statistics.median(t / d for t, d in zip(ts, dense, strict=True))
              for name, ts in times.items()}
    return seconds, ratios


def cpu_model() -> str:
    """``model name`` of /proc/cpuinfo, with family, model and the widest vector extension."""
    try:
        info = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
        flags = info.get("flags", "").split()
        simd = next((f for f in ("avx512f", "avx2", "avx") if f in flags), "no avx")
        return (f"{info.get('model name', 'unknown')} (cpu family {info.get('cpu family', '?')}, "
                f"model {info.get('model', '?')}, {simd})")
    except OSError:
        return platform.processor() or "unknown"


def reps_for(mode: str, tokens: int, hidden: int, quick: bool) -> int:
    """Interleaved rounds: more for cheap sizes (the whole run stays under ~5 minutes)."""
    if quick:
        return 2
    if mode == "train":
        return 7
    work = tokens * hidden
    return 9 if work <= 2048 * 384 else 7 if work <= 4096 * 384 else 5 if work <= 4096 * 768 else 3


def run_all(quick: bool, cores: int) -> list[dict]:
    rows = []
    for shape, (hidden, inter) in SHAPES.items():
        mods = variants(hidden, inter)
        for mode in ("infer", "train"):
            for tokens in TOKENS if mode == "infer" else (TRAIN_TOKENS,):
                if quick and tokens > 2048:
                    continue
                x = torch.randn(tokens, hidden)
                # the shared-expert PAD path is far slower: measured at small sizes only
                runs = {name: step(m, x, mode) for name, m in mods.items()
                        if name != "pad_top2_shared" or (mode == "infer" and tokens <= 2048)}
                reps = reps_for(mode, tokens, hidden, quick)
                with OtherLoad(cores) as load:
                    med, ratio = measure(runs, reps)
                for name, sec in med.items():
                    rows.append({"shape": shape, "hidden": hidden, "intermediate": inter,
                                 "mode": mode, "tokens": tokens, "variant": name,
                                 "ms": round(sec * 1e3, 2), "ratio": round(ratio[name], 3),
                                 "reps": reps, "other_cpu": round(load.share, 3)})
                text = " ".join(f"{n}={r:.2f}" for n, r in ratio.items())
                print(f"{shape} {mode} {tokens}: dense {med['dense'] * 1e3:.1f} ms | {text} | "
                      f"other processes {load.share:.0%} CPU", flush=True)
    return rows


def write(rows: list[dict], out: Path, header: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    names = list(dict.fromkeys(r["variant"] for r in rows))
    lines = [*header, ""]
    for shape in SHAPES:
        for mode in ("infer", "train"):
            sel = [r for r in rows if r["shape"] == shape and r["mode"] == mode]
            if not sel:
                continue
            lines += [f"### {shape}, {mode} (time / dense FFN time; dense in ms)", "",
                      "| tokens | dense ms | " + " | ".join(names[1:]) + " |",
                      "|---" * (len(names) + 1) + "|"]
            for tokens in sorted({r["tokens"] for r in sel}):
                by = {r["variant"]: r for r in sel if r["tokens"] == tokens}
                cells = [f"{by[n]['ratio']:.2f}" if n in by else "-" for n in names[1:]]
                lines.append(f"| {tokens} | {by['dense']['ms']:.1f} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["### Target: MoE top-k <= (k + 0.3) x dense at 4096 tokens", "",
              "| shape | mode | top-1 (<= 1.3) | top-2 (<= 2.3) | naive top-1 | naive top-2 "
              "| PAD top-2 | naive PAD top-2 |",
              "|---|---|---|---|---|---|---|---|"]
    for shape in SHAPES:
        for mode in ("infer", "train"):
            by = {r["variant"]: r["ratio"] for r in rows
                  if r["shape"] == shape and r["mode"] == mode and r["tokens"] == 4096}
            if by:
                t1, t2 = by["moe_top1"], by["moe_top2"]
                lines.append(
                    f"| {shape} | {mode} | {t1:.2f} {'met' if t1 <= 1.3 else 'MISSED'} | "
                    f"{t2:.2f} {'met' if t2 <= 2.3 else 'MISSED'} | {by['naive_top1']:.2f} | "
                    f"{by['naive_top2']:.2f} | {by['pad_top2_fold']:.2f} | "
                    f"{by['naive_pad_top2']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 repetitions")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/moe_layer"))
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(cores)
    start = time.time()
    rows = run_all(args.quick, cores)
    other = [r["other_cpu"] for r in rows]
    header = [
        "# MoE layer benchmark (benchmarks/moe_layer.py)", "",
        f"- command: `{' '.join([os.path.relpath(sys.executable), *sys.argv])}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- device: CPU {cpu_model()}, {cores} cores, torch.set_num_threads({cores}), "
        f"torch {torch.__version__}, Python {platform.python_version()}",
        f"- CPU time taken by other processes during the measurements (shared machine; from "
        f"/proc/stat): mean {statistics.mean(other):.0%}, max {max(other):.0%} of the "
        f"{cores} cores (per configuration: column other_cpu of the CSV); total time "
        f"{time.time() - start:.0f} s",
        f"- {EXPERTS} experts, float32, 'infer' = eval mode without autograd, 'train' = forward "
        f"+ backward with an input that needs a gradient (as inside a network). Interleaved "
        f"rounds (infer: 9 at small sizes down to 3 at the largest; train: 7); per variant the "
        f"median over rounds of time / dense time of the same round. PAD-MoE: dynamic ratio "
        f"0.5, scale mode 'both'. '-': not measured (the shared-expert path only up to 2048 "
        f"tokens).",
    ]
    doc = __doc__.split("Variants:\n", 1)[1].split("\nTarget:", 1)[0].strip()
    header += ["", "Variants (all on the same tokens, 8 experts, router at its initial weights):",
               "", doc]
    write(rows, args.out, header)
    print(f"wrote {args.out.with_suffix('.md')} and .csv")


if __name__ == "__main__":
    main()
