"""What an experiment suite shows: latency of the exported models, significance tests across
seeds, plots, and the marked tables of ``docs/RESULTS.md``.

A suite (:mod:`padnet.train.sweep`) writes ``OUT/results.csv``. Three steps follow it:

- :func:`measure_suite_latency` times the exported model (:func:`padnet.export`) of one finished
  run per variant beside the static model of the same architecture, on the same random inputs
  with interleaved repetitions, and writes ``OUT/latency.csv`` (``padnet sweep SUITE --latency``);
- :func:`welch_test` / :func:`significance_table` compare every variant with a reference variant
  (Welch's unequal-variance t-test over the seeds, two-sided; Holm's adjustment over the
  table's comparisons decides what counts as significant);
- :func:`plot_suite` draws accuracy against the dynamic ratio (static and fully dynamic drawn as
  levels) and against the stored parameters; :func:`plot_layer_ratios` the per-layer dynamic
  ratios IMP chose in one run; :func:`collect_curves` gathers every run's per-epoch
  ``metrics.csv`` and :func:`plot_curves` draws the learning curves, mean ± std over seeds per
  variant (``padnet sweep SUITE --report DIR``).

``docs/RESULTS.md`` marks each table with ``<!-- table: KIND PATH [key=value ...] -->``;
:func:`render_table` rebuilds the table from the files, and a test checks that the document
equals it, so no number there is typed by hand.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from padnet.train.sweep import load_suite, read_results
from padnet.utils.io import atomic_write, save_csv

__all__ = ["CURVE_COLUMNS", "LATENCY_COLUMNS", "collect_curves", "curve_stats",
           "group_by_variant", "holm_adjust", "measure_suite_latency", "paper_table",
           "plot_curves", "plot_layer_ratios", "plot_suite", "render_table", "significance_table",
           "summary_table", "update_tables", "welch_test"]

LATENCY_COLUMNS = ("variant", "run", "batch", "static_ms", "model_ms", "ratio_to_static",
                   "deployed_params")
CURVE_COLUMNS = ("run", "variant", "seed", "epoch", "step", "lr", "temperature", "dynamic_ratio",
                 "train_loss", "train_acc", "val_loss", "val_acc")


def group_by_variant(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows by variant, variants in order of first appearance."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row["variant"]), []).append(row)
    return groups


def _floats(group: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in group if r.get(key) not in (None, "")]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def _fmt_mean_std(values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean, std = _mean_std(values)
    return f"{mean:.4f}" if len(values) < 2 else f"{mean:.4f} ± {std:.4f}"


# --------------------------------------------------------------------------- significance
def welch_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """``(mean(a) - mean(b), two-sided p)`` of Welch's t-test (unequal variances). Needs two
    values on each side; ``p`` is 1 when both samples are constant and equal, 0 when constant
    and different (scipy, the ``results`` extra)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a t-test needs at least 2 values per side, got {len(a)} and {len(b)}")
    (mean_a, std_a), (mean_b, std_b) = _mean_std(a), _mean_std(b)
    diff = mean_a - mean_b
    if std_a == 0 and std_b == 0:
        return diff, 1.0 if diff == 0 else 0.0
    from scipy import stats

    # from the summary statistics: one sample of equal values (e.g. three seeds with the same
    # accuracy) is a valid input, not a precision problem
    return diff, float(stats.ttest_ind_from_stats(mean_a, std_a, len(a), mean_b, std_b, len(b),
                                                  equal_var=False).pvalue)


