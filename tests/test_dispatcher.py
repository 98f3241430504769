"""Dispatcher logic without processes: replica links run on a fake transport."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import signal
import time
from typing import Any

import pytest

from queueing.dispatcher import MAX_FAILED_STARTS, Dispatcher, NoReplica, Overloaded, ReplicaError
from queueing.metrics import Metrics
from queueing.replica_link import ReplicaLink, ReplicaState
from replica.protocol import FrameDecoder
from replica.worker import ReplicaSpec


class FakeTransport:
    """Collects what the dispatcher sends to a replica."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self.sent: list[dict[str, Any]] = []

    def write(self, data: bytes) -> None:
        self.sent += self.decoder.feed(data)


class FakeProcess:
    """Stands in for a replica's process: running until killed."""

    pid = 0

    def __init__(self) -> None:
        self.exitcode: int | None = None

    def is_alive(self) -> bool:
        return self.exitcode is None

    def join(self, timeout: float | None = None) -> None:
        pass

    def kill(self) -> None:
        self.exitcode = -signal.SIGKILL


@pytest.fixture(autouse=True)
def no_processes(monkeypatch):
    async def start(link: ReplicaLink) -> None:
        link.state = ReplicaState.LOADING
        link.restarts += 1
        link._transport = FakeTransport()
        link._process = FakeProcess()

    monkeypatch.setattr(ReplicaLink, "start", start)


def dispatcher(replicas: int, max_in_flight: int = 64) -> Dispatcher:
    return Dispatcher([ReplicaSpec("tiny-random")] * replicas, Metrics(), max_in_flight)


def become_ready(link: ReplicaLink) -> None:
    link._received({"op": "ready", "info": {"pid": 0}})


def die(link: ReplicaLink) -> None:
    """The process exits, then (later, on the loop) its socket's close is read."""
    link._process.kill()
    link._died()


def test_least_outstanding_work_picks_the_less_loaded_replica():
    async def scenario() -> list[int]:
        d = dispatcher(2)
        await d.start()
        for link in d.links:
            become_ready(link)
        tasks = []
        for work in (1000, 10, 10):  # round-robin would send the third to replica 0
            tasks.append(asyncio.create_task(d.submit({"op": "generate"}, work)))
            await asyncio.sleep(0)
        placed = [job.link.index for job in d.jobs.values()]
        assert [link.outstanding for link in d.links] == [1000, 20]
        for task in tasks:
            task.cancel()
        return placed

    assert asyncio.run(scenario()) == [0, 1, 1]


def test_backlog_fails_once_every_replica_gave_up_starting():
    async def scenario() -> None:
        d = dispatcher(1)
        await d.start()
        waiting = asyncio.create_task(d.submit({"op": "generate"}, 10))
        await asyncio.sleep(0)
        assert len(d.backlog) == 1
        link = d.links[0]
        for _ in range(MAX_FAILED_STARTS):
            die(link)  # died while loading
            await asyncio.sleep(0)  # let the restart (if any) run
        assert link.state is ReplicaState.DEAD and link.restarts == MAX_FAILED_STARTS - 1
        with pytest.raises(NoReplica):
            await asyncio.wait_for(waiting, 1)
        assert not d.backlog and not d.jobs

    asyncio.run(scenario())


def test_backlog_keeps_waiting_while_a_replica_restarts():
    async def scenario() -> None:
        d = dispatcher(1)
        await d.start()
        waiting = asyncio.create_task(d.submit({"op": "generate"}, 10))
        await asyncio.sleep(0)
        die(d.links[0])
        assert d.links[0].state is ReplicaState.LOADING  # counted as loading at once
        await asyncio.sleep(0)
        become_ready(d.links[0])
        await asyncio.sleep(0)
        [sent] = d.links[0]._transport.sent
        d._on_message(d.links[0], {"op": "result", "id": sent["id"], "text": "ok"})
        assert (await waiting)["text"] == "ok"

    asyncio.run(scenario())


