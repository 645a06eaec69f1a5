"""``padnet list``: the registered models and the conversion methods."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list registered models and conversion methods")
    p.add_argument("pattern", nargs="?", default=None, help="fnmatch filter, e.g. 'resnet*'")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from padnet.convert import METHODS
    from padnet.models import list_models

    print("models:")
    for name in list_models(args.pattern):
        print(f"  {name}")
    print("methods: " + ", ".join(METHODS))
    return 0
