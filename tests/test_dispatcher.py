"""The dispatcher and its replica links without processes: a fake replica drives each link's
asyncio protocol as a real replica's socket would, and collects what the link sends."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import signal
import time
from typing import Any

import pytest

from queueing import replica_link
from queueing.dispatcher import Dispatcher, NoReplica, Overloaded, ReplicaError
from queueing.metrics import Metrics
from queueing.replica_link import MAX_FAILED_STARTS, ReplicaState
from replica.wire.framing import FrameDecoder, encode_frame
from replica.wire.messages import (
    Cancel,
    Cancelled,
    Failed,
    GenerateJob,
    KVUsage,
    Ready,
    Request,
    Result,
    Shutdown,
    Usage,
)
from replica.wire.spec import ReplicaSpec
from tests.prometheus_text import sample

JOB = GenerateJob([{"role": "user", "content": "Hi"}], 10)


class FakeTransport:
    """Collects what the dispatcher sends to a replica."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self.sent: list[Any] = []

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


class FakeReplica:
    """The latest process launched for one link, driven through the link's asyncio protocol
    as a real replica's socket would drive it."""

    def __init__(self, protocol: asyncio.Protocol, process: Any) -> None:
        self.protocol = protocol
        self.process = process
        self.transport = FakeTransport()

    @property
    def sent(self) -> list[Any]:
        return self.transport.sent

    def says(self, message: Any) -> None:
        self.protocol.data_received(encode_frame(message))

    def become_ready(self) -> None:
        self.says(Ready({"pid": 0}))

    def answer(self, request: Request, text: str = "ok") -> None:
        self.says(Result(request.id, text, "stop", Usage(1, 1)))

    def die(self) -> None:
        """The process exits, then (later, on the loop) its socket's close is read."""
        self.process.kill()
        self.protocol.connection_lost(None)


class Replicas(dict[int, FakeReplica]):
    """Link index -> its latest FakeReplica; `process` is what the next launch runs."""

    process: Any = None


@pytest.fixture(autouse=True)
def replicas(monkeypatch) -> Replicas:
    launched = Replicas()

    async def launch(spec: ReplicaSpec, name: str, protocol: asyncio.Protocol):
        index = int(name.rsplit("-", 1)[1])
        launched[index] = FakeReplica(protocol, launched.process or FakeProcess())
        return launched[index].process, launched[index].transport

    monkeypatch.setattr(replica_link, "launch", launch)
    return launched


def dispatcher(replicas: int, max_in_flight: int = 64, metrics: Metrics | None = None):
    specs = [ReplicaSpec("tiny-random")] * replicas
    return Dispatcher(specs, metrics or Metrics(), max_in_flight)


def with_work(work: int) -> GenerateJob:
    """A job whose estimated work is `work` tokens (its prompt is empty)."""
    return GenerateJob([{"role": "user", "content": ""}], work)


async def ready_dispatcher(replicas: Replicas, count: int, **options: Any) -> Dispatcher:
    d = dispatcher(count, **options)
    await d.start()
    for index in range(count):
        replicas[index].become_ready()
    return d


def test_least_outstanding_work_picks_the_less_loaded_replica(replicas):
    async def scenario() -> list[int]:
        d = await ready_dispatcher(replicas, 2)
        tasks = []
        for work in (1000, 10, 10):  # round-robin would send the third to replica 0
            tasks.append(asyncio.create_task(d.submit(with_work(work))))
            await asyncio.sleep(0)
        placed = [d.link_of(request_id).index for request_id in d.pending]
        assert [link.outstanding for link in d.links] == [1000, 20]
        assert [link.in_flight for link in d.links] == [1, 2]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert [link.outstanding for link in d.links] == [0, 0]
        return placed

    assert asyncio.run(scenario()) == [0, 1, 1]


def test_a_result_resolves_its_request_and_a_refusal_raises(replicas):
    async def scenario() -> None:
        d = await ready_dispatcher(replicas, 1)
        answered = asyncio.create_task(d.submit(JOB))
        refused = asyncio.create_task(d.submit(JOB))
        await asyncio.sleep(0)
        first, second = replicas[0].sent
        assert first == Request(first.id, JOB) and second.id != first.id
        replicas[0].answer(first, "hello")
        replicas[0].says(Failed(second.id, 400, "too long", "prompt", "context_length_exceeded"))
        assert (await answered) == Result(first.id, "hello", "stop", Usage(1, 1))
        with pytest.raises(ReplicaError) as refusal:
            await refused
        assert (refusal.value.status, refusal.value.param) == (400, "prompt")
        assert not d.pending and d.links[0].outstanding == 0

    asyncio.run(scenario())


