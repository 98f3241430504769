"""A request's prompts, HTTP aside: admitted, planned, answered concurrently, gathered in order.

The HTTP layer (server.py) validates and renders; this is the path in between. Each prompt is
planned once (queueing.planning) and its plan replies by itself (shortcuts.plans), calling the
dispatcher as its model as often as it needs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import shortcuts
from api.params import Options
from queueing.dispatcher import Dispatcher
from queueing.metrics import Metrics
from queueing.planning import Planner
from queueing.streams import Piece, merged
from replica.wire.messages import Chat, Delta, GenerateJob
from replica.wire.spec import ReplicaSpec
from shortcuts.text import strip_think

CHAT_MAX_TOKENS = 4096  # a chat's default cap (the replica also caps at what its slot holds)
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class CompletionService:
    """Owns the replicas (through the dispatcher), the planner and the per-prompt metrics."""

    def __init__(
        self,
        specs: list[ReplicaSpec],
        profile: str,
        plan_timeout: float,
        max_in_flight: int,
        metrics: Metrics,
    ) -> None:
        self.dispatcher = Dispatcher(specs, metrics, max_in_flight)
        self.planner = Planner(profile, plan_timeout, metrics)
        self._prompts = metrics.counter(
            "prompts_total", "Prompts by task and outcome.", ["task", "status"]
        )
        self._latency = metrics.histogram(
            "completion_latency_seconds",
            "Time from request to answer, per prompt.",
            ["task"],
            LATENCY_BUCKETS_S,
        )
        self._tokens_in = metrics.counter("tokens_in_total", "Prompt tokens processed.")
        self._tokens_out = metrics.counter("tokens_out_total", "Tokens generated.")

    @property
    def max_prompts(self) -> int:
        """The most prompts one request may carry: more could never be admitted."""
        return self.dispatcher.max_in_flight

    async def start(self) -> None:
        self.planner.pool.start()
        await self.dispatcher.start()

    def begin_shutdown(self) -> None:
        """Shutdown began (in-flight requests drain): a replica that dies stays down."""
        self.dispatcher.begin_shutdown()

    async def close(self, seconds: float) -> None:
        """Kill the planner workers, then stop the replicas within `seconds`."""
        self.planner.pool.close()
        await self.dispatcher.stop(seconds)

    async def complete(self, prompts: list[str], options: Options) -> list[shortcuts.Reply]:
        """Replies in prompt order. Planning takes a bounded share of the loop; the prompts are
        then answered concurrently, and one failure cancels the rest."""
        started = time.monotonic()
        with self.dispatcher.admission(len(prompts)):
            plans = await self._plans(prompts, options)
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(self._reply(plan, started)) for plan in plans]
            except ExceptionGroup as failures:
                raise failures.exceptions[0] from None
        return [task.result() for task in tasks]

    async def stream(self, prompts: list[str], options: Options) -> AsyncIterator[Piece]:
        """The replies' text as it is generated, pieces of all prompts interleaved. A plan
        that decodes one turn streams it; the others (a solved graph, a scored MCQ, a
        reasoning MCQ) arrive whole."""
        started = time.monotonic()
        with self.dispatcher.admission(len(prompts)):
            plans = await self._plans(prompts, options)
            streams = [self._stream_plan(i, plan, started) for i, plan in enumerate(plans)]
            async for piece in merged(streams):
                yield piece

    async def chat(self, messages: Chat, options: Options) -> shortcuts.Reply:
        """One assistant turn for the messages as given: no shaping, nothing added."""
        started = time.monotonic()
        with self.dispatcher.admission(1):
            result = await self.dispatcher.submit(_chat_job(messages, options))
        reply = shortcuts.Reply("chat", result.text, result.finish_reason, result.usage)
        self._answered(reply, started)
        return reply

    async def stream_chat(self, messages: Chat, options: Options) -> AsyncIterator[Piece]:
        started = time.monotonic()
        with self.dispatcher.admission(1):
            async for piece in self._stream_job(0, _chat_job(messages, options), "chat", started):
                yield piece

    async def _plans(self, prompts: list[str], options: Options) -> list[shortcuts.Plan]:
        plans = await self.planner.plan_all(prompts, options.max_tokens)
        return [shortcuts.with_decoding(plan, options.decoding) for plan in plans]

    async def _stream_plan(
        self, index: int, plan: shortcuts.Plan, started: float
    ) -> AsyncIterator[Piece]:
        if isinstance(plan, shortcuts.Generate) and plan.fallback is None:
            async for piece in self._stream_job(index, plan.job, plan.task, started):
                yield piece
        else:
            reply = await self._reply(plan, started)
            yield Piece(index, reply.text, reply)

    async def _stream_job(
        self, index: int, job: GenerateJob, task: shortcuts.Task, started: float
    ) -> AsyncIterator[Piece]:
        """A shaped turn's text is stripped as `plan.reply` strips it (leading and trailing
        whitespace held back), so the pieces add up to the unstreamed text."""
        shaped = task != "chat"
        raw = sent = ""
        async for message in self.dispatcher.stream(replace(job, stream=True)):
            if isinstance(message, Delta):
                raw += message.text
                shown = raw.strip() if shaped else raw
                if len(shown) > len(sent):
                    yield Piece(index, shown[len(sent) :])
                    sent = shown
                continue
            text = strip_think(message.text) if shaped else message.text
            reply = shortcuts.Reply(task, text, message.finish_reason, message.usage)
            self._answered(reply, started)
            yield Piece(index, text.removeprefix(sent) if text.startswith(sent) else "", reply)

    async def _reply(self, plan: shortcuts.Plan, started: float) -> shortcuts.Reply:
        try:
            reply = await plan.reply(self.dispatcher.submit)
        except Exception:
            self._prompts.labels(task=plan.task, status="error").inc()
            raise
        self._answered(reply, started)
        return reply

    def _answered(self, reply: shortcuts.Reply, started: float) -> None:
        self._prompts.labels(task=reply.task, status="ok").inc()
        self._latency.labels(task=reply.task).observe(time.monotonic() - started)
        self._tokens_in.inc(reply.usage.prompt_tokens)
        self._tokens_out.inc(reply.usage.completion_tokens)


def _chat_job(messages: Chat, options: Options) -> GenerateJob:
    return GenerateJob(messages, options.max_tokens or CHAT_MAX_TOKENS, options.decoding)
