"""Streamed replies: the pieces a streaming response is written from, and several streams
merged into one as their pieces arrive."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from shortcuts import Reply


@dataclass(frozen=True)
class Piece:
    """More text of choice `index` (thought text when `reasoning`); its last piece carries its
    Reply (finish reason, usage)."""

    index: int
    text: str
    reply: Reply | None = None
    reasoning: bool = False


async def merged(streams: list[AsyncIterator[Piece]]) -> AsyncIterator[Piece]:
    """Every stream's pieces as they come; a failure in one ends them all, and so does the
    consumer stopping early (each stream is cancelled, which cancels its model request)."""
    queue: asyncio.Queue[Piece | Exception | None] = asyncio.Queue()

    async def pump(stream: AsyncIterator[Piece]) -> None:
        try:
            async for piece in stream:
                queue.put_nowait(piece)
            queue.put_nowait(None)
        except Exception as error:
            queue.put_nowait(error)

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
