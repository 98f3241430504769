"""A request's prompts, HTTP aside: admitted, planned, answered concurrently, gathered in order.

The HTTP layer (server.py) validates and renders; this is the path in between. Each prompt is
planned once (queueing.planning) and its plan replies by itself (shortcuts.plans), calling the
dispatcher as its model as often as it needs.
"""

from __future__ import annotations

import asyncio
import time

import shortcuts
from queueing.dispatcher import Dispatcher
from queueing.metrics import Metrics
from queueing.planning import Planner
from replica.worker import ReplicaSpec

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

    async def complete(self, prompts: list[str], max_tokens: int | None) -> list[shortcuts.Reply]:
        """Replies in prompt order. Planning takes a bounded share of the loop; the prompts are
        then answered concurrently, and one failure cancels the rest."""
        started = time.monotonic()
        with self.dispatcher.admission(len(prompts)):
            plans = await self.planner.plan_all(prompts, max_tokens)
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(self._reply(plan, started)) for plan in plans]
            except ExceptionGroup as failures:
                raise failures.exceptions[0] from None
        return [task.result() for task in tasks]

    async def _reply(self, plan: shortcuts.Plan, started: float) -> shortcuts.Reply:
        try:
            reply = await plan.reply(self.dispatcher.submit)
        except Exception:
            self._prompts.labels(task=plan.task, status="error").inc()
            raise
        self._prompts.labels(task=plan.task, status="ok").inc()
        self._latency.labels(task=plan.task).observe(time.monotonic() - started)
        self._tokens_in.inc(reply.usage.prompt_tokens)
        self._tokens_out.inc(reply.usage.completion_tokens)
        return reply
