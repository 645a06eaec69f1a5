"""Every table of docs/RESULTS.md comes from committed results files: the table that follows a
``<!-- table: KIND PATH [key=value ...] -->`` marker must equal what
:func:`padnet.train.evidence.render_table` builds from those files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from padnet.train.evidence import render_table

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "RESULTS.md"
MARKER = re.compile(r"<!-- table: ([^>]+?) -->\n((?:\|.*\n)+)")


def tables() -> list[tuple[str, str]]:
    if not DOC.is_file():
        return []
    return MARKER.findall(DOC.read_text())


def test_results_doc_has_tables() -> None:
    if not DOC.is_file():
        pytest.skip("docs/RESULTS.md is not written yet")
    assert tables(), "docs/RESULTS.md has no marked table"


NONE = [pytest.param("", "", marks=pytest.mark.skip(reason="no marked table"))]


@pytest.mark.parametrize(("spec", "table"), tables() or NONE)
def test_each_table_matches_its_results_files(spec: str, table: str) -> None:
    assert table.strip() == render_table(spec, ROOT).strip()
