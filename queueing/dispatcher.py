"""Sends model requests to the replica with the least outstanding work and resolves futures.

Admission is bounded (beyond the bound: Overloaded). A request waits while replicas load; if no
replica is alive or loading it fails fast (NoReplica). A dead replica's in-flight requests go to
a live one and the replica is restarted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from typing import Any

from queueing.metrics import Metrics
from queueing.replica_link import ReplicaLink, ReplicaState
from replica.worker import ReplicaSpec

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2  # a request that kills two replicas is failed, not retried forever
MAX_FAILED_STARTS = 3  # a replica that dies this often before ever being ready stays down


class Overloaded(Exception):
    """More prompts in flight than the admission bound."""


class NoReplica(Exception):
    """No replica is alive or loading."""


class ReplicaError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Job:
    message: dict[str, Any]
    work: int
    future: asyncio.Future
    link: ReplicaLink | None = None
    attempts: int = 0


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
        self.closing = False
        self.ever_ready = (
            False  # before the first start completes, requests wait instead of failing
        )
        self._ids = itertools.count()
        metrics.gauge("queue_depth", "Prompts waiting for a ready replica.", self._backlog_gauge)
        metrics.gauge("in_flight", "Model requests admitted and not answered.", self._in_flight)
        metrics.gauge("replica_up", "1 when the replica is ready.", self._replica_up)
        metrics.gauge("replica_restarts", "Restarts per replica.", self._replica_restarts)

    async def start(self) -> None:
        for link in self.links:
            await link.start()

    @property
    def ready(self) -> bool:
        return all(link.state is ReplicaState.READY for link in self.links)

    def health(self) -> list[dict[str, Any]]:
        return [
            {
                "replica": link.index,
                "state": link.state.value,
                "pid": link.pid,
                "restarts": link.restarts,
                "outstanding": link.outstanding,
                "in_flight": len(link.in_flight),
                **link.info,
            }
            for link in self.links
        ]

    def admit(self, count: int) -> None:
        """Check room for `count` model requests before any of them is sent."""
        if len(self.jobs) + count > self.max_in_flight:
            raise Overloaded
        if not any(link.state is ReplicaState.READY for link in self.links) and self.ever_ready:
            raise NoReplica

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
        ready = [link for link in self.links if link.state is ReplicaState.READY]
        if ready:
            job.link = min(ready, key=lambda link: link.outstanding)
            job.attempts += 1
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
            self._fail(message["id"], ReplicaError(message["status"], message["message"]))
            return
        job = self._forget(message["id"])
        if job is not None and not job.future.done():
            job.future.set_result(message)

    def _on_death(self, link: ReplicaLink) -> None:
        orphans = list(link.in_flight)
        link.in_flight.clear()
        if self.closing:
            for request_id in orphans:
                self._fail(request_id, NoReplica())
            return
        self.metrics.inc(
            "replica_deaths_total", "Replica processes that died.", replica=str(link.index)
        )
        if not link.info:
            self.failed_starts[link.index] += 1
        if self.failed_starts[link.index] < MAX_FAILED_STARTS:
            link.info = {}
            asyncio.get_running_loop().create_task(link.start())
        for request_id in orphans:
            job = self.jobs.get(request_id)
            if job is None:
                continue
            job.link = None
            if job.attempts >= MAX_ATTEMPTS:
                self._fail(request_id, ReplicaError(500, "the request crashed its replica twice"))
            else:
                self._place(request_id)

    def shutdown(self) -> None:
        self.closing = True
        for link in self.links:
            link.shutdown()

    def _backlog_gauge(self) -> dict[tuple, float]:
        return {(): len(self.backlog)}

    def _in_flight(self) -> dict[tuple, float]:
        return {(): len(self.jobs)}

    def _replica_up(self) -> dict[tuple, float]:
        return {
            (("replica", str(link.index)),): float(link.state is ReplicaState.READY)
            for link in self.links
        }

    def _replica_restarts(self) -> dict[tuple, float]:
        return {(("replica", str(link.index)),): max(link.restarts, 0) for link in self.links}
