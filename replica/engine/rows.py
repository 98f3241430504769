"""Which decode row each running sequence holds (its row of the decode graphs' block table):
the scheduler's allocator."""

from __future__ import annotations


class RowPool:
    """The free ones of `rows` numbered decode rows; the lowest-numbered is handed out first."""

    def __init__(self, rows: int) -> None:
        self._free = list(range(rows - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        return self._free.pop()

    def release(self, row: int) -> None:
        self._free.append(row)
