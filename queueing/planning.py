"""Plan a request's prompts (route, parse, solve) within a CPU budget on the event loop.

Parsing is linear and the graph solver is capped, so one prompt of up to INLINE_PROMPT_CHARS
plans inline in a few ms (tens at the solver's caps): any hop to a process would cost graph-only
throughput a quarter or more. A request is another matter (hundreds of prompts, megabytes), so:
the loop yields between two prompts; a longer prompt, and every prompt of a request once its
inline planning has used REQUEST_BUDGET_S, plans in a worker process (planner_pool), which is
killed past `timeout`. Whatever fails or times out goes to the model as an open prompt.
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
FALLBACK, FALLBACK_HELP = (
    "plan_fallback_total",
    "Prompts sent to the model as open after planning failed.",
)
OFFLOADED, OFFLOADED_HELP = "plan_offloaded_total", "Prompts planned in a worker process, by why."


class Planner:
    """Owns the planner workers; `plan_all` never raises for a prompt (it falls back instead)."""

    def __init__(self, profile: str, timeout: float, metrics: Metrics) -> None:
        self.profile = profile
        self.timeout = timeout
        self.metrics = metrics
        self.pool = PlannerPool(PLANNER_PROCESSES, shortcuts.plan, metrics)

    async def plan_all(self, prompts: list[str]) -> list[shortcuts.Plan]:
        """Plans in prompt order; the loop is never held for more than one inline prompt."""
        plans: list[shortcuts.Plan | asyncio.Task[shortcuts.Plan]] = []
        spent = 0.0
        async with asyncio.TaskGroup() as offloaded:
            for index, prompt in enumerate(prompts):
                reason = self._offload_reason(prompt, spent)
                if reason is not None:
                    self.metrics.inc(OFFLOADED, OFFLOADED_HELP, reason=reason)
                    plans.append(offloaded.create_task(self.in_worker(prompt)))
                    continue
                started = time.perf_counter()
                plans.append(self.inline(prompt))
                spent += time.perf_counter() - started
                if index + 1 < len(prompts):
                    await asyncio.sleep(0)  # other clients' I/O runs between two prompts
        return [p.result() if isinstance(p, asyncio.Task) else p for p in plans]

    @staticmethod
    def _offload_reason(prompt: str, spent: float) -> str | None:
        if len(prompt) > INLINE_PROMPT_CHARS:
            return "prompt_size"
        if spent >= REQUEST_BUDGET_S:
            return "request_budget"
        return None

    def inline(self, prompt: str) -> shortcuts.Plan:
        try:
            return shortcuts.plan(prompt, self.profile)
        except Exception:
            log.exception("planning failed; the model answers instead")
            return self._fallback(prompt, "error")

    async def in_worker(self, prompt: str) -> shortcuts.Plan:
        """Plan in a worker; past the timeout (queueing included) the worker is killed."""
        try:
            return await self.pool.call(self.timeout, prompt, self.profile)
        except TimeoutError:
            log.warning("planning took over %.1f s; the model answers instead", self.timeout)
            return self._fallback(prompt, "timeout")
        except Exception:
            log.exception("planning in a worker failed; the model answers instead")
            return self._fallback(prompt, "error")

    def _fallback(self, prompt: str, reason: str) -> shortcuts.Generate:
        self.metrics.inc(FALLBACK, FALLBACK_HELP, reason=reason)
        return shortcuts.plan_unshaped(prompt, self.profile)
