"""Errors at the HTTP layer come back as the API's JSON: bodies that cannot be decoded, bodies
that never finish, and what aiohttp's parser rejects before any handler runs. The app runs on
the server's own runner (JsonErrorRunner) with a fake dispatcher, over raw sockets."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import Awaitable, Callable

import pytest

import server
from api.errors import JsonErrorRunner
from tests.prometheus_text import sample
from tests.server_process import free_port
from tests.test_server_app import FakeDispatcher, parse_args

Exchange = Callable[[bytes], Awaitable[tuple[int, dict[str, str], bytes]]]


def run_server(scenario: Callable[[Exchange, server.Frontend], Awaitable[None]], *flags):
    """Serve build_app's app through JsonErrorRunner on a free port and run `scenario`."""

    async def main() -> None:
        args = parse_args(*flags)
        app = server.build_app(args)
        front = app[server.FRONTEND]
        front.service.dispatcher = FakeDispatcher(args.max_in_flight)
        runner = JsonErrorRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        port = free_port()
        await server.web.TCPSite(runner, "127.0.0.1", port).start()

        async def exchange(raw: bytes) -> tuple[int, dict[str, str], bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            await writer.drain()
            try:
                return await asyncio.wait_for(read_response(reader), 10)
            finally:
                writer.close()

        try:
            await scenario(exchange, front)
        finally:
            await runner.cleanup()

    asyncio.run(main())


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body (by Content-Length: the connection may linger open)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    status_line, *header_lines = head.strip().split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    body = await reader.readexactly(int(headers["Content-Length"]))
    return int(status_line.split()[1]), headers, body


def post(body: bytes, *headers: str, length: int | None = None) -> bytes:
    lines = [
        "POST /v1/completions HTTP/1.1",
        "Host: x",
        "Connection: close",
        "Content-Type: application/json",
        f"Content-Length: {len(body) if length is None else length}",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def assert_json_error(status: int, headers: dict[str, str], body: bytes, expected: int) -> dict:
    assert status == expected, body
    assert headers["Content-Type"].startswith("application/json"), headers
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


GOOD = json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()
PROTOCOL_ERRORS = {
    "oversized header": post(GOOD, "X-Big: " + "a" * 9000),
    "bad chunk size": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "chunk overrun": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"2\r\nhello\r\n0\r\n\r\n",
    "bad request line": b"GARBAGE\r\n\r\n",
}


@pytest.mark.parametrize("raw", PROTOCOL_ERRORS.values(), ids=PROTOCOL_ERRORS.keys())
def test_what_the_http_parser_rejects_is_a_json_400(raw):
    async def scenario(exchange: Exchange, front) -> None:
        status, headers, body = await exchange(raw)
        error = assert_json_error(status, headers, body, 400)
        assert error["message"].startswith("Malformed HTTP request")
        assert (await exchange(post(GOOD)))[0] == 200  # and the server carries on

    run_server(scenario)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_an_undecodable_body_is_a_json_400_not_a_500(encoding):
    async def scenario(exchange: Exchange, front) -> None:
        status, headers, body = await exchange(post(GOOD, f"Content-Encoding: {encoding}"))
        error = assert_json_error(status, headers, body, 400)
        assert encoding in error["message"]
        metrics = front.metrics.render()
        assert sample(metrics, "unhandled_errors_total") == 0
        assert sample(metrics, "requests_total", status="400") == 1

    run_server(scenario)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_compressed_body_is_still_read(encoding):
    compressed = gzip.compress(GOOD) if encoding == "gzip" else zlib.compress(GOOD)

    async def scenario(exchange: Exchange, front) -> None:
        status, _, body = await exchange(post(compressed, f"Content-Encoding: {encoding}"))
        assert status == 200, body
        assert json.loads(body)["choices"][0]["prompt"] == "Hi"

    run_server(scenario)


def test_a_half_sent_body_times_out_with_a_json_408():
    async def scenario(exchange: Exchange, front) -> None:
        started = asyncio.get_running_loop().time()
        status, headers, body = await exchange(post(GOOD[:5], length=len(GOOD)))
        assert_json_error(status, headers, body, 408)
        assert asyncio.get_running_loop().time() - started < 3
        assert sample(front.metrics.render(), "requests_total", status="408") == 1

    run_server(scenario, "--body-timeout", "0.5")


def get(path: str, *headers: str) -> bytes:
    return (
        "\r\n".join([f"GET {path} HTTP/1.1", "Host: x", "Connection: close", *headers]) + "\r\n\r\n"
    ).encode()


def test_metrics_follow_the_api_key_when_asked(monkeypatch):
    monkeypatch.setenv("API_KEY", "sesame")

    async def scenario(exchange: Exchange, front) -> None:
        status, headers, body = await exchange(get("/metrics"))
        assert assert_json_error(status, headers, body, 401)["code"] == "invalid_api_key"
        assert (await exchange(get("/metrics", "Authorization: Bearer nope")))[0] == 401
        assert (await exchange(get("/metrics", "Authorization: Bearer sesame")))[0] == 200
        assert (await exchange(get("/health")))[0] in (200, 503)  # open, never 401

    run_server(scenario, "--metrics-auth")


def test_metrics_stay_open_without_the_flag(monkeypatch):
    monkeypatch.setenv("API_KEY", "sesame")

    async def scenario(exchange: Exchange, front) -> None:
        status, _, body = await exchange(get("/metrics"))
        assert status == 200 and b"# TYPE" in body
        assert (await exchange(post(GOOD)))[0] == 401  # completions still need the key

    run_server(scenario)
