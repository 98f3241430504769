"""Runs one load (replay or closed loop) over a shared HTTP session with a progress bar."""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable
from typing import TextIO

import aiohttp
from tqdm import tqdm

from loadtest.client import BatchResult, CompletionClient

Load = Callable[[CompletionClient], Awaitable[list[BatchResult]]]
LOG_INTERVAL_S = 10.0  # progress lines in a log: at most one per this many seconds


class Progress:
    """Answered prompts and HTTP requests as they come in, on stderr.

    On a terminal this is a tqdm bar. In a log (serve_and_load.sh, CI) a bar would write a line
    per update, thousands per run, so there it is one summary line per `interval_s` at most,
    and a last one at close.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        stream: TextIO | None = None,
        interval_s: float = LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = sys.stderr if stream is None else stream
        self._total, self._desc = total, desc
        self._interval_s, self._clock = interval_s, clock
        self._start = self._last_line = clock()
        self._prompts = self._requests = self._failed = 0
        self._bar = (
            tqdm(total=total, desc=desc, unit="prompt", dynamic_ncols=True, file=self._stream)
            if self._stream.isatty()
            else None
        )

    def __call__(self, result: BatchResult) -> None:
        self._requests += 1
        if not result.ok:
            self._failed += 1
        self._prompts += len(result.prompts)
        if self._bar is not None:
            self._bar.set_postfix(requests=self._requests, failed=self._failed, refresh=False)
            self._bar.update(len(result.prompts))
        elif self._clock() - self._last_line >= self._interval_s:
            self._line()

    def _line(self) -> None:
        self._last_line = self._clock()
        of_total = "" if self._total is None else f"/{self._total}"
        print(
            f"{self._desc}: {self._requests} HTTP requests done ({self._failed} failed), "
            f"{self._prompts}{of_total} prompts, {self._last_line - self._start:.0f} s",
            file=self._stream,
            flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self._line()


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