def test_admission_is_reserved_before_any_job_exists():
    d = dispatcher(1, max_in_flight=4)
    with d.admission(3):
        assert not d.jobs
        with pytest.raises(Overloaded), d.admission(2):
            pass
        with d.admission(1):
            assert d.admitted == 4
    assert d.admitted == 0
    with pytest.raises(RuntimeError), d.admission(4):
        raise RuntimeError  # released on any exit
    assert d.admitted == 0


def test_no_restart_while_closing_and_orphans_move_to_a_live_replica():
    async def scenario() -> None:
        d = dispatcher(2)
        await d.start()
        for link in d.links:
            become_ready(link)
        task = asyncio.create_task(d.submit({"op": "generate"}, 10))
        await asyncio.sleep(0)
        [job] = d.jobs.values()
        assert job.link is d.links[0]
        d.begin_shutdown()
        die(d.links[0])
        await asyncio.sleep(0)
        assert d.links[0].state is ReplicaState.DEAD and d.links[0].restarts == 0
        assert job.link is d.links[1]
        d._on_message(d.links[1], {"op": "result", "id": job.message["id"], "text": "ok"})
        assert (await task)["text"] == "ok"

    asyncio.run(scenario())


def _stubborn_replica(ignoring) -> None:
    """Like a replica that is still loading: ignores SIGTERM and does not read its socket."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ignoring.set()
    time.sleep(120)


def test_stop_kills_a_replica_that_does_not_exit():
    context = mp.get_context("spawn")
    ignoring = context.Event()
    process = context.Process(target=_stubborn_replica, args=(ignoring,), daemon=True)
    process.start()
    assert ignoring.wait(60)
    process.terminate()  # what multiprocessing's exit hook would try: ignored
    time.sleep(0.2)
    assert process.is_alive()

    async def scenario() -> None:
        d = dispatcher(1)
        await d.start()
        d.links[0]._process = process
        become_ready(d.links[0])  # but stuck: it never reads "shutdown"
        started = time.monotonic()
        await d.stop(grace=0.2)
        assert time.monotonic() - started < 5

    asyncio.run(scenario())
    process.join(5)
    assert process.exitcode == -signal.SIGKILL


async def ready_dispatcher(replicas: int) -> Dispatcher:
    d = dispatcher(replicas)
    await d.start()
    for link in d.links:
        become_ready(link)
    return d


def test_a_replica_dead_but_not_yet_noticed_gets_no_work():
    async def scenario() -> None:
        d = await ready_dispatcher(2)
        d.links[0]._process.kill()  # its socket's close is not read yet: still READY
        assert d.links[0].state is ReplicaState.READY and not d.links[0].serving
        task = asyncio.create_task(d.submit({"op": "generate"}, 10))
        await asyncio.sleep(0)
        [job] = d.jobs.values()
        assert job.link is d.links[1] and not d.links[0]._transport.sent
        task.cancel()

    asyncio.run(scenario())


def test_both_replicas_dying_is_a_503_not_a_crash_of_the_request():
    """Replica 1 died a moment before replica 0's death is handled: the request must not be
    re-sent to it (and then blamed for killing two replicas); no replica can take it."""

    async def scenario() -> None:
        d = await ready_dispatcher(2)
        task = asyncio.create_task(d.submit({"op": "generate"}, 10))
        await asyncio.sleep(0)
        [job] = d.jobs.values()
        first, other = job.link, d.links[1 - job.link.index]
        other._process.kill()
        die(first)
        with pytest.raises(NoReplica):
            await asyncio.wait_for(task, 1)
        assert not other._transport.sent
        assert "retried_total" not in d.metrics.render()

    asyncio.run(scenario())


def test_a_request_that_crashes_two_live_replicas_fails_while_others_serve():
    async def scenario() -> None:
        d = await ready_dispatcher(3)
        task = asyncio.create_task(d.submit({"op": "generate"}, 10))
        await asyncio.sleep(0)
        [job] = d.jobs.values()
        die(job.link)  # it ran there: one crash, then re-sent to a live replica
        assert job.link is not None and job.link.serving
        die(job.link)  # a second replica it ran on died too: it is the likely cause
        with pytest.raises(ReplicaError, match="twice"):
            await asyncio.wait_for(task, 1)
        assert sum(link.serving for link in d.links) == 1

    asyncio.run(scenario())
