"""Argument checks shared by every public entry point.

Each check returns the value (converted where that is harmless) or raises ``ValueError`` /
``TypeError`` with a message that names the argument, the value given and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any

__all__ = ["check_callable", "check_choice", "check_int", "check_number", "check_optional",
           "check_ratio"]


def check_int(value: Any, name: str, minimum: int | None = None) -> int:
    """``value`` as an int (bools refused) that is ``>= minimum`` when one is given."""
    if isinstance(value, bool) or not isinstance(value, int):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be an int{bound}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_number(
    value: Any, name: str, *, minimum: float | None = None, strict: bool = False,
    maximum: float | None = None,
) -> float:
    """``value`` as a finite float, ``>= minimum`` (``> minimum`` when ``strict``) and
    ``<= maximum`` where given."""
    ops = ">" if strict else ">="
    allowed = "a number" + (f" {ops} {minimum}" if minimum is not None else "") + (
        f" and <= {maximum}" if maximum is not None else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    number = float(value)
    bad = math.isnan(number) or (minimum is not None and (
        number <= minimum if strict else number < minimum)) or (
        maximum is not None and number > maximum)
    if bad:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return number


def check_ratio(value: Any, name: str = "dynamic_ratio") -> float:
    """``value`` as a float in [0, 1]."""
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if isinstance(value, bool) or not 0.0 <= ratio <= 1.0 or math.isnan(ratio):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return ratio


def check_choice(value: Any, name: str, choices: Collection[str]) -> str:
    """``value`` if it is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_optional(value: Any, check: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """None, or ``check(value, *args, **kwargs)``."""
    return None if value is None else check(value, *args, **kwargs)


def check_callable(value: Any, name: str, signature: str) -> Callable:
    """``value`` if it is callable; ``signature`` describes what is expected."""
    if not callable(value):
        raise TypeError(f"{name} must be callable {signature}, got {value!r}")
    return value
