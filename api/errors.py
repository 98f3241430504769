"""Errors at the HTTP edge, in OpenAI's shape `{"error": {message, type, param, code}}`,
including the ones aiohttp raises before or while it reads a body (oversized headers, bad
chunking, undecodable encodings), and reading a body within a time limit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An OpenAI-style error: rendered as {"error": {message, type, param, code}}.

    `close` ends the connection after the answer (its request body was not read to the end,
    so nothing after it on the connection can be trusted)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.close = close

    def response(self) -> web.Response:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {
            "error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}
        }
        response = json_response(body, self.status, self.headers)
        if self.close:
            response.force_close()
        return response


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


async def read_body(request: web.Request, timeout: float) -> bytes:
    """The whole body, or a JSON error: 408 if it does not arrive within `timeout` seconds (a
    half-sent body would otherwise hold its connection forever), 400 if it cannot be decoded
    (a `Content-Encoding: gzip` body that is not gzip, broken chunking), 413 past the size cap
    (aiohttp's HTTPRequestEntityTooLarge, shaped by the error middleware)."""
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise ApiError(
            408, f"The request body did not arrive within {timeout:g} s.", close=True
        ) from None
    except web.RequestPayloadError as error:
        # The parser stopped feeding this body: mark it finished, or aiohttp would try to drain
        # it after the answer and log the decode error again as an unhandled exception.
        request.content.feed_eof()
        cause = error.__cause__ or error
        detail = getattr(cause, "message", None) or str(cause)
        raise ApiError(
            400, f"The request body could not be read: {detail.strip()}", close=True
        ) from None


def errors_as_json(
    on_unhandled: Callable[[], None],
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """A middleware: every failure leaves as an OpenAI-style JSON error, never as an HTML page
    or a 5xx trace; `on_unhandled` counts the bugs (exceptions nobody meant to raise)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as error:
            return error.response()
        except web.HTTPException as error:
            if error.status < 400:
                raise
            headers = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None
            return ApiError(error.status, error.reason, headers=headers).response()
        except Exception:  # a bug: log it, count it, and still answer in the API's format
            log.exception("unhandled error serving %s %s", request.method, request.path)
            on_unhandled()
            return ApiError(500, "Internal server error.", code="internal_error").response()

    return middleware


class _JsonErrorProtocol(RequestHandler):
    """aiohttp's connection handler, answering the errors it raises itself (a bad request line,
    oversized headers, broken chunking: nothing an app handler or middleware ever sees) in the
    API's JSON instead of plain text. aiohttp has no public hook for these; the pinned version
    is held to it by tests/test_http_errors.py."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if a reply was sent
        if status >= 500:
            error = ApiError(status, "Internal server error.", code="internal_error", close=True)
        else:
            first_line = (message or "Bad request.").strip().splitlines()[0]
            error = ApiError(status, f"Malformed HTTP request: {first_line}", close=True)
        return error.response()


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorProtocol(self, loop=self._loop, **self._kwargs)


class JsonErrorRunner(web.AppRunner):
    """An AppRunner whose connections use _JsonErrorProtocol."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer  # same object and state, JSON protocol errors
        return server
