"""Sends model requests to the replica with the least outstanding work and resolves futures.

Admission is bounded (beyond the bound: Overloaded) and reserved up front, so a burst cannot
overshoot it. A request waits while replicas load; if no replica is alive or loading it fails fast
(NoReplica), and so does the backlog once every replica has given up starting. A dead replica's
in-flight requests go to a live one and the replica is restarted (not while closing); with no
live replica left they fail fast with NoReplica too (a 503), never as a crash of theirs.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from queueing.metrics import Metrics
from queueing.replica_link import ReplicaLink, ReplicaState
from replica.wire.messages import (
    Cancelled,
    Delta,
    Failed,
    FromReplica,
    GenerateJob,
    Job,
    Ready,
    Request,
    Result,
)
from replica.wire.spec import ReplicaSpec

MAX_CRASHES = 2  # a request running on two replicas that died is failed, not retried forever
SHUTDOWN_GRACE_S = 5.0  # for replicas to exit after Shutdown (one engine step is enough)


class Overloaded(Exception):
    """More prompts in flight than the admission bound."""


class NoReplica(Exception):
    """No replica is alive or loading."""


class ReplicaError(Exception):
    """A request the replica refused or could not run; `param`/`code` follow OpenAI's errors."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code


def estimated_work(job: Job) -> int:
    """Tokens a job will cost, roughly, for load balancing (no tokenizer in the front end):
    its prompt at 4 characters a token, plus what its samples may generate."""
    prompt = sum(len(message["content"]) for message in job.messages) // 4
    return prompt + (job.max_tokens * job.n if isinstance(job, GenerateJob) else 0)


@dataclass
class _Pending:
    """A request until it is answered. Where it runs is its link's to know (ReplicaLink keeps
    the one map of what is in flight on each replica)."""

    request: Request
    work: int
    future: asyncio.Future[Result]
    crashes: int = 0  # replicas that died while it ran on them
    on_delta: Callable[[Delta], None] | None = None  # a streamed request's text as it grows
    streamed: bool = False  # some text went out: a retry elsewhere would repeat it


