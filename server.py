"""Entry point: the OpenAI-compatible completions front end (aiohttp on uvloop).

HTTP only: routes, the API key, reading bodies, status codes and the shutdown drain. The
request and response schema and every error body are the api package's; the path from a request's
prompts to their replies (planning, replicas) is queueing.service's. The front end never
blocks on a GPU and never imports torch.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import uvloop
from aiohttp import web

import shortcuts
from api.errors import ApiError, JsonErrorRunner, errors_as_json, json_response, read_body
from api.responses import (
    Chunks,
    chat_body,
    completion_body,
    models_body,
    parse_chat_request,
    parse_completion_request,
)
from api.stream import write_events
from queueing.dispatcher import SHUTDOWN_GRACE_S, NoReplica, Overloaded, ReplicaError
from queueing.metrics import Metrics
from queueing.options import Options
from queueing.service import CompletionService
from queueing.shutdown import Shutdown, ShuttingDown
from queueing.streams import Piece
from replica.wire.flags import add_replica_arguments, positive_int, replica_specs

log = logging.getLogger("server")

COMPLETION_ROUTES = ("/v1/completions", "/completion", "/")
EXIT_MARGIN_S = 0.3  # left for the interpreter to exit after the replicas are stopped


class Frontend:
    """The HTTP layer's state: the completion service, the API key, the shutdown clock and the
    per-request metrics."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.model_name = args.served_model_name or args.model
        self.api_key = os.environ.get("API_KEY") or None
        self.metrics_need_key = args.metrics_auth
        self.body_timeout = args.body_timeout
        self.shutdown = Shutdown(args.shutdown_timeout)
        self.metrics = Metrics()
        self.service = CompletionService(
            replica_specs(args, _cuda_available()),
            args.profile,
            args.plan_timeout,
            args.max_in_flight,
            self.metrics,
            args.reasoning_budget,
            args.mcq_votes,
        )
        self.requests = self.metrics.counter(
            "requests_total", "HTTP completion requests by status.", ["status"]
        )
        self.unhandled = self.metrics.counter(
            "unhandled_errors_total", "Requests that failed with an unexpected exception."
        )

    def authorize(self, request: web.Request) -> None:
        """With API_KEY set, require `Authorization: Bearer <key>` (compared in constant time)."""
        if self.api_key is None:
            return
        offered = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(offered, f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "Missing or invalid API key.", code="invalid_api_key")

    def begin_shutdown(self) -> None:
        """Shutdown began (in-flight requests drain): a replica that dies stays down."""
        self.shutdown.begin()
        self.service.begin_shutdown()

    async def close(self) -> None:
        """Stop the planner workers and replicas within what is left of the time."""
        await self.service.close(min(SHUTDOWN_GRACE_S, self.shutdown.seconds_left(EXIT_MARGIN_S)))

    async def complete(self, request: web.Request, raw: bytes) -> web.StreamResponse:
        """One completions request answered: a `text_completion` body or stream, or an
        ApiError."""
        parsed = parse_completion_request(raw)
        options = parsed.options
        bound, asked = self.service.max_prompts, len(parsed.prompts) * options.n
        if asked > bound:  # could never be admitted: retrying would not help
            raise ApiError(
                400,
                f"A request may carry at most {bound} prompts times 'n' (--max-in-flight); "
                f"this one has {len(parsed.prompts)} x {options.n}.",
                "prompt",
            )
        if options.stream:
            pieces = self.service.stream(parsed.prompts, options)
            return await self._stream(request, pieces, options, chat=False)
        replies = await self.service.complete(parsed.prompts, options)
        return json_response(completion_body(self.model_name, parsed.prompts, replies))

    async def chat(self, request: web.Request, raw: bytes) -> web.StreamResponse:
        """One chat completions request: a `chat.completion` body or chunk stream."""
        parsed = parse_chat_request(raw)
        options = parsed.options
        if options.stream:
            pieces = self.service.stream_chat(parsed.messages, options)
            return await self._stream(request, pieces, options, chat=True)
        replies = await self.service.chat(parsed.messages, options)
        return json_response(chat_body(self.model_name, replies))

    async def _stream(
        self, request: web.Request, pieces: AsyncIterator[Piece], options: Options, chat: bool
    ) -> web.StreamResponse:
        chunks = Chunks(self.model_name, chat)
        return await write_events(request, pieces, chunks, options.include_usage)


def _cuda_available() -> bool:
    """Asked in a throwaway process so the front end never initialises CUDA itself."""
    import subprocess
    import sys

    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0


FRONTEND = web.AppKey("frontend", Frontend)


Handler = Callable[[Frontend, web.Request, bytes], Awaitable[web.StreamResponse]]


async def completions(request: web.Request) -> web.StreamResponse:
    return await _respond(request, Frontend.complete)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _respond(request, Frontend.chat)


async def models(request: web.Request) -> web.Response:
    front = request.app[FRONTEND]
    front.authorize(request)
    return json_response(models_body(front.model_name))


async def _respond(request: web.Request, handle: Handler) -> web.StreamResponse:
    """The shared path of the model endpoints: key, drain, body, then `handle`, with each
    outcome counted by status and dispatch errors mapped to theirs."""
    front = request.app[FRONTEND]
    status = "500"
    try:
        front.authorize(request)
        async with front.shutdown.draining():
            raw = await read_body(request, front.body_timeout)
            response = await handle(front, request, raw)
        status = "200"
        return response
    except (ApiError, web.HTTPException) as error:
        status = str(error.status)
        raise
    except (Overloaded, NoReplica, ReplicaError, ShuttingDown) as error:
        api_error = _from_dispatch(error)
        status = str(api_error.status)
        raise api_error from None
    except asyncio.CancelledError:
        status = "cancelled"
        raise
    finally:
        front.requests.labels(status=status).inc()


