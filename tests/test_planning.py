"""A request's planning takes a bounded share of the event loop: it yields between prompts, and
past the per-request budget (or for a long prompt) the planning goes to the worker processes.
Plans made there are the same plans; the loop never stalls for 0.1 s or more."""

from __future__ import annotations

import asyncio
import time

import shortcuts
from loadtest.solver_timing import worst_cases
from queueing.metrics import Metrics
from queueing.planning import INLINE_PROMPT_CHARS, REQUEST_BUDGET_S, Planner
from tests.loop_gaps import worst_loop_gap
from tests.prometheus_text import sample

STALL_BAR_S = 0.1


def plan_request(prompts: list[str], timeout: float = 60) -> tuple[list, float, str]:
    """Plans, worst loop gap and the metrics text, from a fresh planner with its workers."""
    metrics = Metrics()
    planner = Planner("throughput", timeout, metrics)

    async def main() -> tuple[list, float]:
        planner.pool.start()
        try:
            await planner.pool.call(60, "warm up", "throughput")  # workers booted
            return await worst_loop_gap(planner.plan_all(prompts))
        finally:
            planner.pool.close()

    plans, gap = asyncio.run(main())
    return plans, gap, metrics.render()


def slowest_graph() -> str:
    """The graph prompt the solver takes longest on, at its caps (tens of ms)."""
    label, prompt = next((label, p) for label, p in worst_cases() if "edges=500" in label)
    started = time.perf_counter()
    assert isinstance(shortcuts.plan(prompt, "throughput"), shortcuts.Answer), label
    assert time.perf_counter() - started > REQUEST_BUDGET_S / 4, "no longer a slow graph"
    return prompt


def test_a_request_of_many_slow_graphs_never_stalls_the_loop():
    """The issue's case: 200 such prompts planned back to back held the loop for seconds."""
    prompt = slowest_graph()
    expected = shortcuts.plan(prompt, "throughput")
    plans, gap, metrics = plan_request([prompt] * 40)
    assert gap < STALL_BAR_S, f"the loop stalled for {gap:.3f} s"
    assert plans == [expected] * 40, "plans made in a worker must equal inline ones"
    assert sample(metrics, "plan_offloaded_total", reason="request_budget") >= 30, metrics


def test_a_long_prompt_plans_in_a_worker_and_gives_the_same_plan():
    prompt = "Write a poem about the sea. " * (INLINE_PROMPT_CHARS // 28 + 1)
    assert len(prompt) > INLINE_PROMPT_CHARS
    plans, _, metrics = plan_request([prompt, "Hi"])
    assert plans == [shortcuts.plan(p, "throughput") for p in (prompt, "Hi")]
    assert sample(metrics, "plan_offloaded_total", reason="prompt_size") == 1
    assert "plan_fallback_total{" not in metrics


def test_a_megabyte_of_crafted_prompts_never_stalls_the_loop():
    """Prompts at the inline limit, of the shapes that used to backtrack."""
    shapes = ["Choices:" + "\nA. x" * 4000, "Instruction:" + "\n Question:" * 1800]
    prompts = [shape[:INLINE_PROMPT_CHARS] for shape in shapes] * 32
    plans, gap, _ = plan_request(prompts)
    assert gap < STALL_BAR_S, f"the loop stalled for {gap:.3f} s"
    assert len(plans) == len(prompts)


def test_a_plan_past_the_timeout_falls_back_to_the_model():
    huge = "You are given a directed graph with 100 nodes. " + "0 -> 1, weight: 1\n" * 400_000
    plans, _, metrics = plan_request([huge], timeout=0.05)
    assert plans == [shortcuts.plan_unshaped(huge, "throughput")]
    assert sample(metrics, "plan_fallback_total", reason="timeout") == 1
    assert sample(metrics, "planner_workers_killed_total") == 1


def test_a_graph_the_solver_cannot_take_is_counted_and_capped_by_the_client():
    unparsable = (
        "You are given a directed graph with 3 nodes and the following edges:\n"
        "0 -> 1, weight: -4\n1 -> 2, weight: 1\nFind the top 2 shortest paths from node 0 to node 2."
    )
    metrics = Metrics()
    planner = Planner("throughput", 60, metrics)  # plans inline: no worker starts
    [plan] = asyncio.run(planner.plan_all([unparsable], max_tokens=7))
    assert isinstance(plan, shortcuts.UnsolvedGraph) and plan.max_tokens == 7
    assert sample(metrics.render(), "graph_unsolved_total") == 1
