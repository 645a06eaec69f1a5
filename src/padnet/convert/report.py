"""The report a converter returns: which modules it replaced, and which it left alone and why."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ConversionEntry:
    """One module a converter looked at."""

    name: str
    before: str
    after: str | None = None
    reason: str = ""


@dataclass
class ConversionReport:
    """What a converter changed in a model.

    ``converted`` lists replaced modules (``before`` -> ``after`` class names), ``skipped`` the
    candidates left as they were with the reason (placement rule, exclude pattern, ...).
    """

    method: str
    converted: list[ConversionEntry] = field(default_factory=list)
    skipped: list[ConversionEntry] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        """Qualified names of the converted modules."""
        return [e.name for e in self.converted]

    def __len__(self) -> int:
        return len(self.converted)

    def __str__(self) -> str:
        lines = [f"{self.method}: converted {len(self.converted)} module(s)"]
        lines += [f"  + {e.name}: {e.before} -> {e.after}" for e in self.converted]
        lines += [f"  - {e.name}: {e.before} left static ({e.reason})" for e in self.skipped]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain-data form (JSON-serialisable)."""
        return {
            "method": self.method,
            "converted": [vars(e).copy() for e in self.converted],
            "skipped": [vars(e).copy() for e in self.skipped],
        }
