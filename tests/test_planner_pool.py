"""Planner workers: a call past its deadline or abandoned by its caller kills its worker and
starts a replacement; a failing call keeps it; close() kills busy workers at once."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable

import pytest

from queueing.metrics import Metrics
from queueing.planner_pool import CallFailed, PlannerPool, WorkerDied
from tests import planner_functions as work
from tests.prometheus_text import sample
from tests.server_process import is_running

BOOT_S = 30  # a spawned worker imports this package before it answers


def pid_gone(pid: int, within: float = 5) -> bool:
    deadline = time.monotonic() + within
    while is_running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def with_pool(
    scenario: Callable[[PlannerPool], Awaitable[None]],
    size: int = 1,
    metrics: Metrics | None = None,
) -> PlannerPool:
    """Run `scenario` against a started pool of `size` workers; the pool is closed after."""
    pool = PlannerPool(size, work.spin, metrics or Metrics())

    async def main() -> None:
        pool.start()
        try:
            await scenario(pool)
        finally:
            pool.close()

    asyncio.run(main())
    return pool


async def worker_pid(pool: PlannerPool) -> int:
    pool.function = work.pid_of_worker  # each worker was given its function when spawned
    return await pool.call(BOOT_S)


def killed(metrics: Metrics) -> float:
    return sample(metrics.render(), "planner_workers_killed_total")


def test_a_call_past_its_deadline_kills_the_worker_and_a_fresh_one_serves():
    metrics = Metrics()

    async def scenario(pool: PlannerPool) -> None:
        first = await pool.call(BOOT_S, 0.0)  # booted and answering
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await pool.call(0.3, 60.0)
        assert time.monotonic() - started < 1.5
        assert pid_gone(first), "the runaway worker must be killed, not left spinning"
        second = await pool.call(BOOT_S, 0.0)
        assert second != first
        assert killed(metrics) == 1

    with_pool(scenario, metrics=metrics)


def test_a_caller_that_goes_away_does_not_leave_its_worker_spinning():
    async def scenario(pool: PlannerPool) -> None:
        first = await pool.call(BOOT_S, 0.0)
        call = asyncio.create_task(pool.call(BOOT_S, 60.0))
        await asyncio.sleep(0.3)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert pid_gone(first)
        assert await pool.call(BOOT_S, 0.0) != first

    with_pool(scenario)


def test_a_failing_call_keeps_its_worker():
    metrics = Metrics()
    pool = PlannerPool(1, work.fail, metrics)

    async def scenario() -> None:
        pool.start()
        try:
            with pytest.raises(CallFailed, match="ValueError: no plan"):
                await pool.call(BOOT_S, "no plan")
            [worker] = pool._idle
            with pytest.raises(CallFailed):
                await pool.call(BOOT_S, "again")
            assert pool._idle == [worker] and worker.process.is_alive()
        finally:
            pool.close()

    asyncio.run(scenario())
    assert killed(metrics) == 0


def test_a_worker_killed_from_outside_is_replaced():
    async def scenario(pool: PlannerPool) -> None:
        first = await pool.call(BOOT_S, 0.0)
        os.kill(first, signal.SIGKILL)
        assert pid_gone(first)
        with pytest.raises(WorkerDied):
            await pool.call(BOOT_S, 0.0)
        assert await pool.call(BOOT_S, 0.0) != first

    with_pool(scenario)


def test_close_kills_busy_workers_at_once():
    pids: list[int] = []

    async def scenario(pool: PlannerPool) -> None:
        pids.extend(await asyncio.gather(pool.call(BOOT_S, 0.0), pool.call(BOOT_S, 0.0)))
        busy = [asyncio.create_task(pool.call(BOOT_S, 60.0)) for _ in range(2)]
        await asyncio.sleep(0.3)
        started = time.monotonic()
        pool.close()
        assert time.monotonic() - started < 2
        for call in busy:
            with pytest.raises((WorkerDied, asyncio.CancelledError)):
                await call

    with_pool(scenario, size=2)
    assert len(set(pids)) == 2 and all(pid_gone(pid, within=1) for pid in pids)


def test_calls_queue_for_a_free_worker_within_their_deadline():
    metrics = Metrics()

    async def scenario(pool: PlannerPool) -> None:
        pid = await pool.call(BOOT_S, 0.0)
        started = time.monotonic()
        pids = await asyncio.gather(*[pool.call(BOOT_S, 0.2) for _ in range(3)])
        assert pids == [pid] * 3 and time.monotonic() - started >= 0.6  # one at a time
        running = asyncio.create_task(pool.call(BOOT_S, 0.5))
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):  # waited for the busy worker and ran out
            await pool.call(0.2, 0.0)
        assert await running == pid  # a call that timed out in the queue kills nothing
        assert killed(metrics) == 0

    with_pool(scenario, metrics=metrics)