def test_the_kv_pool_each_result_reports_is_a_gauge_per_replica(replicas):
    async def scenario() -> None:
        metrics = Metrics()
        d = await ready_dispatcher(replicas, 2, metrics=metrics)
        assert "kv_blocks_free{" not in metrics.render()  # nothing reported yet
        task = asyncio.create_task(d.submit(JOB))
        await asyncio.sleep(0)
        index = d.link_of(next(iter(d.pending))).index
        [request] = replicas[index].sent
        kv = KVUsage(100, 60, 25, 400, 100)
        replicas[index].says(Result(request.id, "ok", "stop", Usage(1, 1), kv=kv))
        await task
        text = metrics.render()
        assert sample(text, "kv_blocks_free", replica=str(index)) == 60
        assert sample(text, "kv_blocks_cached", replica=str(index)) == 25
        assert sample(text, "prefix_cache_hit_rate", replica=str(index)) == 0.25
        assert f'kv_blocks_free{{replica="{1 - index}"}}' not in text

    asyncio.run(scenario())


def test_a_cancelled_request_is_cancelled_on_its_replica(replicas):
    async def scenario() -> None:
        metrics = Metrics()
        d = await ready_dispatcher(replicas, 1, metrics=metrics)
        task = asyncio.create_task(d.submit(JOB))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        [request, cancel] = replicas[0].sent
        assert cancel == Cancel(request.id) and d.links[0].in_flight == 0
        replicas[0].says(Cancelled(request.id))
        text = metrics.render()
        assert sample(text, "cancelled_total") == sample(text, "replica_cancelled_total") == 1

    asyncio.run(scenario())


def test_backlog_fails_once_every_replica_gave_up_starting(replicas):
    async def scenario() -> None:
        d = dispatcher(1)
        await d.start()
        waiting = asyncio.create_task(d.submit(JOB))
        await asyncio.sleep(0)
        assert len(d.backlog) == 1
        link = d.links[0]
        for _ in range(MAX_FAILED_STARTS):
            replicas[0].die()  # died while loading
            await asyncio.sleep(0)  # let the restart (if any) run
        assert link.state is ReplicaState.DEAD and link.restarts == MAX_FAILED_STARTS - 1
        assert not link.may_restart
        with pytest.raises(NoReplica):
            await asyncio.wait_for(waiting, 1)
        assert not d.backlog and not d.pending

    asyncio.run(scenario())


def test_backlog_keeps_waiting_while_a_replica_restarts(replicas):
    async def scenario() -> None:
        d = dispatcher(1)
        await d.start()
        assert d.links[0].state is ReplicaState.LOADING
        waiting = asyncio.create_task(d.submit(JOB))
        await asyncio.sleep(0)
        replicas[0].die()
        assert d.links[0].state is ReplicaState.RESTARTING  # at once, before the spawn
        assert d.report()["status"] == "loading"
        await asyncio.sleep(0)
        replicas[0].become_ready()
        await asyncio.sleep(0)
        assert d.links[0].state is ReplicaState.READY and d.links[0].restarts == 1
        [sent] = replicas[0].sent
        replicas[0].answer(sent)
        assert (await waiting).text == "ok"

    asyncio.run(scenario())


def test_a_restart_that_cannot_spawn_leaves_the_replica_dead_for_good(replicas, monkeypatch):
    async def scenario() -> None:
        d = await ready_dispatcher(replicas, 1)

        async def cannot_spawn(*args: Any) -> None:
            raise OSError("no more processes")

        monkeypatch.setattr(replica_link, "launch", cannot_spawn)
        replicas[0].die()
        await asyncio.sleep(0.01)
        link = d.links[0]
        assert link.state is ReplicaState.DEAD and not link.may_restart
        assert d.report()["status"] == "unavailable"

    asyncio.run(scenario())


def test_admission_is_reserved_before_any_job_exists():
    d = dispatcher(1, max_in_flight=4)
    with d.admission(3):
        assert not d.pending
        with pytest.raises(Overloaded), d.admission(2):
            pass
        with d.admission(1):
            assert d.admitted == 4
    assert d.admitted == 0
    with pytest.raises(RuntimeError), d.admission(4):
        raise RuntimeError  # released on any exit
    assert d.admitted == 0


