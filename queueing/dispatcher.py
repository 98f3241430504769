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
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from queueing.metrics import Metrics
from queueing.replica_link import ReplicaLink, ReplicaState
from replica.worker import ReplicaSpec

log = logging.getLogger(__name__)

MAX_CRASHES = 2  # a request running on two replicas that died is failed, not retried forever
MAX_FAILED_STARTS = 3  # a replica that dies this often before ever being ready stays down
SHUTDOWN_GRACE_S = 5.0  # for replicas to exit after "shutdown" (one engine step is enough)


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


@dataclass
class _Job:
    message: dict[str, Any]
    work: int
    future: asyncio.Future
    link: ReplicaLink | None = None
    crashes: int = 0  # replicas that died while it ran on them


class Dispatcher:
    def __init__(self, specs: list[ReplicaSpec], metrics: Metrics, max_in_flight: int) -> None:
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.links = [
            ReplicaLink(index, spec, self._on_message, self._on_death)
            for index, spec in enumerate(specs)
        ]
        self.jobs: dict[int, _Job] = {}
        self.backlog: list[int] = []
        self.failed_starts = [0] * len(specs)
        self.closing = False  # set when shutdown begins: dead replicas are not restarted
        self.ever_ready = False  # before the first start completes, requests wait
        self.admitted = 0  # prompts reserved by `admission`, answered or not
        self._ids = itertools.count()
        self._restarts: set[asyncio.Task] = set()  # the loop keeps only weak references
        metrics.gauge("queue_depth", "Prompts waiting for a ready replica.", self._backlog_gauge)
        metrics.gauge("in_flight", "Model requests admitted and not answered.", self._in_flight)
        metrics.gauge(
            "admitted", "Prompts holding admission (bound: --max-in-flight).", self._admitted
        )
        metrics.gauge("replica_up", "1 when the replica is ready.", self._replica_up)
        metrics.gauge("replica_restarts", "Restarts per replica.", self._replica_restarts)

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
        replicas = self.health()
        serving = sum(replica["serving"] for replica in replicas)
        ready = "all" if serving == len(replicas) else "some" if serving else "none"
        loading = any(link.state is ReplicaState.LOADING for link in self.links)
        status = {"all": "ready", "some": "degraded"}.get(ready)
        status = status or ("loading" if loading else "unavailable")
        return {"status": status, "ready": ready, "replicas": replicas}

    def health(self) -> list[dict[str, Any]]:
        return [
            {
                "replica": link.index,
                "state": link.state.value,
                "serving": link.serving,
                "pid": link.pid,
                "restarts": link.restarts,
                "outstanding": link.outstanding,
                "in_flight": len(link.in_flight),
                **link.info,
            }
            for link in self.links
        ]

    @contextmanager
    def admission(self, count: int) -> Iterator[None]:
        """Reserve room for `count` prompts for the block's duration (Overloaded if none).

        Reserving here, not when jobs are created later in tasks, keeps a burst within the bound.
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

    async def submit(self, message: dict[str, Any], work: int) -> dict[str, Any]:
        """Run one model request; cancelled if the caller is (e.g. the client went away)."""
        request_id = next(self._ids)
        job = _Job({**message, "id": request_id}, work, asyncio.get_running_loop().create_future())
        self.jobs[request_id] = job
        self._place(request_id)
        try:
            return await job.future
        except asyncio.CancelledError:
            self._forget(request_id, cancel=True)
            self.metrics.inc("cancelled_total", "Model requests cancelled (client went away).")
            raise

    def _place(self, request_id: int) -> None:
        job = self.jobs[request_id]
        serving = [link for link in self.links if link.serving]
        if serving:
            job.link = min(serving, key=lambda link: link.outstanding)
            self.metrics.inc(
                "replica_requests_total",
                "Model requests sent, per replica.",
                replica=str(job.link.index),
            )
            job.link.send(job.message, job.work)
        elif not self.ever_ready and self._any_loading():
            self.backlog.append(request_id)
        else:
            self._fail(request_id, NoReplica())

    def _any_loading(self) -> bool:
        return any(link.state is ReplicaState.LOADING for link in self.links)

    def _forget(self, request_id: int, cancel: bool = False) -> _Job | None:
        job = self.jobs.pop(request_id, None)
        if job is not None and job.link is not None:
            if cancel:
                job.link.cancel(request_id, job.work)
            else:
                job.link.done(request_id, job.work)
        return job

    def _fail(self, request_id: int, error: Exception) -> None:
        job = self._forget(request_id)
        if job is not None and not job.future.done():
            job.future.set_exception(error)

    def _on_message(self, link: ReplicaLink, message: dict[str, Any]) -> None:
        if message["op"] == "cancelled":
            self.metrics.inc(
                "replica_cancelled_total", "Cancelled requests whose replica freed their work."
            )
            return
        if message["op"] == "ready":
            self.ever_ready = True
            self.failed_starts[link.index] = 0
            backlog, self.backlog = self.backlog, []
            for request_id in backlog:
                if request_id in self.jobs:
                    self._place(request_id)
            return
        if message["op"] == "error":
            error = ReplicaError(
                message["status"], message["message"], message.get("param"), message.get("code")
            )
            self._fail(message["id"], error)
            return
        job = self._forget(message["id"])
        if job is not None and not job.future.done():
            job.future.set_result(message)

    def _on_death(self, link: ReplicaLink) -> None:
        orphans = list(link.in_flight)
        link.in_flight.clear()
        if not self.closing:
            self.metrics.inc(
                "replica_deaths_total", "Replica processes that died.", replica=str(link.index)
            )
            if not link.info:
                self.failed_starts[link.index] += 1
            if self.failed_starts[link.index] < MAX_FAILED_STARTS:
                link.info = {}
                link.state = ReplicaState.LOADING  # from now on, so waiting requests keep waiting
                task = asyncio.get_running_loop().create_task(self._restart(link))
                self._restarts.add(task)
                task.add_done_callback(self._restarts.discard)
        for request_id in orphans:
            self._rescue(request_id)
        self._fail_backlog_if_hopeless()

    def _rescue(self, request_id: int) -> None:
        """A request whose replica died: it only ever goes to a replica whose process is running
        (`serving`), so the death counts against it; with no replica left, a 503 (NoReplica)."""
        job = self.jobs.get(request_id)
        if job is None:
            return
        job.link = None
        job.crashes += 1
        if not self.any_serving:
            self._fail(request_id, NoReplica())
        elif job.crashes >= MAX_CRASHES:
            self._fail(request_id, ReplicaError(500, "the request crashed its replica twice"))
        else:
            self.metrics.inc("retried_total", "Model requests re-sent after a replica died.")
            self._place(request_id)

    async def _restart(self, link: ReplicaLink) -> None:
        """Start a replica again; a failure to even spawn counts as a failed start."""
        try:
            await link.start()
        except Exception:
            log.exception("replica %d could not be restarted", link.index)
            link.state = ReplicaState.DEAD
            self.failed_starts[link.index] = MAX_FAILED_STARTS
            self._fail_backlog_if_hopeless()

    def _fail_backlog_if_hopeless(self) -> None:
        """With no replica loading or ready, waiting requests would wait forever: fail them."""
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
            if link.state is ReplicaState.LOADING:
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

    def _backlog_gauge(self) -> dict[tuple, float]:
        return {(): len(self.backlog)}

    def _in_flight(self) -> dict[tuple, float]:
        return {(): len(self.jobs)}

    def _admitted(self) -> dict[tuple, float]:
        return {(): self.admitted}

    def _replica_up(self) -> dict[tuple, float]:
        return {(("replica", str(link.index)),): float(link.serving) for link in self.links}

    def _replica_restarts(self) -> dict[tuple, float]:
        return {(("replica", str(link.index)),): max(link.restarts, 0) for link in self.links}
