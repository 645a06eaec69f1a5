"""Config keys as command-line flags: one argparse argument per key of
:class:`~padnet.train.config.TrainConfig`, generated from its fields.

Each key ``some_key`` becomes ``--some-key VALUE``; the value is converted with the config's
coercion (``none``, ``0,2,4`` for lists, ``true``/``false``) and string keys list their allowed
values. Flags have no argparse default, so only the flags given override the YAML config; the
help text shows the config's default. Booleans may be given bare (``--pretrained``).
"""

from __future__ import annotations

import argparse
import errno
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn

__all__ = ["CommandError", "CommandParser", "UsageError", "add_config_arguments", "batch_sizes",
           "config_overrides", "normalize_flags", "os_error_message", "reject_unknown"]


class CommandError(Exception):
    """A failure a subcommand has explained: ``padnet`` prints the message (no traceback) and
    exits with ``status``."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class UsageError(Exception):
    """A command line a subcommand cannot parse (bad flag value, missing argument)."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class CommandParser(argparse.ArgumentParser):
    """The parser of a subcommand: errors raise :class:`UsageError` (``padnet`` prints them as
    one line and exits with status 2) instead of printing the usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog, message)


def _flag_type(key: str, hint: Any, choices: Sequence[str] | None) -> Callable[[str], Any]:
    from padnet.train.coerce import coerce
    from padnet.utils.checks import check_choice

    def convert(text: str) -> Any:
        try:
            value = coerce(key, text, hint)
            return check_choice(value, key, choices) if choices is not None else value
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return str(value)


def _metavar(hint: Any) -> str:
    import typing

    from padnet.train.coerce import optional_inner

    inner, _ = optional_inner(hint)
    if typing.get_origin(inner) is list:
        return "A,B,..."
    return {int: "INT", float: "NUM", bool: "BOOL"}.get(inner, "TEXT")


def add_config_arguments(
    parser: argparse.ArgumentParser, keys: Iterable[str] | None = None, *,
    defaults: Mapping[str, Any] | None = None,
    title: str = "config keys (override the YAML config)",
) -> None:
    """Add ``--key`` flags for config ``keys`` (all keys when None) in an argument group.

    ``defaults`` replaces the config defaults shown in the help (for a command with its own
    base values). The keys (of every call on ``parser``) are recorded as ``config_keys`` in the
    parsed namespace; read the given flags with :func:`config_overrides`.
    """
    from padnet.train.config import TrainConfig, config_choices

    table, choices = TrainConfig.key_table(), config_choices()
    keys = list(table) if keys is None else list(keys)
    group = parser.add_argument_group(title)
    for name in keys:
        key = table[name]
        default = (defaults or {}).get(name, key.default)
        allowed = choices.get(name)
        text = f"{key.help}; " if key.help else ""
        kwargs: dict[str, Any] = {
            "dest": name, "default": argparse.SUPPRESS,
            "type": _flag_type(name, key.hint, allowed),
            "help": f"{text}default {_shown(default)}".replace("%", "%%")}
        if allowed is not None:
            kwargs["choices"] = allowed
        else:
            kwargs["metavar"] = _metavar(key.hint)
        if key.hint is bool:
            kwargs.update(nargs="?", const=True)
        group.add_argument("--" + name.replace("_", "-"), **kwargs)
    parser.set_defaults(config_keys=(*(parser.get_default("config_keys") or ()), *keys))


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``{key: value}`` of the config flags given on the command line."""
    return {k: getattr(args, k) for k in getattr(args, "config_keys", ()) if hasattr(args, k)}


def reject_unknown(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   extra: Sequence[str]) -> None:
    """Report arguments no parser knew: for a command taking config keys an unknown ``--flag``
    is an unknown config key (ValueError listing the valid ones); otherwise argparse's error."""
    keys = getattr(args, "config_keys", None)
    flags = [t for t in extra if t.startswith("--") and t != "--"]
    if keys is not None and flags:
        name = flags[0][2:].partition("=")[0]
        raise ValueError(f"unknown config key {name!r}; valid keys: {', '.join(keys)}")
    parser.error(f"unrecognized arguments: {' '.join(extra)}")


def normalize_flags(argv: Sequence[str]) -> list[str]:
    """``--dynamic_ratio=0.3`` -> ``--dynamic-ratio=0.3``: underscores in flag names are dashes
    (values, and everything after a bare ``--``, are left alone)."""
    out: list[str] = []
    for i, token in enumerate(argv):
        if token == "--":
            return out + list(argv[i:])
        if token.startswith("--"):
            name, eq, value = token.partition("=")
            token = name.replace("_", "-") + eq + value
        out.append(token)
    return out


def batch_sizes(text: str, flag: str = "--batch-sizes") -> list[int]:
    """``'1,32'`` -> ``[1, 32]``: comma-separated batch sizes, each an int >= 1."""
    from padnet.utils.checks import check_int

    try:
        sizes = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated ints, got {text!r}") from None
    if not sizes:
        raise ValueError(f"{flag} must name at least one batch size")
    return [check_int(s, flag, 1) for s in sizes]


def os_error_message(err: OSError) -> str:
    """An OSError as a sentence: what failed, on which file, and what to do."""
    text = err.strerror or str(err)
    if err.filename:
        text += f": {err.filename}"
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        text += (" (free some space or write elsewhere; the files written before are intact: "
                 "a file is only replaced by a complete new version)")
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        text += " (choose a directory you can write to)"
    return text
