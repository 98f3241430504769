"""Entry point: the OpenAI-compatible completions front end (aiohttp on uvloop).

One asyncio process parses and validates requests, routes each prompt, and awaits replica
processes through queueing/; it never blocks on a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
import uvloop
from aiohttp import web

from queueing.dispatcher import Dispatcher, NoReplica, Overloaded, ReplicaError
from queueing.metrics import Metrics
from replica.worker import ReplicaSpec

log = logging.getLogger("server")

DEFAULT_MODEL = "Qwen/Qwen3-4B-Instruct-2507"
COMPLETION_ROUTES = ("/v1/completions", "/completion", "/")
PROFILE_CAPS = {"throughput": 512, "balanced": 1024, "accuracy": 2048}


class ApiError(Exception):
    """An OpenAI-style error: rendered as {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code
        self.headers = headers or {}

    def response(self) -> web.Response:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {
            "error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}
        }
        return json_response(body, self.status, self.headers)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None):
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


@dataclass(frozen=True)
class CompletionRequest:
    prompts: list[str]
    max_tokens: int | None


def parse_completion_request(raw: bytes) -> CompletionRequest:
    """Validate a request body; every way it can be wrong is a 400 naming the field."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise ApiError(400, f"The request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts:
        raise ApiError(400, "'prompt' must be a string or a non-empty list of strings.", "prompt")
    if not all(isinstance(item, str) for item in prompts):
        raise ApiError(
            400,
            "'prompt' must contain only strings (token-id prompts are not supported).",
            "prompt",
        )
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise ApiError(400, "'max_tokens' must be a positive integer.", "max_tokens")
    if body.get("stream"):
        raise ApiError(400, "Streaming is not supported; send 'stream': false.", "stream")
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, "Only 'n': 1 is supported.", "n")
    return CompletionRequest(prompts, max_tokens)


class CompletionService:
    """The application state: replicas, metrics and the per-prompt answer path."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.model_name = args.model
        self.profile = args.profile
        self.api_key = os.environ.get("API_KEY") or None
        self.metrics = Metrics()
        self.dispatcher = Dispatcher(replica_specs(args), self.metrics, args.max_in_flight)

    async def answer(self, prompt: str, max_tokens: int | None) -> dict[str, Any]:
        cap = min(max_tokens or PROFILE_CAPS[self.profile], PROFILE_CAPS[self.profile])
        message = {
            "op": "generate",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": cap,
        }
        return await self.dispatcher.submit(message, work=len(prompt) // 4 + cap)

    async def complete(self, request: CompletionRequest) -> dict[str, Any]:
        """Fan the prompts out, gather them in order; one failure cancels the rest."""
        self.dispatcher.admit(len(request.prompts))
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._timed(p, request.max_tokens)) for p in request.prompts
                ]
        except ExceptionGroup as failures:
            raise failures.exceptions[0] from None
        results = [task.result() for task in tasks]
        prompt_tokens = sum(r["prompt_tokens"] for r in results)
        completion_tokens = sum(r["completion_tokens"] for r in results)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": i,
                    "text": r["text"],
                    "logprobs": None,
                    "finish_reason": r["finish_reason"],
                }
                for i, r in enumerate(results)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    async def _timed(self, prompt: str, max_tokens: int | None) -> dict[str, Any]:
        started = time.monotonic()
        result = await self.answer(prompt, max_tokens)
        self.metrics.observe_latency("open", time.monotonic() - started)
        self.metrics.inc("tokens_in_total", "Prompt tokens processed.", result["prompt_tokens"])
        self.metrics.inc("tokens_out_total", "Tokens generated.", result["completion_tokens"])
        return result


