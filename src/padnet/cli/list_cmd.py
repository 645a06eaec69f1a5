"""``padnet list``: the registered models, conversion methods, data sets and shipped configs."""

from __future__ import annotations

import argparse
import fnmatch
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list models, conversion methods, data sets and configs")
    p.add_argument("pattern", nargs="?", default=None, help="fnmatch filter, e.g. 'resnet*'")
    p.set_defaults(run=run)


def config_files() -> list[Path]:
    """YAML configs in ``./configs`` and in the source checkout's ``configs/``."""
    import padnet

    dirs = [Path("configs"), Path(padnet.__file__).resolve().parents[2] / "configs"]
    found: dict[str, Path] = {}
    for d in dirs:
        if d.is_dir():
            for f in sorted(d.glob("*.yaml")):
                found.setdefault(f.name, f)
    return [found[k] for k in sorted(found)]


def run(args: argparse.Namespace) -> int:
    from padnet.convert import METHODS
    from padnet.data import list_datasets
    from padnet.models import list_models

    def keep(names: list[str]) -> list[str]:
        return names if args.pattern is None else fnmatch.filter(names, args.pattern)

    print("models:")
    for name in list_models(args.pattern):
        print(f"  {name}")
    print("methods: " + ", ".join(METHODS))
    datasets = keep(list_datasets())
    if datasets:
        print("data sets: " + ", ".join(datasets))
    configs = [f for f in config_files() if f.stem in keep([c.stem for c in config_files()])]
    if configs:
        print("configs:")
        for f in configs:
            print(f"  {f}")
    return 0
