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
from queueing.dispatcher import Dispatcher
from queueing.metrics import Metrics
from queueing.options import Options
from queueing.planning import Planner
from queueing.streams import Piece, merged
from replica.wire.messages import Chat, Delta, GenerateJob, Result
from replica.wire.spec import ReplicaSpec
from shortcuts.text import strip_think

CHAT_MAX_TOKENS = (
    4096  # a chat's default cap (the replica also caps at the context its KV can hold)
)
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
        reasoning_budget: int | None = None,
        mcq_votes: int | None = None,
    ) -> None:
        """`reasoning_budget`: the thinking budget of a request that names none; `mcq_votes`:
        the thoughts a model that thinks samples for one reasoned MCQ (None: the profile's)."""
        self.dispatcher = Dispatcher(specs, metrics, max_in_flight)
        self.planner = Planner(profile, plan_timeout, metrics)
        limits = shortcuts.get_profile(profile)
        self.reasoning_budget = reasoning_budget or limits.reasoning_budget
        self.mcq_votes = mcq_votes or limits.mcq_votes
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
        """Replies in prompt order, `options.n` per prompt (choice i * n + j is prompt i's
        sample j, as OpenAI orders them). Planning takes a bounded share of the loop; the
        prompts are then answered concurrently, and one failure cancels the rest."""
        started = time.monotonic()
        with self.dispatcher.admission(len(prompts) * options.n):
            plans = await self._plans(prompts, options)
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [
                        group.create_task(self._replies(plan, options.n, started)) for plan in plans
                    ]
            except ExceptionGroup as failures:
                raise failures.exceptions[0] from None
        return [reply for task in tasks for reply in task.result()]

    async def stream(self, prompts: list[str], options: Options) -> AsyncIterator[Piece]:
        """The replies' text as it is generated, pieces of all prompts and samples interleaved.
        A plan that decodes one turn streams it; the others (a solved graph, a scored MCQ, a
        reasoning MCQ) arrive whole."""
        started = time.monotonic()
        n = options.n
        with self.dispatcher.admission(len(prompts) * n):
            plans = await self._plans(prompts, options)
            streams = [self._stream_plan(i * n, plan, n, started) for i, plan in enumerate(plans)]
            async for piece in merged(streams):
                yield piece

    async def chat(self, messages: Chat, options: Options) -> list[shortcuts.Reply]:
        """`options.n` assistant turns for the messages as given: no shaping, nothing added."""
        started = time.monotonic()
        with self.dispatcher.admission(options.n):
            result = await self.dispatcher.submit(self._chat_job(messages, options))
        replies = _replies_of(result, "chat")
        self._answered(replies, started)
        return replies

    async def stream_chat(self, messages: Chat, options: Options) -> AsyncIterator[Piece]:
        started = time.monotonic()
        with self.dispatcher.admission(options.n):
            job = self._chat_job(messages, options)
            async for piece in self._stream_job(0, job, "chat", started):
                yield piece

    def _chat_job(self, messages: Chat, options: Options) -> GenerateJob:
        """The messages as given. Without the client's cap, an answer gets CHAT_MAX_TOKENS
        and a thought (unless thinking is off) its budget on top."""
        reasoning = options.reasoning(self.reasoning_budget)
        thought = 0 if reasoning.enabled is False else reasoning.budget
        max_tokens = options.max_tokens or (CHAT_MAX_TOKENS + thought)
        return GenerateJob(messages, max_tokens, options.decoding, n=options.n, reasoning=reasoning)

    async def _plans(self, prompts: list[str], options: Options) -> list[shortcuts.Plan]:
        plans = await self.planner.plan_all(prompts, options.max_tokens)
        reasoning = options.reasoning(self.reasoning_budget)
        return [
            shortcuts.with_settings(plan, options.decoding, reasoning, self.mcq_votes)
            for plan in plans
        ]

    async def _stream_plan(
        self, first: int, plan: shortcuts.Plan, n: int, started: float
    ) -> AsyncIterator[Piece]:
        """The plan's n choices, numbered from `first`."""
        if isinstance(plan, shortcuts.Generate) and plan.fallback is None:
            async for piece in self._stream_job(first, plan.job(n), plan.task, started):
                yield piece
        else:
            for j, reply in enumerate(await self._replies(plan, n, started)):
                yield Piece(first + j, reply.text, reply)

    async def _stream_job(
        self, first: int, job: GenerateJob, task: shortcuts.Task, started: float
    ) -> AsyncIterator[Piece]:
        """Each sample's text, as choice `first` + its index. A shaped turn's text is stripped
        as `plan.replies` strips it (leading and trailing whitespace held back), so the pieces
        add up to the unstreamed text. Thought pieces go out as they come for chat; a
        completion's text is the answer alone, so a shaped turn drops them."""
        shaped = task != "chat"
        raw, sent = [""] * job.n, [""] * job.n
        async for message in self.dispatcher.stream(replace(job, stream=True)):
            if isinstance(message, Delta):
                j = message.sample
                if message.reasoning:
                    if not shaped:
                        yield Piece(first + j, message.text, reasoning=True)
                    continue
                raw[j] += message.text
                shown = raw[j].strip() if shaped else raw[j]
                if len(shown) > len(sent[j]):
                    yield Piece(first + j, shown[len(sent[j]) :])
                    sent[j] = shown
                continue
            replies = _replies_of(message, task)
            self._answered(replies, started)
            for j, reply in enumerate(replies):
                rest = reply.text.removeprefix(sent[j]) if reply.text.startswith(sent[j]) else ""
                yield Piece(first + j, rest, reply)

    async def _replies(self, plan: shortcuts.Plan, n: int, started: float) -> list[shortcuts.Reply]:
        try:
            replies = await plan.replies(self.dispatcher.submit, n)
        except Exception:
            self._prompts.labels(task=plan.task, status="error").inc()
            raise
        self._answered(replies, started)
        return replies

    def _answered(self, replies: list[shortcuts.Reply], started: float) -> None:
        """One prompt answered (its n replies)."""
        task = replies[0].task
        self._prompts.labels(task=task, status="ok").inc()
        self._latency.labels(task=task).observe(time.monotonic() - started)
        for reply in replies:
            self._tokens_in.inc(reply.usage.prompt_tokens)
            self._tokens_out.inc(reply.usage.completion_tokens)


def _replies_of(result: Result, task: shortcuts.Task) -> list[shortcuts.Reply]:
    """A decoded turn's replies: chat's as generated, with their thoughts; a shaped turn's
    stripped as `plan.replies` strips them (a completion's text is the answer alone)."""
    chat = task == "chat"
    replies = [
        shortcuts.Reply(
            task,
            s.text if chat else strip_think(s.text),
            s.finish_reason,
            reasoning=s.reasoning if chat else None,
        )
        for s in result.samples
    ]
    return shortcuts.carrying(replies, result.usage)
