"""Results of Iterative Mode Partition: the per-layer dynamic-ratio report and a bar chart.

:class:`PartitionResult` is what :func:`padnet.partition.partition` and
:meth:`IterativePartition.step` return; :func:`layer_ratio_report` builds the per-layer table
from a result or straight from a model's masks; :func:`plot_ratios` draws it (matplotlib, the
``plots`` extra, imported only when called).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from padnet.layers.protocol import find_pad_weights

__all__ = ["PartitionResult", "RatioReport", "layer_ratio_report", "plot_ratios"]


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]], total: tuple[str, ...]) -> str:
    allrows = [head, *rows, total]
    widths = [max(len(r[i]) for r in allrows) for i in range(len(head))]
    fmt = [f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths)]
    lines = ["  ".join(f.format(c) for f, c in zip(fmt, r, strict=True)) for r in allrows]
    rule = "-" * len(lines[0])
    return "\n".join([lines[0], rule, *lines[1:-1], rule, lines[-1]])


@dataclass
class RatioReport:
    """Per-layer dynamic ratios: names, positions ``numel`` and dynamic positions."""

    layers: list[str] = field(default_factory=list)
    numel: list[int] = field(default_factory=list)
    num_dynamic: list[int] = field(default_factory=list)

    @property
    def dynamic_ratios(self) -> list[float]:
        return [d / n if n else 0.0 for d, n in zip(self.num_dynamic, self.numel, strict=True)]

    @property
    def total_ratio(self) -> float:
        """Dynamic positions over all positions of all PAD weights."""
        n = sum(self.numel)
        return sum(self.num_dynamic) / n if n else 0.0

    def to_dict(self) -> dict:
        return {"layers": [{"name": a, "numel": n, "num_dynamic": d, "dynamic_ratio": r}
                           for a, n, d, r in zip(self.layers, self.numel, self.num_dynamic,
                                                 self.dynamic_ratios, strict=True)],
                "total_ratio": self.total_ratio}

    def __str__(self) -> str:
        rows = [(a, f"{n:,}", f"{d:,}", f"{r:.3f}") for a, n, d, r in
                zip(self.layers, self.numel, self.num_dynamic, self.dynamic_ratios, strict=True)]
        total = ("total", f"{sum(self.numel):,}", f"{sum(self.num_dynamic):,}",
                 f"{self.total_ratio:.3f}")
        return _table(("layer", "positions", "dynamic", "ratio"), rows, total)


@dataclass
class PartitionResult(RatioReport):
    """State of a partition after its latest iteration.

    Per layer (module order): ``layers``, ``numel``, ``num_dynamic`` and ``score_summary``
    (min / mean / max of the scores that were ranked in the latest iteration: per position, or
    per channel for ``granularity='channel'``). Per iteration run so far: ``kappas`` (target
    kappa_t), ``flipped_to_dynamic`` (positions static before and dynamic after: IMP re-scores
    everything, so flips back happen), ``flipped_to_static`` and ``seconds`` (wall time).
    """

    iterations: int = 1
    scope: str = "global"
    granularity: str = "element"
    score: str = "taylor"
    kappas: list[float] = field(default_factory=list)
    flipped_to_dynamic: list[int] = field(default_factory=list)
    flipped_to_static: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    score_summary: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def iteration(self) -> int:
        """Number of iterations run so far."""
        return len(self.kappas)

    @property
    def done(self) -> bool:
        return self.iteration >= self.iterations

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.update(iteration=self.iteration, iterations=self.iterations, scope=self.scope,
                 granularity=self.granularity, score=self.score, kappas=list(self.kappas),
                 flipped_to_dynamic=list(self.flipped_to_dynamic),
                 flipped_to_static=list(self.flipped_to_static), seconds=list(self.seconds))
        for row in d["layers"]:
            row["score"] = dict(self.score_summary.get(row["name"], {}))
        return d

    def __str__(self) -> str:
        kappa = self.kappas[-1] if self.kappas else 1.0
        head = (f"IMP iteration {self.iteration}/{self.iterations}: kappa_t={kappa:.4f}, "
                f"scope={self.scope}, granularity={self.granularity}, score={self.score}, "
                f"flips to dynamic={self.flipped_to_dynamic[-1] if self.kappas else 0}")
        rows = []
        for a, n, d, r in zip(self.layers, self.numel, self.num_dynamic, self.dynamic_ratios,
                              strict=True):
            s = self.score_summary.get(a, {})
            rows.append((a, f"{n:,}", f"{d:,}", f"{r:.3f}",
                         *(f"{s[k]:.3g}" if k in s else "" for k in ("min", "mean", "max"))))
        total = ("total", f"{sum(self.numel):,}", f"{sum(self.num_dynamic):,}",
                 f"{self.total_ratio:.3f}", "", "", "")
        head_row = ("layer", "positions", "dynamic", "ratio", "score min", "mean", "max")
        return head + "\n" + _table(head_row, rows, total)


def layer_ratio_report(result_or_model: RatioReport | nn.Module) -> RatioReport:
    """Per-layer dynamic ratios of a :class:`PartitionResult` (returned as is) or of a model's
    current masks (every PAD weight, module order). ``print()`` it for a table."""
    if isinstance(result_or_model, RatioReport):
        return result_or_model
    if not isinstance(result_or_model, nn.Module):
        raise TypeError("layer_ratio_report expects a PartitionResult or an nn.Module, got "
                        f"{type(result_or_model).__name__}")
    report = RatioReport()
    for w in find_pad_weights(result_or_model):
        report.layers.append(w.name)
        report.numel.append(w.mode_mask.numel)
        report.num_dynamic.append(w.mode_mask.num_dynamic)
    return report


def plot_ratios(
    result_or_model: RatioReport | nn.Module, path: str | Path, *, title: str | None = None
) -> Path:
    """Save a bar chart of the per-layer dynamic ratios (dashed line: the total ratio) to
    ``path`` (format from the suffix, e.g. ``.png``/``.svg``); returns the path.

    Needs matplotlib (``pip install 'padnet[plots]'``); raises ImportError saying so otherwise.
    """
    report = layer_ratio_report(result_or_model)
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plot_ratios needs matplotlib: pip install 'padnet[plots]'") from err
    path = Path(path)
    n = len(report.layers)
    fig = Figure(figsize=(max(4.0, 0.35 * n + 2.0), 3.5))
    ax = fig.add_subplot()
    ax.bar(range(n), report.dynamic_ratios, color="tab:blue")
    ax.axhline(report.total_ratio, color="tab:red", linestyle="--",
               label=f"total {report.total_ratio:.3f}")
    ax.set_xticks(range(n))
    ax.set_xticklabels(report.layers, rotation=90, fontsize=7)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("dynamic ratio")
    ax.set_title(title or "Dynamic ratio per PAD weight")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path