def test_no_restart_while_closing_and_orphans_move_to_a_live_replica(replicas):
    async def scenario() -> None:
        d = await ready_dispatcher(replicas, 2)
        task = asyncio.create_task(d.submit(JOB))
        await asyncio.sleep(0)
        [request_id] = d.pending
        assert d.link_of(request_id) is d.links[0]
        d.begin_shutdown()
        replicas[0].die()
        await asyncio.sleep(0)
        assert d.links[0].state is ReplicaState.DEAD and d.links[0].restarts == 0
        assert d.link_of(request_id) is d.links[1]
        [resent] = replicas[1].sent
        replicas[1].answer(resent)
        assert (await task).text == "ok"

    asyncio.run(scenario())


def _stubborn_replica(ignoring) -> None:
    """Like a replica that is still loading: ignores SIGTERM and does not read its socket."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ignoring.set()
    time.sleep(120)


def test_stop_kills_a_replica_that_does_not_exit(replicas):
    context = mp.get_context("spawn")
    ignoring = context.Event()
    process = context.Process(target=_stubborn_replica, args=(ignoring,), daemon=True)
    process.start()
    assert ignoring.wait(60)
    process.terminate()  # what multiprocessing's exit hook would try: ignored
    time.sleep(0.2)
    assert process.is_alive()
    replicas.process = process

    async def scenario() -> None:
        d = await ready_dispatcher(replicas, 1)  # but stuck: it never reads Shutdown
        started = time.monotonic()
        await d.stop(grace=0.2)
        assert time.monotonic() - started < 5
        assert replicas[0].sent == [Shutdown()]

    asyncio.run(scenario())
    process.join(5)
    assert process.exitcode == -signal.SIGKILL


def test_a_replica_dead_but_not_yet_noticed_gets_no_work(replicas):
    async def scenario() -> None:
        d = await ready_dispatcher(replicas, 2)
        replicas[0].process.kill()  # its socket's close is not read yet: still READY
        assert d.links[0].state is ReplicaState.READY and not d.links[0].serving
        task = asyncio.create_task(d.submit(JOB))
        await asyncio.sleep(0)
        [request_id] = d.pending
        assert d.link_of(request_id) is d.links[1] and not replicas[0].sent
        task.cancel()

    asyncio.run(scenario())


def test_both_replicas_dying_is_a_503_not_a_crash_of_the_request(replicas):
    """Replica 1 died a moment before replica 0's death is handled: the request must not be
    re-sent to it (and then blamed for killing two replicas); no replica can take it."""

    async def scenario() -> None:
        metrics = Metrics()
        d = await ready_dispatcher(replicas, 2, metrics=metrics)
        task = asyncio.create_task(d.submit(JOB))
        await asyncio.sleep(0)
        [request_id] = d.pending
        first, other = d.link_of(request_id).index, 1 - d.link_of(request_id).index
        replicas[other].process.kill()
        replicas[first].die()
        with pytest.raises(NoReplica):
            await asyncio.wait_for(task, 1)
        assert not replicas[other].sent
        assert sample(metrics.render(), "retried_total") == 0

    asyncio.run(scenario())


def test_a_request_that_crashes_two_live_replicas_fails_while_others_serve(replicas):
    async def scenario() -> None:
        d = await ready_dispatcher(replicas, 3)
        task = asyncio.create_task(d.submit(JOB))
        await asyncio.sleep(0)
        [request_id] = d.pending
        replicas[
            d.link_of(request_id).index
        ].die()  # it ran there: one crash, then re-sent elsewhere
        assert d.link_of(request_id) is not None and d.link_of(request_id).serving
        replicas[
            d.link_of(request_id).index
        ].die()  # a second replica it ran on died: the likely cause
        with pytest.raises(ReplicaError, match="twice"):
            await asyncio.wait_for(task, 1)
        assert sum(link.serving for link in d.links) == 1

    asyncio.run(scenario())


def test_health_reports_each_replicas_state(replicas):
    async def scenario() -> None:
        d = await ready_dispatcher(replicas, 2)
        replicas[1].die()
        report = d.report()
        assert (report["status"], report["ready"]) == ("degraded", "some")
        assert [r["state"] for r in report["replicas"]] == ["ready", "restarting"]
        assert [r["restarts"] for r in report["replicas"]] == [0, 1]
        assert report["replicas"][0]["pid"] == 0 and "pid" in d.links[0].info

    asyncio.run(scenario())