class Dispatcher:
    def __init__(self, specs: list[ReplicaSpec], metrics: Metrics, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self.links = [
            ReplicaLink(index, spec, self._on_message, self._on_death)
            for index, spec in enumerate(specs)
        ]
        self.pending: dict[int, _Pending] = {}
        self.backlog: list[int] = []
        self.closing = False  # set when shutdown begins: dead replicas are not restarted
        self.ever_ready = False  # before the first start completes, requests wait
        self.admitted = 0  # prompts reserved by `admission`, answered or not
        self._ids = itertools.count()
        self._sent = metrics.counter(
            "replica_requests_total", "Model requests sent, per replica.", ["replica"]
        )
        self._cancelled = metrics.counter(
            "cancelled_total", "Model requests cancelled (client went away)."
        )
        self._freed = metrics.counter(
            "replica_cancelled_total", "Cancelled requests whose replica freed their work."
        )
        self._deaths = metrics.counter(
            "replica_deaths_total", "Replica processes that died.", ["replica"]
        )
        self._retried = metrics.counter(
            "retried_total", "Model requests re-sent after a replica died."
        )
        metrics.add_collector(self)

    async def start(self) -> None:
        for link in self.links:
            await link.start()

    @property
    def all_serving(self) -> bool:
        """Every replica is up: what a start-up wait (deploy) waits for."""
        return all(link.serving for link in self.links)

    @property
    def any_serving(self) -> bool:
        """At least one replica can take work: what a load balancer needs to know."""
        return any(link.serving for link in self.links)

    def report(self) -> dict[str, Any]:
        """What /health and /ready show: overall status, whether all replicas serve, each one."""
        replicas = [link.snapshot() for link in self.links]
        serving = sum(replica["serving"] for replica in replicas)
        ready = "all" if serving == len(replicas) else "some" if serving else "none"
        status = {"all": "ready", "some": "degraded"}.get(ready)
        status = status or ("loading" if self._any_starting() else "unavailable")
        return {"status": status, "ready": ready, "replicas": replicas}

    @contextmanager
    def admission(self, count: int) -> Iterator[None]:
        """Reserve room for `count` prompts for the block's duration (Overloaded if none).

        Reserving here, not when requests are created later in tasks, keeps a burst within the
        bound.
        """
        if self.admitted + count > self.max_in_flight:
            raise Overloaded
        if self.ever_ready and not self.any_serving:
            raise NoReplica
        self.admitted += count
        try:
            yield
        finally:
            self.admitted -= count

    async def submit(self, job: Job) -> Result:
        """Run one model job; cancelled if the caller is (e.g. the client went away). A refusal
        by the replica raises ReplicaError."""
        request_id, future = self._open(job)
        try:
            return await future
        except asyncio.CancelledError:
            self._abandon(request_id)
            raise

    async def stream(self, job: GenerateJob) -> AsyncIterator[Delta | Result]:
        """Run a streamed GenerateJob: its Deltas as they arrive, then its Result. A consumer
        that stops early (its client went away) cancels the request."""
        deltas: asyncio.Queue[Delta | None] = asyncio.Queue()
        request_id, future = self._open(job, deltas.put_nowait)
        future.add_done_callback(lambda _: deltas.put_nowait(None))
        try:
            while (delta := await deltas.get()) is not None:
                yield delta
            yield future.result()
        finally:
            if not future.done():
                self._abandon(request_id)

    def _open(
        self, job: Job, on_delta: Callable[[Delta], None] | None = None
    ) -> tuple[int, asyncio.Future[Result]]:
        request = Request(next(self._ids), job)
        future = asyncio.get_running_loop().create_future()
        self.pending[request.id] = _Pending(request, estimated_work(job), future, on_delta=on_delta)
        self._place(request.id)
        return request.id, future

    def _abandon(self, request_id: int) -> None:
        self._forget(request_id, cancel=True)
        self._cancelled.inc()

    def _place(self, request_id: int) -> None:
        pending = self.pending[request_id]
        serving = [link for link in self.links if link.serving]
        if serving:
            link = min(serving, key=lambda link: link.outstanding)
            self._sent.labels(replica=str(link.index)).inc()
            link.send(pending.request, pending.work)
        elif not self.ever_ready and self._any_starting():
            self.backlog.append(request_id)
        else:
            self._fail(request_id, NoReplica())

    def _any_starting(self) -> bool:
        return any(link.starting for link in self.links)

    def _forget(self, request_id: int, cancel: bool = False) -> _Pending | None:
        pending = self.pending.pop(request_id, None)
        link = self.link_of(request_id)
        if pending is not None and link is not None:
            if cancel:
                link.cancel(request_id)
            else:
                link.done(request_id)
        return pending

    def link_of(self, request_id: int) -> ReplicaLink | None:
        """The replica a request is in flight on (None while it waits or after a death)."""
        return next((link for link in self.links if link.holds(request_id)), None)

    def _fail(self, request_id: int, error: Exception) -> None:
        pending = self._forget(request_id)
        if pending is not None and not pending.future.done():
            pending.future.set_exception(error)

    def _on_message(self, link: ReplicaLink, message: FromReplica) -> None:
        match message:
            case Ready():
                self._on_ready()
            case Delta():
                pending = self.pending.get(message.id)
                if pending is not None and pending.on_delta is not None:
                    pending.streamed = True
                    pending.on_delta(message)
            case Result():
                pending = self._forget(message.id)
                if pending is not None and not pending.future.done():
                    pending.future.set_result(message)
            case Failed():
                error = ReplicaError(message.status, message.message, message.param, message.code)
                self._fail(message.id, error)
            case Cancelled():
                self._freed.inc()

    def _on_ready(self) -> None:
        """The first replica up (or one back): requests waiting for one go out now."""
        self.ever_ready = True
        backlog, self.backlog = self.backlog, []
        for request_id in backlog:
            if request_id in self.pending:
                self._place(request_id)

    def _on_death(self, link: ReplicaLink, orphans: list[int]) -> None:
        if not self.closing:
            self._deaths.labels(replica=str(link.index)).inc()
            if link.may_restart:
                link.restart()
        for request_id in orphans:
            self._rescue(request_id)
        self._fail_backlog_if_hopeless()

    def _rescue(self, request_id: int) -> None:
        """A request whose replica died: it only ever goes to a replica whose process is running
        (`serving`), so the death counts against it; with no replica left, a 503 (NoReplica)."""
        pending = self.pending.get(request_id)
        if pending is None:
            return
        pending.crashes += 1
        if not self.any_serving:
            self._fail(request_id, NoReplica())
        elif pending.streamed:
            self._fail(request_id, ReplicaError(500, "the replica died while streaming"))
        elif pending.crashes >= MAX_CRASHES:
            self._fail(request_id, ReplicaError(500, "the request crashed its replica twice"))
        else:
            self._retried.inc()
            self._place(request_id)

    def _fail_backlog_if_hopeless(self) -> None:
        """With no replica starting or ready, waiting requests would wait forever: fail them."""
        if any(link.state is not ReplicaState.DEAD for link in self.links):
            return
        backlog, self.backlog = self.backlog, []
        for request_id in backlog:
            self._fail(request_id, NoReplica())

    def begin_shutdown(self) -> None:
        """Graceful shutdown has begun: in-flight work finishes, dead replicas stay down."""
        self.closing = True

    async def stop(self, grace: float = SHUTDOWN_GRACE_S) -> None:
        """Ask every replica to exit (in-flight requests are answered by now); kill stragglers.

        Replicas ignore SIGTERM, so one still loading or stuck would survive multiprocessing's
        exit-time terminate() and its join would hang the front end: it is killed instead (a
        loading one at once: it has no work and reads no messages until loaded).
        """
        self.closing = True
        for link in self.links:
            if link.starting:
                link.kill()
            else:
                link.shutdown()
        deadline = asyncio.get_running_loop().time() + grace
        while any(link.alive for link in self.links):
            if asyncio.get_running_loop().time() > deadline:
                for link in self.links:
                    link.kill()
                break
            await asyncio.sleep(0.05)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The gauges, read at scrape time (prometheus_client's collector interface)."""
        yield GaugeMetricFamily(
            "queue_depth", "Prompts waiting for a ready replica.", len(self.backlog)
        )
        yield GaugeMetricFamily(
            "in_flight", "Model requests admitted and not answered.", len(self.pending)
        )
        yield GaugeMetricFamily(
            "admitted", "Prompts holding admission (bound: --max-in-flight).", self.admitted
        )
        up = GaugeMetricFamily("replica_up", "1 when the replica is ready.", labels=["replica"])
        restarts = GaugeMetricFamily(
            "replica_restarts", "Restarts per replica.", labels=["replica"]
        )
        for link in self.links:
            up.add_metric([str(link.index)], float(link.serving))
            restarts.add_metric([str(link.index)], link.restarts)
        yield up
        yield restarts
        yield from _kv_gauges(self.links)


def _kv_gauges(links: list[ReplicaLink]) -> Iterator[GaugeMetricFamily]:
    """Each replica's KV pool, as its latest result reported it."""
    families = {
        "kv_blocks_free": "KV blocks a new prompt may take (free, or cached and idle).",
        "kv_blocks_cached": "KV blocks the prefix cache keeps.",
        "prefix_cache_hit_rate": "Of the prompt tokens admitted, the share found in the cache.",
    }
    gauges = {
        name: GaugeMetricFamily(name, text, labels=["replica"]) for name, text in families.items()
    }
    for link in links:
        kv, label = link.kv, [str(link.index)]
        if kv is None:
            continue
        gauges["kv_blocks_free"].add_metric(label, kv.blocks_free)
        gauges["kv_blocks_cached"].add_metric(label, kv.blocks_cached)
        rate = kv.prompt_tokens_cached / kv.prompt_tokens if kv.prompt_tokens else 0.0
        gauges["prefix_cache_hit_rate"].add_metric(label, rate)
    yield from gauges.values()
