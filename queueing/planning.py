"""Plan a request's prompts (route, parse, solve) within a CPU budget on the event loop.

Parsing is linear and the graph solver is capped, so one prompt of up to INLINE_PROMPT_CHARS
plans inline in a few ms (tens at the solver's caps): any hop to a process would cost graph-only
throughput a quarter or more. A request is another matter (hundreds of prompts, megabytes), so:
the loop yields between two prompts; a longer prompt, and every prompt of a request once its
inline planning has used REQUEST_BUDGET_S, plans in a worker process (planner_pool), which is
killed past `timeout`. Whatever fails or times out goes to the model as an open prompt.
Planning outcomes are counted here: fallbacks, offloads and graphs the solver could not take.
"""

from __future__ import annotations

import asyncio
import logging
import time

import shortcuts
from queueing.metrics import Metrics
from queueing.planner_pool import PlannerPool

log = logging.getLogger(__name__)

PLANNER_PROCESSES = 2
INLINE_PROMPT_CHARS = 16_384  # dev prompts reach 4.7k chars
REQUEST_BUDGET_S = 0.05  # inline planning per request; a dev request of 8 prompts uses ~1 ms


class Planner:
    """Owns the planner workers; `plan_all` never raises for a prompt (it falls back instead)."""

    def __init__(self, profile: str, timeout: float, metrics: Metrics) -> None:
        self.profile = profile
        self.timeout = timeout
        self.pool = PlannerPool(PLANNER_PROCESSES, shortcuts.plan, metrics)
        self._fallbacks = metrics.counter(
            "plan_fallback_total",
            "Prompts sent to the model as open after planning failed.",
            ["reason"],
        )
        self._offloaded = metrics.counter(
            "plan_offloaded_total", "Prompts planned in a worker process, by why.", ["reason"]
        )
        self._unsolved = metrics.counter(
            "graph_unsolved_total",
            "Graph-like prompts the solver could not take (unparsable, or over its caps).",
        )

    async def plan_all(
        self, prompts: list[str], max_tokens: int | None = None
    ) -> list[shortcuts.Plan]:
        """Plans in prompt order (`max_tokens`: the client's cap); the loop is never held for
        more than one inline prompt."""
        plans: list[shortcuts.Plan | asyncio.Task[shortcuts.Plan]] = []
        spent = 0.0
        async with asyncio.TaskGroup() as offloaded:
            for index, prompt in enumerate(prompts):
                reason = self._offload_reason(prompt, spent)
                if reason is not None:
                    self._offloaded.labels(reason=reason).inc()
                    plans.append(offloaded.create_task(self.in_worker(prompt, max_tokens)))
                    continue
                started = time.perf_counter()
                plans.append(self.inline(prompt, max_tokens))
                spent += time.perf_counter() - started
                if index + 1 < len(prompts):
                    await asyncio.sleep(0)  # other clients' I/O runs between two prompts
        done = [p.result() if isinstance(p, asyncio.Task) else p for p in plans]
        self._count_unsolved(done)
        return done

    def _count_unsolved(self, plans: list[shortcuts.Plan]) -> None:
        for plan in plans:
            if isinstance(plan, shortcuts.UnsolvedGraph):
                log.warning("graph-like prompt did not parse; sending it to the model")
                self._unsolved.inc()

    @staticmethod
    def _offload_reason(prompt: str, spent: float) -> str | None:
        if len(prompt) > INLINE_PROMPT_CHARS:
            return "prompt_size"
        if spent >= REQUEST_BUDGET_S:
            return "request_budget"
        return None

    def inline(self, prompt: str, max_tokens: int | None) -> shortcuts.Plan:
        try:
            return shortcuts.plan(prompt, self.profile, max_tokens)
        except Exception:
            log.exception("planning failed; the model answers instead")
            return self._fallback(prompt, max_tokens, "error")

    async def in_worker(self, prompt: str, max_tokens: int | None) -> shortcuts.Plan:
        """Plan in a worker; past the timeout (queueing included) the worker is killed."""
        try:
            return await self.pool.call(self.timeout, prompt, self.profile, max_tokens)
        except TimeoutError:
            log.warning("planning took over %.1f s; the model answers instead", self.timeout)
            return self._fallback(prompt, max_tokens, "timeout")
        except Exception:
            log.exception("planning in a worker failed; the model answers instead")
            return self._fallback(prompt, max_tokens, "error")

    def _fallback(self, prompt: str, max_tokens: int | None, reason: str) -> shortcuts.Generate:
        self._fallbacks.labels(reason=reason).inc()
        return shortcuts.plan_unshaped(prompt, self.profile, max_tokens)
