"""Entry point: the OpenAI-compatible completions front end (aiohttp on uvloop).

One asyncio process parses and validates requests, routes each prompt, and awaits replica
processes through queueing/; it never blocks on a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import os
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import orjson
import uvloop
from aiohttp import web

import shortcuts
from queueing.dispatcher import Dispatcher, NoReplica, Overloaded, ReplicaError
from queueing.metrics import Metrics
from replica.worker import ReplicaSpec, ignore_stop_signals

log = logging.getLogger("server")

DEFAULT_MODEL = "Qwen/Qwen3-4B-Instruct-2507"
PROMPTS, PROMPTS_HELP = "prompts_total", "Prompts by task and outcome."
COMPLETION_ROUTES = ("/v1/completions", "/completion", "/")
PLANNER_PROCESSES = 2  # plan long prompts; spawned on first use
INLINE_PLAN_CHARS = 16_384  # dev prompts reach 4.7k chars


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
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):  # null means the default, 1
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
        self.plan_timeout = args.plan_timeout
        self.planner = _planner_pool()

    async def plan(self, prompt: str) -> shortcuts.Plan:
        """`shortcuts.plan`, falling back to an open prompt for the model on timeout or error.

        Prompts up to INLINE_PLAN_CHARS plan inline: the graph parser's size caps bound them to a
        few ms, and any hop would cost graph-only throughput a quarter or more. Longer ones (a
        multi-MB graph-like prompt scans for a quarter second) plan in a worker process: not a
        thread, since a regex search holds the GIL throughout. Past `--plan-timeout` the model
        answers; the runaway plan finishes in the background, queued ones are dropped.
        """
        try:
            if len(prompt) <= INLINE_PLAN_CHARS:
                return shortcuts.plan(prompt, self.profile)
            loop = asyncio.get_running_loop()
            work = loop.run_in_executor(self.planner, shortcuts.plan, prompt, self.profile)
            return await asyncio.wait_for(work, self.plan_timeout)
        except BrokenProcessPool:  # a worker died (e.g. the OOM killer): start a fresh pool
            log.exception("the planner pool broke; the model answers instead")
            self.planner.shutdown(wait=False)
            self.planner = _planner_pool()
            reason = "error"
        except TimeoutError:
            log.warning("planning took over %.1f s; the model answers instead", self.plan_timeout)
            reason = "timeout"
        except Exception:
            log.exception("planning failed; the model answers instead")
            reason = "error"
        self.metrics.inc(
            "plan_fallback_total",
            "Prompts sent to the model as open after planning failed.",
            reason=reason,
        )
        return shortcuts.plan_unshaped(prompt, self.profile)

    async def answer(self, action: shortcuts.Plan, max_tokens: int | None) -> dict[str, Any]:
        """One prompt: solved in the front end, or scored or generated by a replica."""
        if isinstance(action, shortcuts.Answer):
            return _choice(action.task, action.text)
        if action.task == "graph":
            log.warning("graph-like prompt did not parse; sending it to the model")
            self.metrics.inc(
                "graph_unparsed_total", "Graph-like prompts the solver could not parse."
            )
        result = await self._run(action, max_tokens)
        final = shortcuts.finish(action, result["choice"] or result["text"])
        if isinstance(final, shortcuts.Score):  # reasoning gave no valid letter: score instead
            scored = await self._run(final, max_tokens)
            final = shortcuts.finish(final, scored["choice"])
            result["prompt_tokens"] += scored["prompt_tokens"]
        return _choice(action.task, final, result)

    async def _run(self, action: shortcuts.Score | shortcuts.Generate, max_tokens: int | None):
        if isinstance(action, shortcuts.Score):
            message = {"op": "score", "messages": action.messages, "prefix": action.prefix}
            message["choices"] = action.choices
            return await self.dispatcher.submit(message, work=_chars_to_tokens(action.messages))
        cap = min(max_tokens or action.max_tokens, action.max_tokens)
        message = {"op": "generate", "messages": action.messages, "max_tokens": cap}
        return await self.dispatcher.submit(message, work=_chars_to_tokens(action.messages) + cap)

    async def complete(self, request: CompletionRequest) -> dict[str, Any]:
        """Fan the prompts out, gather them in order; one failure cancels the rest."""
        bound = self.dispatcher.max_in_flight
        if len(request.prompts) > bound:  # could never be admitted: retrying would not help
            raise ApiError(
                400,
                f"A request may carry at most {bound} prompts (--max-in-flight); "
                f"this one has {len(request.prompts)}.",
                "prompt",
            )
        with self.dispatcher.admission(len(request.prompts)):
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [
                        group.create_task(self._timed(p, request.max_tokens))
                        for p in request.prompts
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
        action = await self.plan(prompt)
        try:
            result = await self.answer(action, max_tokens)
        except Exception:
            self.metrics.inc(PROMPTS, PROMPTS_HELP, task=action.task, status="error")
            raise
        self.metrics.inc(PROMPTS, PROMPTS_HELP, task=action.task, status="ok")
        self.metrics.observe_latency(action.task, time.monotonic() - started)
        self.metrics.inc("tokens_in_total", "Prompt tokens processed.", result["prompt_tokens"])
        self.metrics.inc("tokens_out_total", "Tokens generated.", result["completion_tokens"])
        return result


def _planner_pool() -> ProcessPoolExecutor:
    """Spawned workers that ignore SIGINT/SIGTERM like replicas: the front end stops them."""
    return ProcessPoolExecutor(
        PLANNER_PROCESSES, mp_context=mp.get_context("spawn"), initializer=ignore_stop_signals
    )


def _chars_to_tokens(messages: list[dict[str, str]]) -> int:
    """A cheap estimate of prompt tokens for load balancing (no tokenizer in the front end)."""
    return sum(len(message["content"]) for message in messages) // 4


def _choice(task: str, text: str, result: dict[str, Any] | None = None) -> dict[str, Any]:
    """A prompt's answer; usage counts the tokens a replica processed (none for shortcuts)."""
    result = result or {"finish_reason": "stop", "prompt_tokens": 0, "completion_tokens": 0}
    return {**result, "task": task, "text": text}


