"""Which decode row each running sequence holds (its row of the decode graphs' block table):
the scheduler's allocator."""

from __future__ import annotations


class SlotPool:
    """The free ones of `slots` numbered rows; the lowest-numbered is handed out first."""

    def __init__(self, slots: int) -> None:
        self._free = list(range(slots - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        return self._free.pop()

    def release(self, slot: int) -> None:
        self._free.append(slot)
