"""The vendored dev sets, in both prompt formats, for the shortcuts tests."""

from __future__ import annotations

from typing import Any

from shortcuts.data import DATA, DEV_FILES, ROUTE_OF_TASK, dev_rows

__all__ = ["DATA", "DEV_FILES", "ROUTE_OF_TASK", "dev_rows", "rows_of"]


def rows_of(task: str) -> list[dict[str, Any]]:
    return [row for row in dev_rows() if row["task"] == task]