def replica_specs(args: argparse.Namespace) -> list[ReplicaSpec]:
    gpus = [int(g) for g in args.gpus.split(",") if g.strip()] if args.gpus else []
    options = {
        "max_seq_len": args.max_seq_len,
        "max_batch": args.max_batch,
        "kv_fraction": args.kv_fraction,
        "gpu_memory_gb": args.gpu_memory_gb,
        "refill": args.refill,
        "attention": args.attention,
    }
    common = {
        "model": args.model,
        "random_weights": args.random_weights,
        "options": options,
    }
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
    except Exception:  # a bug: log it, count it, and still answer in the API's format
        log.exception("unhandled error serving %s %s", request.method, request.path)
        request.app[SERVICE].metrics.inc(
            "unhandled_errors_total", "Requests that failed with an unexpected exception."
        )
        return ApiError(500, "Internal server error.", code="internal_error").response()


async def completions(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    status = "500"
    try:
        if service.api_key and request.headers.get("Authorization") != f"Bearer {service.api_key}":
            raise ApiError(401, "Missing or invalid API key.", code="invalid_api_key")
        response = await service.complete(parse_completion_request(await request.read()))
        status = "200"
        return json_response(response)
    except (ApiError, web.HTTPException) as error:
        status = str(error.status)
        raise
    except (Overloaded, NoReplica, ReplicaError) as error:
        api_error = _from_dispatch(error)
        status = str(api_error.status)
        raise api_error from None
    except asyncio.CancelledError:
        status = "cancelled"
        raise
    finally:
        service.metrics.inc("requests_total", "HTTP completion requests by status.", status=status)


def _from_dispatch(error: Overloaded | NoReplica | ReplicaError) -> ApiError:
    if isinstance(error, Overloaded):
        return ApiError(503, "Server overloaded; retry later.", headers={"Retry-After": "1"})
    if isinstance(error, NoReplica):
        return ApiError(503, "No model replica is available.", headers={"Retry-After": "5"})
    return ApiError(error.status, str(error), error.param, error.code)


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

    async def stop_restarting(app: web.Application) -> None:
        """Shutdown began (in-flight requests still drain): a replica that dies stays down."""
        app[SERVICE].dispatcher.begin_shutdown()

    async def stop_replicas(app: web.Application) -> None:
        await app[SERVICE].dispatcher.stop()
        app[SERVICE].planner.shutdown(wait=False, cancel_futures=True)

    app.on_startup.append(start_replicas)
    app.on_shutdown.append(stop_restarting)
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
    parser.add_argument("--profile", choices=sorted(shortcuts.PROFILES), default="throughput")
    parser.add_argument(
        "--attention", choices=["flash", "triton", "reference"], help="default: best that imports"
    )
    parser.add_argument("--max-seq-len", type=int, default=4096, help="tokens per KV slot")
    parser.add_argument("--max-batch", type=int, default=256, help="largest decode batch")
    parser.add_argument("--kv-fraction", type=float, default=0.9, help="of free GPU memory")
    parser.add_argument(
        "--gpu-memory-gb",
        type=float,
        help="plan memory as if each GPU had this many GiB (an A100-80GB shows about 79)",
    )
    parser.add_argument(
        "--no-refill", dest="refill", action="store_false", help="static batching (ablation)"
    )
    parser.add_argument("--random-weights", action="store_true", help="config only, random weights")
    parser.add_argument("--max-in-flight", type=int, default=4096, help="admission bound (prompts)")
    parser.add_argument(
        "--plan-timeout", type=float, default=5.0, help="seconds; then the prompt goes to the model"
    )
    parser.add_argument("--max-body-bytes", type=int, default=4 << 20)
    parser.add_argument("--shutdown-timeout", type=float, default=30.0)
    return parser.parse_args(argv)


def refuse_unservable(args: argparse.Namespace) -> None:
    """Exit with one line if the model cannot be served, before any replica starts (a replica
    that fails to load would otherwise restart forever behind a 503). Checked in a throwaway
    process: the front end never imports torch. Also fetches a Hub model once for all replicas."""
    import subprocess
    import sys

    if args.model == "tiny-random":  # built in (replica.checkpoint.TINY_RANDOM): always servable
        return
    command = [sys.executable, "-m", "replica.servable", args.model]
    command += ["--random-weights"] if args.random_weights else []
    check = subprocess.run(command, capture_output=True, text=True, check=False)
    if check.returncode != 0:
        lines = check.stderr.strip().splitlines() or [f"model check exited {check.returncode}"]
        print(lines[-1], file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    refuse_unservable(args)
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