def _from_dispatch(error: Overloaded | NoReplica | ReplicaError | ShuttingDown) -> ApiError:
    if isinstance(error, Overloaded):
        return ApiError(503, "Server overloaded; retry later.", headers={"Retry-After": "1"})
    if isinstance(error, ShuttingDown):
        message = "The server is shutting down; retry (elsewhere)."
        return ApiError(503, message, headers={"Retry-After": "1"}, close=True)
    if isinstance(error, NoReplica):
        return ApiError(503, "No model replica is available.", headers={"Retry-After": "5"})
    return ApiError(error.status, str(error), error.param, error.code)


async def health(request: web.Request) -> web.Response:
    """Liveness for a load balancer: 200 while at least one replica serves (one restarting
    while another serves is still a working node), with each replica's state."""
    dispatcher = request.app[FRONTEND].service.dispatcher
    return json_response(dispatcher.report(), 200 if dispatcher.any_serving else 503)


async def ready(request: web.Request) -> web.Response:
    """Readiness for start-up waits (deploy): 200 only once every replica serves."""
    dispatcher = request.app[FRONTEND].service.dispatcher
    return json_response(dispatcher.report(), 200 if dispatcher.all_serving else 503)


async def metrics(request: web.Request) -> web.Response:
    front = request.app[FRONTEND]
    if front.metrics_need_key:
        front.authorize(request)
    body = front.metrics.render()
    return web.Response(text=body, headers={"Content-Type": Metrics.CONTENT_TYPE})


def build_app(args: argparse.Namespace) -> web.Application:
    front = Frontend(args)
    app = web.Application(
        client_max_size=args.max_body_bytes,
        middlewares=[errors_as_json(front.unhandled.inc)],
    )
    app[FRONTEND] = front
    for route in COMPLETION_ROUTES:
        app.router.add_post(route, completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)

    async def start(app: web.Application) -> None:
        await app[FRONTEND].service.start()

    async def begin_shutdown(app: web.Application) -> None:
        app[FRONTEND].begin_shutdown()

    async def close(app: web.Application) -> None:
        await app[FRONTEND].close()

    app.on_startup.append(start)
    app.on_shutdown.append(begin_shutdown)
    app.on_cleanup.append(close)
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--served-model-name",
        help="the model's name in responses and /v1/models (default: --model)",
    )
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--profile", choices=sorted(shortcuts.PROFILES), default="throughput")
    add_replica_arguments(parser)
    parser.add_argument(
        "--max-in-flight", type=positive_int, default=4096, help="admission bound (prompts)"
    )
    parser.add_argument(
        "--reasoning-budget",
        type=positive_int,
        help="most thought tokens of a model that thinks, for every profile (default: the "
        "profile's); a request's reasoning_effort overrides it",
    )
    parser.add_argument(
        "--mcq-votes",
        type=positive_int,
        help="thoughts a model that thinks samples for one MCQ of a reasoning profile, its "
        "letter chosen by their summed probabilities (default: the profile's; 1: no vote)",
    )
    parser.add_argument(
        "--plan-timeout", type=float, default=5.0, help="seconds; then the prompt goes to the model"
    )
    parser.add_argument("--max-body-bytes", type=int, default=4 << 20)
    parser.add_argument(
        "--body-timeout", type=float, default=30.0, help="seconds to receive a request body"
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds from SIGTERM/SIGINT to exit, whatever is still running",
    )
    parser.add_argument(
        "--metrics-auth", action="store_true", help="/metrics requires API_KEY too, when set"
    )
    return parser.parse_args(argv)


def refuse_unservable(args: argparse.Namespace) -> None:
    """Exit with one line if the model cannot be served (or not in the replicas' layout: the
    pipeline stages against --gpus and the model's layers), before any replica starts (a replica
    that fails to load would otherwise restart forever behind a 503). Checked in a throwaway
    process: the front end never imports torch. Also fetches a Hub model once for all replicas."""
    import subprocess
    import sys

    stages = args.pipeline_parallel_size
    try:  # the layout's own refusals: a stage count below 1, GPUs not a multiple of it
        replica_specs(args, cuda=stages > 1 and _cuda_available())
    except ValueError as error:
        print(f"cannot serve {args.model}: {error}", file=sys.stderr)
        sys.exit(2)
    if args.model == "tiny-random" and stages == 1:  # built in: always servable
        return
    command = [sys.executable, "-m", "replica.loading.servable", args.model]
    command += ["--random-weights"] if args.random_weights else []
    command += ["--pipeline-parallel-size", str(stages)]
    command += ["--quantize", args.quantize] if args.quantize else []
    check = subprocess.run(command, capture_output=True, text=True, check=False)
    if check.returncode != 0:
        lines = check.stderr.strip().splitlines() or [f"model check exited {check.returncode}"]
        print(lines[-1], file=sys.stderr)
        sys.exit(2)


async def serve(args: argparse.Namespace) -> None:
    """Serve until SIGTERM or SIGINT, then drain and stop within --shutdown-timeout
    (queueing.shutdown says how the time is shared)."""
    app = build_app(args)
    shutdown = app[FRONTEND].shutdown
    runner = JsonErrorRunner(  # handlers end by the drain's end themselves: this is a backstop
        app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown.drain_s + 1
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, args.host, args.port).start()
        log.info("serving on http://%s:%d", args.host, args.port)
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("stopping: in-flight requests get up to %.1f s", shutdown.drain_s)
        shutdown.arm_watchdog()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    refuse_unservable(args)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args))


if __name__ == "__main__":
    main()
