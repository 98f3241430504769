"""The vendored dev sets, in both prompt formats, for the shortcuts tests."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[1] / "vendor" / "data"
DEV_FILES = ("dev_requests_gold.jsonl", "dev_combined.jsonl")
ROUTE_OF_TASK = {"graph": "graph", "mmlu_med": "mcq", "infobench": "open"}


@cache
def dev_rows() -> tuple[dict[str, Any], ...]:
    """All 600 dev rows (300 per format), each tagged with the file it came from."""
    rows = []
    for name in DEV_FILES:
        with open(DATA / name) as lines:
            rows += [{**json.loads(line), "file": name} for line in lines if line.strip()]
    return tuple(rows)


def rows_of(task: str) -> list[dict[str, Any]]:
    return [row for row in dev_rows() if row["task"] == task]
