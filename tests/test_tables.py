"""Every kernel table entry cites where it was measured: a docs/PERF.md section that exists and
JSON under docs/perf/ that exists (a citation that outlives its numbers would send a reader to
nothing)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from replica.ops import tables

ROOT = Path(__file__).resolve().parent.parent
HEADINGS = [
    line for line in (ROOT / "docs" / "PERF.md").read_text().splitlines() if line[:1] == "#"
]
TABLES = [value for value in vars(tables).values() if isinstance(value, tables.Table)]


def citations() -> list[tuple[str, str]]:
    return sorted({(table.name, entry.measured) for table in TABLES for entry in table.entries})


def test_the_tables_are_found():
    names = {table.name for table in TABLES}
    assert len(TABLES) >= 8 and "q/k norms + RoPE + KV write" in names


@pytest.mark.parametrize(("table", "measured"), citations())
def test_each_entry_cites_a_perf_section_and_its_json(table, measured):
    sections = re.findall(r"'([^']+)'", measured)
    assert sections, f"{table}: {measured!r} names no PERF.md section"
    for section in sections:
        assert any(section in heading for heading in HEADINGS), f"{table}: no section {section!r}"
    paths = re.findall(r"docs/perf/\S+?\.json", measured)
    assert paths, f"{table}: {measured!r} names no JSON"
    for path in paths:
        assert (ROOT / path).exists(), f"{table}: {path} does not exist"