def replica_specs(args: argparse.Namespace) -> list[ReplicaSpec]:
    gpus = [int(g) for g in args.gpus.split(",") if g.strip()] if args.gpus else []
    common = {"model": args.model, "backend": args.backend, "random_weights": args.random_weights}
    if gpus and _cuda_available():
        return [ReplicaSpec(gpu=gpu, **common) for gpu in gpus]
    threads = max(1, (os.cpu_count() or 1) // args.cpu_replicas)
    return [ReplicaSpec(cpu_threads=threads, **common) for _ in range(args.cpu_replicas)]


def _cuda_available() -> bool:
    """Asked in a throwaway process so the front end never initialises CUDA itself."""
    import subprocess
    import sys

    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0


SERVICE = web.AppKey("service", CompletionService)


@web.middleware
async def errors_as_json(request: web.Request, handler):
    """Every failure leaves as an OpenAI-style JSON error, never as an HTML page or a 5xx trace."""
    try:
        return await handler(request)
    except ApiError as error:
        return error.response()
    except web.HTTPException as error:
        if error.status < 400:
            raise
        headers = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None
        return ApiError(error.status, error.reason, headers=headers).response()


async def completions(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    if service.api_key and request.headers.get("Authorization") != f"Bearer {service.api_key}":
        raise ApiError(401, "Missing or invalid API key.", code="invalid_api_key")
    try:
        parsed = parse_completion_request(await request.read())
        response = await service.complete(parsed)
    except ApiError as error:
        service.metrics.inc("requests_total", "HTTP completion requests.", status=str(error.status))
        raise
    except Overloaded:
        service.metrics.inc("requests_total", "HTTP completion requests.", status="503")
        raise ApiError(
            503, "Server overloaded; retry later.", headers={"Retry-After": "1"}
        ) from None
    except NoReplica:
        service.metrics.inc("requests_total", "HTTP completion requests.", status="503")
        raise ApiError(
            503, "No model replica is available.", headers={"Retry-After": "5"}
        ) from None
    except ReplicaError as error:
        service.metrics.inc("requests_total", "HTTP completion requests.", status=str(error.status))
        raise ApiError(error.status, str(error)) from None
    service.metrics.inc("requests_total", "HTTP completion requests.", status="200")
    return json_response(response)


async def health(request: web.Request) -> web.Response:
    dispatcher = request.app[SERVICE].dispatcher
    ready = dispatcher.ready
    body = {"status": "ready" if ready else "loading", "replicas": dispatcher.health()}
    return json_response(body, 200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=request.app[SERVICE].metrics.render(), content_type="text/plain")


def build_app(args: argparse.Namespace) -> web.Application:
    app = web.Application(client_max_size=args.max_body_bytes, middlewares=[errors_as_json])
    app[SERVICE] = CompletionService(args)
    for route in COMPLETION_ROUTES:
        app.router.add_post(route, completions)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)

    async def start_replicas(app: web.Application) -> None:
        await app[SERVICE].dispatcher.start()

    async def stop_replicas(app: web.Application) -> None:
        app[SERVICE].dispatcher.shutdown()

    app.on_startup.append(start_replicas)
    app.on_cleanup.append(stop_replicas)
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="HF id, checkpoint dir or tiny-random"
    )
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--gpus", default="0", help="comma-separated GPU ids, one replica each")
    parser.add_argument("--cpu-replicas", type=int, default=1, help="replicas when there is no GPU")
    parser.add_argument("--profile", choices=sorted(PROFILE_CAPS), default="throughput")
    parser.add_argument("--backend", choices=["reference"], default="reference")
    parser.add_argument("--random-weights", action="store_true", help="config only, random weights")
    parser.add_argument("--max-in-flight", type=int, default=4096, help="admission bound (prompts)")
    parser.add_argument("--max-body-bytes", type=int, default=4 << 20)
    parser.add_argument("--shutdown-timeout", type=float, default=30.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    web.run_app(
        build_app(args),
        host=args.host,
        port=args.port,
        loop=uvloop.new_event_loop(),
        handler_cancellation=True,
        shutdown_timeout=args.shutdown_timeout,
        access_log=None,
    )


if __name__ == "__main__":
    main()
