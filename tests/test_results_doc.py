"""Every table of docs/RESULTS.md comes from a committed results file: the table that follows a
``<!-- table: PATH -->`` marker must equal the summary of the CSV at PATH."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from padnet.train.sweep import read_results, summary_table

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "RESULTS.md"
MARKER = re.compile(r"<!-- table: (\S+) -->\n((?:\|.*\n)+)")


def tables() -> list[tuple[str, str]]:
    if not DOC.is_file():
        return []
    return MARKER.findall(DOC.read_text())


def test_results_doc_has_tables() -> None:
    if not DOC.is_file():
        pytest.skip("docs/RESULTS.md is not written yet")
    assert tables(), "docs/RESULTS.md has no marked table"


NONE = [pytest.param("", "", marks=pytest.mark.skip(reason="no marked table"))]


@pytest.mark.parametrize(("source", "table"), tables() or NONE)
def test_each_table_matches_its_results_file(source: str, table: str) -> None:
    assert table.strip() == summary_table(read_results(ROOT / source)).strip()
