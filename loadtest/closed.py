"""Closed loop: C clients, each sending its next batch as soon as the last one is answered."""

from __future__ import annotations

import asyncio
import itertools
import random

from loadtest.client import BatchResult, CompletionClient
from loadtest.lengths import LengthSampler
from loadtest.workload import Prompt

MAX_BATCH = 8  # the course's batches hold 1 to 8 prompts


async def closed_loop(
    client: CompletionClient,
    pool: list[Prompt],
    clients: int,
    seconds: float,
    lengths: LengthSampler,
    seed: int = 0,
) -> list[BatchResult]:
    """Keep `clients` requests in flight for `seconds`, then let the last ones finish.

    Requests still running at the deadline are awaited (every sent prompt gets its answer);
    the report counts throughput only over completions inside the window.
    """
    rng = random.Random(seed)
    batch_ids = itertools.count()
    results: list[BatchResult] = []

    async def one_client() -> None:
        while client.now() < seconds:
            prompts = tuple(rng.sample(pool, rng.randint(1, min(MAX_BATCH, len(pool)))))
            max_tokens = lengths.for_batch([p.task for p in prompts])
            results.append(await client.send(next(batch_ids), prompts, max_tokens))

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return results