def holm_adjust(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``pvalues`` (one family of comparisons), in their order:
    the i-th smallest becomes ``max over j <= i of min(1, (m - j + 1) p_(j))``. Rejecting where
    the adjusted p is below alpha keeps the chance of any false "significant" in the family at
    most alpha."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def significance_table(rows: Sequence[dict[str, Any]], *, reference: str = "dynamic",
                       metric: str = "test_acc", alpha: float = 0.05) -> str:
    """Markdown table: every other variant against ``reference`` on ``metric`` — the difference
    of the means, Welch's two-sided p over the seeds, that p adjusted by Holm's method over the
    table's comparisons (:func:`holm_adjust`: a table of ten ablations is ten tests), and
    whether the adjusted p is below ``alpha``."""
    groups = group_by_variant(rows)
    if reference not in groups:
        raise ValueError(f"reference variant {reference!r} is not in the results; variants: "
                         f"{', '.join(groups)}")
    ref = _floats(groups[reference], metric)
    tests: dict[str, tuple[float, float] | None] = {}
    for name, group in groups.items():
        if name != reference:
            values = _floats(group, metric)
            tests[name] = welch_test(values, ref) if min(len(values), len(ref)) >= 2 else None
    done = [name for name, t in tests.items() if t is not None]
    holm = dict(zip(done, holm_adjust([tests[n][1] for n in done]), strict=True))
    lines = [f"| variant | {metric} − {reference} | Welch p | Holm p | at {alpha:g} (Holm) |",
             "|---|---:|---:|---:|---|"]
    for name, test in tests.items():
        if test is None:
            lines.append(f"| {name} | | | | too few seeds |")
            continue
        diff, p = test
        verdict = ("no difference shown" if holm[name] >= alpha else
                   "higher" if diff > 0 else "lower")
        lines.append(f"| {name} | {diff:+.4f} | {p:.3f} | {holm[name]:.3f} | {verdict} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- tables
def summary_table(rows: Sequence[dict[str, Any]],
                  latency: Sequence[dict[str, Any]] | None = None) -> str:
    """Markdown table, one line per variant: runs, dynamic ratio, stored parameters (training
    form), validation and test accuracy as mean ± sample std over the seeds; with ``latency``
    rows also the exported model's stored parameters and its latency ratio to static per batch
    size."""
    batches = sorted({int(r["batch"]) for r in latency}) if latency else []
    lat = {(str(r["variant"]), int(r["batch"])): r for r in latency or ()}
    head = "| variant | runs | dynamic ratio | stored params | val acc | test acc |"
    rule = "|---|---:|---:|---:|---:|---:|"
    if batches:
        head += " exported params |" + "".join(f" latency ×static b={b} |" for b in batches)
        rule += "---:|" * (1 + len(batches))
    lines = [head, rule]
    for name, group in group_by_variant(rows).items():
        ratio, params = _floats(group, "dynamic_ratio"), _floats(group, "stored_params")
        if not (ratio and params):
            lines.append(f"| {name} | {len(group)} | | | | |" + " |" * (
                1 + len(batches) if batches else 0))
            continue
        line = (f"| {name} | {len(group)} | {ratio[0]:.3f} | {int(params[0]):,} | "
                f"{_fmt_mean_std(_floats(group, 'val_acc'))} | "
                f"{_fmt_mean_std(_floats(group, 'test_acc'))} |")
        if batches:
            first = lat.get((name, batches[0]))
            line += f" {int(float(first['deployed_params'])):,} |" if first else " |"
            for b in batches:
                r = lat.get((name, b))
                line += f" {float(r['ratio_to_static']):.2f} |" if r else " |"
        lines.append(line)
    return "\n".join(lines)


def render_table(spec: str, root: str | Path = ".") -> str:
    """The table a ``docs/RESULTS.md`` marker names. ``spec`` is one of ``PATH`` or
    ``summary PATH [latency=PATH]``; ``significance PATH [reference=VARIANT] [metric=COLUMN]
    [from=PATH]`` (``from``: take the reference variant's rows from another results file, e.g.
    an ablation suite against the main suite's PAD runs); ``paper CLAIMS_PATH``
    (:func:`paper_table`). Paths are relative to ``root``."""
    words = spec.split()
    kind = "summary" if len(words) == 1 else words.pop(0)
    if not words:
        raise ValueError(f"table marker {spec!r} names no results file")
    path, options = words[0], dict(w.split("=", 1) for w in words[1:] if "=" in w)
    rows = read_results(Path(root) / path)
    if kind == "summary":
        latency = options.get("latency")
        return summary_table(rows, read_results(Path(root) / latency) if latency else None)
    if kind == "paper":
        return paper_table(rows, root)
    if kind == "significance":
        reference = options.get("reference", "dynamic")
        if "from" in options:
            rows = [r for r in read_results(Path(root) / options["from"])
                    if r["variant"] == reference] + rows
        return significance_table(rows, reference=reference,
                                  metric=options.get("metric", "test_acc"))
    raise ValueError(f"table marker {spec!r}: unknown kind {kind!r}; valid: summary, "
                     "significance, paper")


def paper_table(claims: Sequence[dict[str, Any]], root: str | Path = ".") -> str:
    """Markdown table placing each claim of the paper (a row of a claims file: ``setting``,
    ``paper_setting``, ``kappa``, ``paper_gain`` in points, ``results`` file, ``variant``,
    ``reference``) beside our measured gain of ``variant`` over ``reference`` (difference of the
    mean test accuracies in points, Welch p over the seeds)."""
    lines = ["| our setting | κ | ours: PAD − fully dynamic (points) | Welch p | seeds | "
             "paper setting | paper: PAD − fully dynamic (points) |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for claim in claims:
        ours, p, seeds = "not run yet", "", ""
        path = Path(root) / claim["results"]
        if path.is_file():
            groups = group_by_variant(read_results(path))
            a = _floats(groups.get(claim["variant"], []), "test_acc")
            b = _floats(groups.get(claim["reference"], []), "test_acc")
            if len(a) >= 2 and len(b) >= 2:
                diff, pval = welch_test(a, b)
                ours, p, seeds = f"{100 * diff:+.2f}", f"{pval:.3f}", f"{len(a)} / {len(b)}"
        lines.append(f"| {claim['setting']} | {float(claim['kappa']):g} | {ours} | {p} | "
                     f"{seeds} | {claim['paper_setting']} | {float(claim['paper_gain']):+.1f} |")
    return "\n".join(lines)


_MARKED = re.compile(r"(<!-- table: ([^>]+?) -->\n)((?:\|.*\n)+|TABLE\n)")


def update_tables(document: str | Path, root: str | Path = ".") -> int:
    """Rewrite every marked table of ``document`` (the table after each ``<!-- table: ... -->``
    marker, or a ``TABLE`` placeholder line) from its results files; returns how many."""
    document = Path(document)
    text = document.read_text()
    count = 0

    def fill(match: re.Match) -> str:
        nonlocal count
        count += 1
        return match.group(1) + render_table(match.group(2), root) + "\n"

    new = _MARKED.sub(fill, text)
    atomic_write(document, lambda tmp: Path(tmp).write_text(new))
    return count


# --------------------------------------------------------------------------- latency
def _deployed_params(model: Any) -> int:
    """Stored values of a deployed model: the tensors of its state dict (what ``padnet.save``
    writes; kernels derived at load time are not stored), bitmasks counted as bytes / 4, the
    float32 values they stand beside."""
    total = 0
    for t in model.state_dict().values():
        total += t.numel() if t.is_floating_point() else -(-t.numel() * t.element_size() // 4)
    return total


_REFERENCE = "(static reference)"  # the key of the static model among the variants timed


def _architecture(cfg: Any, info: dict[str, Any]) -> tuple:
    """What decides the static model a run is compared with."""
    return (cfg.model, cfg.width, cfg.width_mult, cfg.image_size, cfg.max_length,
            info["num_classes"], info.get("in_chans"), cfg.pretrained)


def measure_suite_latency(path: str | Path, *, batch_sizes: Sequence[int] = (1, 32),
                          reps: int = 20, overrides: dict[str, Any] | None = None,
                          log: Any = print) -> list[dict[str, Any]]:
    """Time the exported model of the first finished run of each variant beside the static
    model of its architecture and write ``OUT/latency.csv``: all variants of one architecture and
    the static model in one measurement (same inputs, repetitions interleaved across all of
    them, medians), so that a change of machine load falls on every model alike. A static
    variant is timed like the others, so its ratio shows the noise floor. ``overrides`` are the
    config keys given to the sweep: ``out_dir`` finds a moved suite, ``threads`` replaces the
    runs' own thread count (which :func:`~padnet.train.build.load_run` sets otherwise)."""
    import torch

    import padnet
    from padnet.bench import measure_latency
    from padnet.train.build import build_model, load_run, random_inputs

    runs = load_suite(path, overrides)
    threads = {"threads": overrides["threads"]} if overrides and "threads" in overrides else {}
    out = runs[0].run_dir.parent
    groups: dict[tuple, dict[str, Any]] = {}
    for run in runs:
        if run.status() != "done" or any(run.variant in g["models"] for g in groups.values()):
            continue
        loaded = load_run(run.run_dir, with_data=False, overrides=threads)
        cfg, info = loaded.cfg, loaded.info
        group = groups.get(_architecture(cfg, info))
        if group is None:
            torch.manual_seed(0)
            static = build_model(cfg.replace(method="none", imp_mode="none"),
                                 num_classes=info["num_classes"], in_chans=info.get("in_chans"),
                                 pretrained=False).eval()
            group = groups[_architecture(cfg, info)] = {"cfg": cfg, "info": info,
                                                        "static": static, "models": {},
                                                        "runs": {}}
        group["models"][run.variant] = (loaded.model if cfg.method == "none"
                                        else padnet.export(loaded.model))
        group["runs"][run.variant] = run.name
    rows: list[dict[str, Any]] = []
    for group in groups.values():
        for batch in batch_sizes:
            x = random_inputs(group["cfg"], group["static"], group["info"], batch)
            ms = measure_latency({_REFERENCE: group["static"], **group["models"]}, x, reps=reps)
            base = ms[_REFERENCE]
            for variant, model in group["models"].items():
                rows.append({"variant": variant, "run": group["runs"][variant], "batch": batch,
                             "static_ms": round(base, 4), "model_ms": round(ms[variant], 4),
                             "ratio_to_static": round(ms[variant] / base, 4),
                             "deployed_params": _deployed_params(model)})
                log(f"{group['runs'][variant]} batch {batch}: {ms[variant] / base:.2f}x static")
    rows.sort(key=lambda r: ([r2.variant for r2 in runs].index(r["variant"]), r["batch"]))
    save_csv(out / "latency.csv", rows, LATENCY_COLUMNS)
    return rows


# --------------------------------------------------------------------------- plots
def _metric(rows: Sequence[dict[str, Any]]) -> str:
    """``test_acc``, or ``val_acc`` for data without a test split."""
    return "test_acc" if any(r.get("test_acc") not in (None, "") for r in rows) else "val_acc"


def _kappa_groups(rows: Sequence[dict[str, Any]], metric: str) -> tuple[dict, list, list]:
    """``(pad, static, dynamic)``: PAD accuracies by dynamic ratio, and the accuracies of the
    two reference groups (empty when absent)."""
    pad: dict[float, list[float]] = {}
    static: list[float] = []
    dynamic: list[float] = []
    for row in rows:
        if row.get(metric) in (None, "") or row.get("dynamic_ratio") in (None, ""):
            continue
        ratio, acc = float(row["dynamic_ratio"]), float(row[metric])
        if row["method"] == "none":
            static.append(acc)
        elif ratio >= 0.999:
            dynamic.append(acc)
        else:
            pad.setdefault(round(ratio, 2), []).append(acc)
    return pad, static, dynamic


def plot_suite(rows: Sequence[dict[str, Any]], out: str | Path, *, title: str = "") -> list[Path]:
    """Two figures next to ``out`` (a path prefix): ``OUT_kappa.png``, test accuracy (mean ±
    std over seeds; validation accuracy for data without a test split) against the dynamic
    ratio κ with the static and fully dynamic levels as lines and bands; ``OUT_params.png``,
    the same accuracy against stored parameters per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metric = _metric(rows)
    label = metric.replace("_acc", " accuracy").replace("val", "validation")
    pad, static, dynamic = _kappa_groups(rows, metric)
    written = []

    moe = any(r.get("method") == "moe" for r in rows)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for accs, colour, name in ((static, "tab:grey", "dense" if moe else "static"),
                               (dynamic, "tab:blue", "fully dynamic (MoE)" if moe
                                else "fully dynamic")):
        if accs:
            mean, std = _mean_std(accs)
            ax.axhline(mean, color=colour, label=f"{name} ({len(accs)} seeds)")
            ax.axhspan(mean - std, mean + std, color=colour, alpha=0.15)
    if pad:
        ks = sorted(pad)
        stats = [_mean_std(pad[k]) for k in ks]
        ax.errorbar(ks, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                    color="tab:red", capsize=3, label="PAD (IMP)")
    ax.set_xlabel("dynamic ratio κ")
    written.append(_finish(fig, ax, label, title or "accuracy against κ",
                           out.with_name(out.name + "_kappa.png"), legend_size=8))

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    groups = group_by_variant(rows)
    for (name, group), colour in zip(groups.items(), _series_colors(len(groups)), strict=True):
        params, accs = _floats(group, "stored_params"), _floats(group, metric)
        if params and accs:
            mean, std = _mean_std(accs)
            ax.errorbar([params[0]], [mean], yerr=[std], marker="o", capsize=3, label=name,
                        color=colour)
    ax.set_xscale("log")
    ax.set_xlabel("stored parameters (training form)")
    written.append(_finish(fig, ax, label, title or "accuracy against size",
                           out.with_name(out.name + "_params.png"), legend_size=7))
    return written


def _series_colors(n: int) -> list[Any]:
    """``n`` distinct colours for the series of one figure: matplotlib's default cycle (ten
    colours) while it suffices, tab20's twenty beyond that instead of repeating a colour."""
    import matplotlib.pyplot as plt

    palette = plt.get_cmap("tab20").colors if n > 10 else [f"C{i}" for i in range(10)]
    return [palette[i % len(palette)] for i in range(n)]


def _finish(fig: Any, ax: Any, ylabel: str, title: str, path: Path, *,
            legend_size: int) -> Path:
    """Label, legend and write one figure (atomically); returns its path."""
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    _save_figure(fig, path)
    return path


def _save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def plot_layer_ratios(run_dirs: Sequence[str | Path], path: str | Path) -> Path:
    """Bar chart of the per-layer dynamic ratios IMP chose, one group of bars per run directory
    (read from the runs' ``summary.json``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers: list[str] = []
    series: dict[str, dict[str, float]] = {}
    for run_dir in run_dirs:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
        imp = summary.get("imp") or {}
        if not imp.get("layers"):
            raise ValueError(f"{run_dir} has no IMP record (was it a PAD run?)")
        ratios = {layer["name"]: layer["dynamic_ratio"] for layer in imp["layers"]}
        layers += [n for n in ratios if n not in layers]
        series[Path(run_dir).name] = ratios
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(layers) + 2) + 2.0, 3.8))
    width = 0.8 / len(series)
    colours = _series_colors(len(series))
    for i, ((name, ratios), colour) in enumerate(zip(series.items(), colours, strict=True)):
        xs = [j + i * width for j in range(len(layers))]
        ax.bar(xs, [ratios.get(n, 0.0) for n in layers], width=width, label=name, color=colour)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))])
    ax.set_xticklabels(layers, rotation=70, fontsize=7, ha="right")
    ax.set_ylabel("dynamic ratio")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside, not over, bars
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_figure(fig, path)
    return path


# --------------------------------------------------------------------------- learning curves
def collect_curves(runs: Sequence[Any]) -> list[dict[str, Any]]:
    """The per-epoch rows (:data:`CURVE_COLUMNS`) of every finished run of a suite
    (:class:`padnet.train.sweep.SweepRun`), read from the runs' ``metrics.csv``."""
    rows = []
    for run in runs:
        metrics = run.run_dir / "metrics.csv"
        if run.status() != "done" or not metrics.is_file():
            continue
        rows += [{"run": run.name, "variant": run.variant, "seed": run.seed,
                  **{k: epoch_row.get(k, "") for k in CURVE_COLUMNS[3:]}}
                 for epoch_row in read_results(metrics)]
    return rows


def curve_stats(rows: Sequence[dict[str, Any]], metric: str
                ) -> dict[str, list[tuple[float, float, float, int]]]:
    """Per variant, ``(epoch, mean, std, n)`` of ``metric`` over the seeds at each epoch (std 0
    for one seed); epochs without a value are left out."""
    by_epoch: dict[str, dict[float, list[float]]] = {}
    for row in rows:
        if row.get(metric) in (None, ""):
            continue
        by_epoch.setdefault(str(row["variant"]), {}).setdefault(
            float(row["epoch"]), []).append(float(row[metric]))
    return {variant: [(epoch, *_mean_std(values), len(values))
                      for epoch, values in sorted(epochs.items())]
            for variant, epochs in by_epoch.items()}


def plot_curves(rows: Sequence[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Learning curves: training loss and validation accuracy against the epoch, one line per
    variant (mean over seeds, ± std as a band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, label in ((axes[0], "train_loss", "training loss"),
                              (axes[1], "val_acc", "validation accuracy")):
        curves = curve_stats(rows, metric)
        for (variant, points), colour in zip(curves.items(), _series_colors(len(curves)),
                                             strict=True):
            epochs = [p[0] for p in points]
            ax.plot(epochs, [p[1] for p in points], marker=".", label=variant, color=colour)
            ax.fill_between(epochs, [p[1] - p[2] for p in points],
                            [p[1] + p[2] for p in points], color=colour, alpha=0.15)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
    axes[1].legend(fontsize=7)
    fig.suptitle(title or "learning curves (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_figure(fig, path)
    return path
