"""Static vs fully dynamic vs PAD: three runs of one configuration, one table.

Variants: ``static`` (``method: none``), ``dynamic`` (the config's method with kappa = 1, no
IMP) and ``pad`` (the config as written: its kappa and IMP). After training, the latency of the
three models is measured side by side in this process: eval mode, repetitions interleaved
(variant order rotated each round), median per variant, at batch 1 and at the eval batch size.
Beside the stored parameters stand the forward FLOPs per sample of each variant's model on the
eval-size batch (:func:`padnet.convert.stats.flops`, docs/method.md §5.1): ``flops`` as it runs
after training, ``flops_export`` after :func:`padnet.export` (the same for the static model).
Outputs in ``out_dir``: ``compare.csv``, ``compare.md``, ``compare.png`` and one run directory per
variant (with its ``model.safetensors``).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from padnet.bench import measure_latency
from padnet.convert.stats import flops, format_count
from padnet.train.build import batch_inputs
from padnet.train.config import TrainConfig
from padnet.train.distributed import cleanup_distributed, init_distributed
from padnet.utils.checks import check_choice
from padnet.utils.io import atomic_write

__all__ = ["COLUMNS", "VARIANTS", "CompareResult", "compare", "count_flops", "example_inputs",
           "measure_latency", "variant_config"]

VARIANTS = ("static", "dynamic", "pad")
COLUMNS = ("variant", "method", "val_acc", "test_acc", "stored_params", "dynamic_ratio",
           "flops", "flops_export", "latency_ratio_b1", "latency_ratio_bN", "latency_ms_b1",
           "latency_ms_bN", "batch_N", "train_time_s")


def variant_config(cfg: TrainConfig, variant: str, out_dir: str | Path) -> TrainConfig:
    """The config of one variant, writing to ``out_dir/variant``."""
    check_choice(variant, "variant", VARIANTS)
    out = str(Path(out_dir) / variant)
    if variant == "static":
        return cfg.replace(method="none", imp_mode="none", dynamic_ratio=1.0, out_dir=out)
    if variant == "dynamic":
        return cfg.replace(imp_mode="none", dynamic_ratio=1.0, out_dir=out)
    return cfg.replace(out_dir=out)


def example_inputs(splits: Any, batch_size: int, device: torch.device) -> Any:
    """The first ``batch_size`` examples of the validation (else test, else train) split as
    model inputs."""
    data = splits.val or splits.test or splits.train
    items = [data[i] for i in range(min(batch_size, len(data)))]
    inputs, _ = batch_inputs(splits.collate(items), device)
    return inputs


@dataclass
class CompareResult:
    """The comparison table (one dict per variant) and the runs behind it."""

    rows: list[dict[str, Any]]
    out_dir: Path
    runs: dict[str, Any] = field(default_factory=dict)  # variant -> TrainResult
    is_main: bool = True  # rank 0 (or a single process)

    def table(self) -> str:
        """The table as aligned text."""
        head = ("variant", "val acc", "test acc", "stored params", "dyn. ratio",
                "FLOPs/sample", "exported", "latency b=1",
                f"latency b={self.rows[0]['batch_N'] if self.rows else 'N'}", "train s")
        rows = [head] + [(r["variant"], _fmt(r["val_acc"]), _fmt(r["test_acc"]),
                          f"{r['stored_params']:,}", f"{r['dynamic_ratio']:.3f}",
                          _fmt_flops(r.get("flops")), _fmt_flops(r.get("flops_export")),
                          f"{r['latency_ratio_b1']:.2f}x", f"{r['latency_ratio_bN']:.2f}x",
                          f"{r['train_time_s']:.1f}") for r in self.rows]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(row, widths, strict=True)))
                 for row in rows]
        return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])

    def markdown(self) -> str:
        """The table in Markdown (latency as a ratio to the static model)."""
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for r in self.rows:
            lines.append("| " + " | ".join(
                f"{r[c]:,.0f}" if c.startswith("flops") and r.get(c) is not None
                else _fmt(r.get(c)) for c in COLUMNS) + " |")
        return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _fmt_flops(value: float | None) -> str:
    return "-" if value is None else format_count(value)


def count_flops(model: torch.nn.Module, inputs: Any) -> tuple[float | None, float | None]:
    """``(FLOPs per sample as the model runs, after padnet.export)`` on ``inputs``, or Nones with
    a message where they cannot be counted (a layer kind without static equivalent or export)."""
    try:
        f = flops(model, inputs)
    except (TypeError, ValueError) as e:
        print(f"FLOPs not counted for {type(model).__name__}: {e}")
        return None, None
    return f.pad, f.exported


def _row(variant: str, cfg: TrainConfig, run: Any) -> dict[str, Any]:
    import padnet

    final = run.history[-1] if run.history else {}
    stats = padnet.stats(run.model)
    return {"variant": variant, "method": cfg.method, "val_acc": final.get("val_acc"),
            "test_acc": final.get("test_acc"), "stored_params": stats.stored_params,
            "dynamic_ratio": stats.dynamic_ratio if stats.layers else 0.0,
            "train_time_s": run.summary.get("train_time_s", 0.0)}


def compare(cfg: TrainConfig, *, out_dir: str | Path | None = None, reps: int = 20,
            quiet: bool = False, variants: tuple[str, ...] = VARIANTS) -> CompareResult:
    """Train every variant of ``cfg`` (replacing earlier runs in ``out_dir``, default
    ``cfg.out_dir``), measure latency side by side and write the table files (rank 0)."""
    if cfg.method == "none":
        raise ValueError("compare needs a dynamic method in the config (method is 'none')")
    if "static" not in variants:
        raise ValueError("compare needs the 'static' variant: latency is relative to it")
    out = Path(out_dir if out_dir is not None else cfg.out_dir)
    info = init_distributed(cfg.device)  # one process group for all variants (torchrun)
    try:
        return _compare(cfg, out, reps, quiet, variants, info.is_main)
    finally:
        cleanup_distributed(info)


def _compare(cfg: TrainConfig, out: Path, reps: int, quiet: bool, variants: tuple[str, ...],
             main: bool) -> CompareResult:
    from padnet.train.run import train

    runs, cfgs, splits = {}, {}, None
    for variant in variants:
        cfgs[variant] = variant_config(cfg, variant, out)
        if not quiet and main:
            print(f"== {variant}: {cfgs[variant].out_dir}", flush=True)
        runs[variant] = train(cfgs[variant], quiet=quiet, overwrite=True, splits=splits)
        splits = runs[variant].splits
    rows = [_row(v, cfgs[v], runs[v]) for v in variants]
    device = next(runs["static"].model.parameters()).device
    batch_n = cfg.eval_batch_size or 2 * cfg.batch_size
    models = {v: runs[v].model for v in variants}
    for tag, size in (("b1", 1), ("bN", batch_n)):
        inputs = example_inputs(splits, size, device)
        ms = measure_latency(models, inputs, reps=reps)
        for row in rows:
            row[f"latency_ms_{tag}"] = ms[row["variant"]]
            row[f"latency_ratio_{tag}"] = ms[row["variant"]] / ms["static"]
    for row in rows:  # per sample on the eval-size batch, the last one timed
        row["batch_N"] = batch_n
        row["flops"], row["flops_export"] = count_flops(models[row["variant"]], inputs)
    result = CompareResult(rows, out, runs, is_main=main)
    if main:
        write_outputs(result)
    return result


def write_outputs(result: CompareResult) -> None:
    """``compare.csv``, ``compare.md`` and ``compare.png`` (when matplotlib is installed) in
    ``result.out_dir``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in result.rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})
    text, md = buf.getvalue(), result.markdown()
    atomic_write(result.out_dir / "compare.csv", lambda tmp: Path(tmp).write_text(text))
    atomic_write(result.out_dir / "compare.md", lambda tmp: Path(tmp).write_text(md))
    try:
        plot_compare(result.rows, result.out_dir / "compare.png")
    except ImportError:
        print("matplotlib is not installed: compare.png skipped (pip install 'padnet[plots]')")


def plot_compare(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Accuracy against stored parameters, and latency ratios at both batch sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    key = "test_acc" if all(r["test_acc"] is not None for r in rows) else "val_acc"
    for r in rows:
        acc = r[key] if r[key] is not None else float("nan")
        ax1.scatter(r["stored_params"], acc, s=40)
        ax1.annotate(r["variant"], (r["stored_params"], acc), textcoords="offset points",
                     xytext=(5, 5))
    ax1.margins(0.2)
    ax1.set_xlabel("stored parameters")
    ax1.set_ylabel(key.replace("_", " "))
    ax1.set_title("accuracy vs storage")
    x = range(len(rows))
    width = 0.38
    ax2.bar([i - width / 2 for i in x], [r["latency_ratio_b1"] for r in rows], width,
            label="batch 1")
    ax2.bar([i + width / 2 for i in x], [r["latency_ratio_bN"] for r in rows], width,
            label=f"batch {rows[0]['batch_N']}")
    ax2.axhline(1.0, color="grey", linewidth=0.8)
    ax2.set_xticks(list(x), [r["variant"] for r in rows])
    ax2.set_ylabel("latency / static")
    ax2.set_title("latency ratio to static")
    ax2.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
