"""Where the vendored course data lives: one definition for the load tester, the timing tool
and the tests."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent.parent / "vendor" / "data"
GOLD = DATA / "dev_requests_gold.jsonl"  # request format, joined with the gold answers
DEV_FILES = (GOLD.name, "dev_combined.jsonl")  # the same 300 dev items in both prompt formats
SCHEDULE = DATA / "batch_arrivals.json"
ROUTE_OF_TASK = {"graph": "graph", "mmlu_med": "mcq", "infobench": "open"}  # course -> ours


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per non-blank line."""
    with path.open() as lines:
        return [json.loads(line) for line in lines if line.strip()]


@cache
def dev_rows() -> tuple[dict[str, Any], ...]:
    """All 600 dev rows (300 per format), each tagged with the file it came from."""
    return tuple({**row, "file": name} for name in DEV_FILES for row in read_jsonl(DATA / name))
