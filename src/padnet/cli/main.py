"""Entry point of the ``padnet`` command: builds the parser from the subcommand modules.

Exit status: 0 success; 2 a problem the user can fix (a bad command line, config, data or file:
a one-line message, no traceback); 1 a failure of the system (disk full, permission denied: a
message saying what was kept); 130 interrupted (Ctrl-C). ``padnet --debug ...`` adds the
traceback to the message. Any other exception is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
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
    sweep_cmd,
    tradeoff_cmd,
    train_cmd,
)
from padnet.cli.options import (
    CommandError,
    CommandParser,
    UsageError,
    normalize_flags,
    os_error_message,
    reject_unknown,
)

COMMANDS = (list_cmd, convert_cmd, train_cmd, eval_cmd, export_cmd, partition_cmd, bench_cmd,
            compare_cmd, sweep_cmd, tradeoff_cmd)
#: errors the user fixes (status 2): bad values, missing or damaged files, missing packages
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, ImportError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="padnet", description="Partially dynamic networks (PAD-Net) in PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"padnet {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also accepted after the command)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=CommandParser)
    for cmd in COMMANDS:
        cmd.add_parser(sub)
    return parser


def _pop_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug`` (anywhere before a bare ``--``) and whether it was there."""
    end = argv.index("--") if "--" in argv else len(argv)
    kept = [t for t in argv[:end] if t != "--debug"]
    return kept + argv[end:], len(kept) < end


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (see the module doc).

    Errors of the top-level command line (no or an unknown subcommand) exit through argparse;
    those of a subcommand, including bad values of config-key flags, print one line.
    """
    parser = build_parser()
    argv, debug = _pop_debug(normalize_flags(sys.argv[1:] if argv is None else argv))
    command = "padnet"

    def report(message: str, status: int) -> int:
        if debug:
            traceback.print_exc()
        print(message, file=sys.stderr)
        return status

    try:
        args, extra = parser.parse_known_args(argv)
        command = f"padnet {args.command}"
        if extra:
            reject_unknown(parser, args, extra)
        return int(args.run(args) or 0)
    except UsageError as err:
        return report(f"{err.prog}: error: {err}", 2)
    except CommandError as err:
        return report(f"{command}: error: {err}", err.status)
    except KeyboardInterrupt as err:
        return report(f"{command}: {err or 'interrupted'}", 130)
    except USER_ERRORS as err:
        return report(f"{command}: error: {err}", 2)
    except OSError as err:
        return report(f"{command}: error: {os_error_message(err)}", 1)


if __name__ == "__main__":
    raise SystemExit(main())
