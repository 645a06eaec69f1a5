"""A resumable experiment suite: one YAML file names a base config, the variants and the seeds;
every run gets its own run directory; finished runs are skipped and interrupted ones resumed.

A suite file::

    name: fmnist_resnet8_cpu          # also the default output directory results/experiments/NAME
    base: ../fmnist_resnet20_pad.yaml # a config file (relative to the suite file), and/or
    config: {epochs: 3, subset: 8000} # config keys applied on top of it
    seeds: [0, 1, 2]
    variants:                          # name -> config keys of that variant
      static: {method: none, imp_mode: none}
      dynamic: {dynamic_ratio: 1.0, imp_mode: none}
      pad_0.3: {dynamic_ratio: 0.3}

Run ``VARIANT-seedS`` writes ``OUT/VARIANT-seedS/`` and, after every run, ``OUT/results.csv``
holds one row per finished run (rebuilt from the runs' ``summary.json``), so the suite can be
stopped at any point and continued later with the same command.
"""

from __future__ import annotations

import csv
import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from padnet.train import checkpoint as ckpt
from padnet.train.config import TrainConfig, load_config
from padnet.utils.io import save_csv

__all__ = ["RESULT_COLUMNS", "SweepRun", "load_suite", "read_results", "run_suite",
           "suite_name"]

RESULT_COLUMNS = ("run", "variant", "seed", "method", "dynamic_ratio", "val_acc", "test_acc",
                  "test_f1", "stored_params", "train_time_s")
_SUITE_KEYS = ("name", "base", "config", "seeds", "variants", "out_dir")


@dataclass
class SweepRun:
    """One run of a suite: its name, variant, seed and config."""

    name: str
    variant: str
    seed: int
    cfg: TrainConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    def status(self) -> str:
        """``done`` (summary.json written), ``resume`` (a checkpoint), ``restart`` (started,
        stopped before its first checkpoint: nothing to continue) or ``new``."""
        if (self.run_dir / "summary.json").is_file():
            return "done"
        if ckpt.find_checkpoint(self.run_dir) is not None:
            return "resume"
        return "restart" if (self.run_dir / "config.yaml").is_file() else "new"


def _read_suite(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"suite file {path} does not exist")
    try:
        suite = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: YAML error: {err}") from None
    if not isinstance(suite, dict):
        raise ValueError(f"{path}: a suite is a mapping with keys {', '.join(_SUITE_KEYS)}")
    unknown = sorted(set(suite) - set(_SUITE_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown suite key(s) {unknown}; valid: {', '.join(_SUITE_KEYS)}")
    variants = suite.get("variants")
    if not isinstance(variants, dict) or not variants or not all(
            isinstance(v, dict) or v is None for v in variants.values()):
        raise ValueError(f"{path}: 'variants' must map names to config keys")
    seeds = suite.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"{path}: 'seeds' must be a non-empty list of ints, got {seeds!r}")
    return suite


def suite_name(path: str | Path) -> str:
    """The suite's ``name`` (default: the file's stem)."""
    return _read_suite(Path(path)).get("name") or Path(path).stem


def load_suite(path: str | Path, overrides: dict[str, Any] | None = None) -> list[SweepRun]:
    """The runs of the suite file ``path`` (variants in file order, then seeds); ``overrides``
    (config keys) apply to every run, after the suite's own keys; an ``out_dir`` among them
    moves the whole suite (each run goes to ``out_dir/RUN``)."""
    path = Path(path)
    suite = _read_suite(path)
    base = suite.get("base")
    base_path = (path.parent / base) if base is not None else None
    name = suite.get("name") or path.stem
    overrides = dict(overrides or {})
    out = Path(overrides.pop("out_dir", None) or suite.get("out_dir")
               or Path("results") / "experiments" / name)
    runs = []
    for variant, keys in suite["variants"].items():
        for seed in suite.get("seeds", [0]):
            run = f"{variant}-seed{seed}"
            merged = {**(suite.get("config") or {}), **(keys or {}), **overrides,
                      "seed": seed, "out_dir": str(out / run)}
            try:
                cfg = load_config(base_path, merged)
            except ValueError as err:
                raise ValueError(f"{path}: variant {variant!r}: {err}") from None
            runs.append(SweepRun(run, str(variant), int(seed), cfg))
    return runs


def _row(run: SweepRun) -> dict[str, Any]:
    summary = json.loads((run.run_dir / "summary.json").read_text())
    final, stats = summary.get("final", {}), summary.get("stats", {})
    return {"run": run.name, "variant": run.variant, "seed": run.seed,
            "method": run.cfg.method, "dynamic_ratio": stats.get("dynamic_ratio"),
            "val_acc": final.get("val_acc"), "test_acc": final.get("test_acc"),
            "test_f1": final.get("test_f1"), "stored_params": stats.get("stored_params"),
            "train_time_s": summary.get("train_time_s")}


def _write_results(runs: list[SweepRun], out: Path) -> list[dict[str, Any]]:
    rows = [_row(r) for r in runs if r.status() == "done"]
    out.mkdir(parents=True, exist_ok=True)
    save_csv(out / "results.csv", rows, RESULT_COLUMNS)
    return rows


def run_suite(
    path: str | Path, *, overrides: dict[str, Any] | None = None, only: str | None = None,
    dry_run: bool = False, quiet: bool = True, log: Any = print,
) -> list[dict[str, Any]]:
    """Run every run of the suite that has not finished (``only``: an fnmatch pattern on the
    run names); returns the rows of ``results.csv``. ``dry_run`` only reports each run's status."""
    from padnet.train.run import train

    runs = load_suite(path, overrides)
    chosen = [r for r in runs if only is None or fnmatch.fnmatchcase(r.name, only)]
    if not chosen:
        raise ValueError(f"no run of {path} matches {only!r}; runs: "
                         f"{', '.join(r.name for r in runs)}")
    out = chosen[0].run_dir.parent
    for i, run in enumerate(chosen, 1):
        status = run.status()
        log(f"[{i}/{len(chosen)}] {run.name}: {status}" + (" (skipped)" if status == "done"
                                                           else ""))
        if dry_run or status == "done":
            continue
        train(run.cfg, resume=status == "resume", overwrite=status == "restart", quiet=quiet)
        _write_results(runs, out)
    rows = _write_results(runs, out) if not dry_run else []
    if not dry_run:
        log(f"{len(rows)} of {len(runs)} runs finished; wrote {out / 'results.csv'}")
    return rows


def read_results(path: str | Path) -> list[dict[str, str]]:
    """The rows of a suite's ``results.csv``."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
