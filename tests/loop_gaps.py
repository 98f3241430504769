"""How long an awaited piece of work keeps the event loop from running anything else."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def worst_loop_gap(work: Awaitable[T]) -> tuple[T, float]:
    """Run `work` while a 5 ms ticker notes the longest time the loop could not run it."""
    gaps = [0.0]
    done = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    try:
        return await work, max(gaps)
    finally:
        done.set()
        await ticker
