"""One registry style for every family of named things: models, conversion methods, partition
scores, data sets.

A :class:`Registry` maps names to entries (a builder function, or a small object describing a
method). Entries are added with :meth:`Registry.register`, usable as a decorator; the command
line, config validation and ``padnet list`` all read the same tables.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (``kind`` is used in error messages, e.g. ``'model'``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None, *, replace: bool = False):  # noqa: ANN201
        """Add ``entry`` under ``name``; without ``entry`` return a decorator that adds the
        decorated object. A name registered twice raises ValueError unless ``replace``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")

        def add(obj: T) -> T:
            if name in self._entries and not replace:
                raise ValueError(f"{self.kind} name {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return add if entry is None else add(entry)

    def unregister(self, name: str) -> T:
        """Remove and return the entry ``name``."""
        self.get(name)
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        """The entry ``name``; ValueError listing the registered names otherwise."""
        if not isinstance(name, str) or name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}: {self.kind} must be one of "
                             f"{tuple(self.names())}")
        return self._entries[name]

    def names(self, pattern: str | None = None) -> list[str]:
        """Registered names in registration order, filtered by an fnmatch ``pattern``."""
        names = list(self._entries)
        return names if pattern is None else fnmatch.filter(names, pattern)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def filter(self, keep: Callable[[T], bool]) -> list[str]:
        """Names whose entry satisfies ``keep``."""
        return [n for n, e in self._entries.items() if keep(e)]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
