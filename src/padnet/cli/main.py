"""Entry point of the ``padnet`` command: builds the parser from the subcommand modules."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from padnet import __version__
from padnet.cli import (
    bench_cmd,
    compare_cmd,
    convert_cmd,
    eval_cmd,
    list_cmd,
    partition_cmd,
    train_cmd,
)

COMMANDS = (list_cmd, convert_cmd, train_cmd, eval_cmd, partition_cmd, bench_cmd, compare_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="padnet", description="Partially dynamic networks (PAD-Net) in PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"padnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        cmd.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (user errors print a message, status 2)."""
    parser = build_parser()
    # Subcommands that take config keys as ``--key value`` flags set ``overrides_allowed``; the
    # tokens argparse does not know are handed to them as ``args.overrides``.
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "overrides_allowed", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"padnet {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
