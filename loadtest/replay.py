"""Open-loop replay of the course schedule: each batch leaves at its arrival time / speed."""

from __future__ import annotations

import asyncio

from loadtest.client import BatchResult, CompletionClient
from loadtest.lengths import LengthSampler
from loadtest.workload import ScheduledBatch


async def replay(
    client: CompletionClient,
    schedule: list[ScheduledBatch],
    speed: float,
    lengths: LengthSampler,
    max_concurrency: int = 300,
) -> list[BatchResult]:
    """Send every batch at `arrival_s / speed` without waiting for earlier answers.

    As in make_requests.py, a slow server does not slow the arrivals; beyond `max_concurrency`
    requests in flight a batch waits for a free place, and its actual send time shows the wait.
    """
    places = asyncio.Semaphore(max_concurrency)

    async def send(batch: ScheduledBatch, scheduled_s: float, max_tokens: int) -> BatchResult:
        async with places:
            return await client.send(batch.batch_id, batch.prompts, max_tokens, scheduled_s)

    pending = []
    for batch in schedule:
        scheduled_s = batch.arrival_s / speed
        await asyncio.sleep(max(0.0, scheduled_s - client.now()))
        max_tokens = lengths.for_batch([p.task for p in batch.prompts])
        pending.append(asyncio.create_task(send(batch, scheduled_s, max_tokens)))
    return list(await asyncio.gather(*pending))
