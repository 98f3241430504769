"""Server-sent events for `stream: true`: each piece of generated text as an OpenAI chunk as it
arrives, finish reasons on each choice's last chunk, an optional usage chunk, then [DONE]."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

import orjson
from aiohttp import web

from api.responses import Chunks
from queueing.streams import Piece
from replica.wire.messages import Usage

log = logging.getLogger(__name__)
DONE = b"data: [DONE]\n\n"


async def write_events(
    request: web.Request, pieces: AsyncIterator[Piece], chunks: Chunks, include_usage: bool
) -> web.StreamResponse:
    """Stream `pieces` as SSE. What fails before the first piece is an ordinary error response;
    later, an error event ends the stream. A client that goes away cancels the handler, and
    closing `pieces` then cancels its model requests."""
    async with aclosing(pieces):
        first = await anext(pieces, None)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        usage = Usage()
        try:
            piece = first
            while piece is not None:
                reason = piece.reply.finish_reason if piece.reply else None
                chunk = chunks.piece(piece.index, piece.text, reason, piece.reasoning)
                await _send(response, chunk)
                usage += piece.reply.usage if piece.reply else Usage()
                piece = await anext(pieces, None)
        except Exception as error:  # the status line is gone: the error travels as an event
            log.warning("stream failed after it began: %r", error)
            await _send(response, {"error": {"message": str(error), "type": "server_error"}})
            return response
        if include_usage:
            await _send(response, chunks.usage(usage))
        await response.write(DONE)
        await response.write_eof()
    return response


async def _send(response: web.StreamResponse, body: object) -> None:
    await response.write(b"data: " + orjson.dumps(body) + b"\n\n")
