"""Conversion of YAML values and command-line strings to the type hints of config fields.

``none``/``null`` give None where a hint allows it; lists are written ``0,2,4``; booleans accept
``true/false``, ``yes/no``, ``on/off`` and ``1/0``. Errors are ValueErrors naming the key, the
value and the expected type.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Sequence
from typing import Any

__all__ = ["coerce", "optional_inner", "type_name"]


def optional_inner(tp: Any) -> tuple[Any, bool]:
    """``(inner type, allows None)`` of a type hint such as ``int | None``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (a YAML value or a command-line string) to the type hint ``tp``."""
    inner, nullable = optional_inner(tp)
    is_null_word = isinstance(value, str) and value.strip().lower() in ("none", "null")
    if value is None or (is_null_word and (nullable or inner is not str)):
        if nullable:
            return None
        raise ValueError(f"{key} must not be empty (expects {type_name(inner)})")
    try:
        return _convert(value, inner)
    except (TypeError, ValueError):
        raise ValueError(f"{key} expects {type_name(tp)}, got {value!r}") from None


def _convert(value: Any, tp: Any) -> Any:
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        if not isinstance(value, Sequence):
            raise TypeError("not a list")
        return [_convert(v, item) for v in value]
    if tp is bool:
        return _boolean(value)
    if isinstance(value, bool):
        raise TypeError("a boolean where a number or string is expected")
    if tp is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("not an integer")
        return int(value) if not isinstance(value, str) else int(value.strip())
    if tp is float:
        result = float(value)
        if math.isnan(result):
            raise ValueError("nan")
        return result
    if tp is str:
        if not isinstance(value, str | int | float):
            raise TypeError("not a string")
        return str(value)
    raise TypeError(f"unsupported type {tp}")


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    word = value.strip().lower() if isinstance(value, str) else None
    if word in ("true", "yes", "1", "on"):
        return True
    if word in ("false", "no", "0", "off"):
        return False
    raise ValueError("not a boolean")


def type_name(tp: Any) -> str:
    """``'an integer or none'``, ``'a comma-separated list'``, ... for error and help texts."""
    inner, nullable = optional_inner(tp)
    name = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        inner, "a comma-separated list" if typing.get_origin(inner) is list else str(inner))
    return name + (" or none" if nullable else "")
