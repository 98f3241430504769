"""Runs one load (replay or closed loop) over a shared HTTP session with a progress bar."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import aiohttp
from tqdm import tqdm

from loadtest.client import BatchResult, CompletionClient

Load = Callable[[CompletionClient], Awaitable[list[BatchResult]]]


class Progress:
    """A tqdm bar of answered prompts, with the error count beside it."""

    def __init__(self, total: int | None, desc: str) -> None:
        self._bar = tqdm(total=total, desc=desc, unit="prompt", dynamic_ncols=True)
        self._errors = 0

    def __call__(self, result: BatchResult) -> None:
        if not result.ok:
            self._errors += 1
            self._bar.set_postfix(errors=self._errors, refresh=False)
        self._bar.update(len(result.prompts))

    def close(self) -> None:
        self._bar.close()


async def run_load(
    url: str, load: Load, max_concurrency: int, total_prompts: int | None, desc: str
) -> tuple[list[BatchResult], float]:
    """The batches' results and the wall time. aiohttp's default of 100 connections would
    cap concurrency below the course's 300, so the pool is sized to `max_concurrency`."""
    progress = Progress(total_prompts, desc)
    connector = aiohttp.TCPConnector(limit=max_concurrency)
    start = time.perf_counter()
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            results = await load(CompletionClient(session, url, on_result=progress))
    finally:
        progress.close()
    return results, time.perf_counter() - start
