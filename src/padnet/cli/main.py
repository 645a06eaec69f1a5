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
    export_cmd,
    list_cmd,
    partition_cmd,
    train_cmd,
)
from padnet.cli.options import CommandParser, UsageError, normalize_flags, reject_unknown

COMMANDS = (list_cmd, convert_cmd, train_cmd, eval_cmd, export_cmd, partition_cmd, bench_cmd,
            compare_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="padnet", description="Partially dynamic networks (PAD-Net) in PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"padnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=CommandParser)
    for cmd in COMMANDS:
        cmd.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (user errors print a message, status 2).

    Errors of the top-level command line (no or an unknown subcommand) exit through argparse;
    those of a subcommand, including bad values of config-key flags, print one line.
    """
    parser = build_parser()
    argv = normalize_flags(sys.argv[1:] if argv is None else argv)
    command = "padnet"
    try:
        args, extra = parser.parse_known_args(argv)
        command = f"padnet {args.command}"
        if extra:
            reject_unknown(parser, args, extra)
        return int(args.run(args) or 0)
    except UsageError as err:
        print(f"{err.prog}: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:
        print(f"{command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
