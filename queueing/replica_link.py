"""One replica process as seen from the event loop: spawn, pipe reads without blocking, death."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from replica.worker import ReplicaSpec, serve

log = logging.getLogger(__name__)


class ReplicaState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    DEAD = "dead"


class ReplicaLink:
    """Owns a replica process and the parent end of its pipe.

    `on_message(link, message)` receives every message; `on_death(link)` fires once per process
    when its pipe closes. `in_flight` maps request id to the message sent, so a dead replica's
    work can be sent elsewhere; `outstanding` is the work estimate used for dispatch.
    """

    def __init__(
        self,
        index: int,
        spec: ReplicaSpec,
        on_message: Callable[[ReplicaLink, dict[str, Any]], None],
        on_death: Callable[[ReplicaLink], None],
    ) -> None:
        self.index = index
        self.spec = spec
        self._on_message = on_message
        self._on_death = on_death
        self.state = ReplicaState.DEAD
        self.info: dict[str, Any] = {}
        self.in_flight: dict[int, dict[str, Any]] = {}
        self.outstanding = 0
        self.restarts = -1
        self._process: mp.process.BaseProcess | None = None
        self._conn = None

    def start(self) -> None:
        context = mp.get_context("spawn")
        parent_end, child_end = context.Pipe()
        self._process = context.Process(
            target=serve, args=(child_end, self.spec), name=f"replica-{self.index}", daemon=True
        )
        self._process.start()
        child_end.close()
        self._conn = parent_end
        self.state = ReplicaState.LOADING
        self.restarts += 1
        asyncio.get_running_loop().add_reader(parent_end.fileno(), self._read)

    def send(self, message: dict[str, Any], work: int) -> None:
        self.in_flight[message["id"]] = message
        self.outstanding += work
        self._conn.send(message)

    def done(self, request_id: int, work: int) -> dict[str, Any] | None:
        """Forget a request; returns its message if it was in flight here."""
        message = self.in_flight.pop(request_id, None)
        if message is not None:
            self.outstanding -= work
        return message

    def cancel(self, request_id: int, work: int) -> None:
        if self.done(request_id, work) is not None and self.state is ReplicaState.READY:
            self._conn.send({"op": "cancel", "id": request_id})

    def _read(self) -> None:
        try:
            while self._conn.poll():
                message = self._conn.recv()
                if message["op"] == "ready":
                    self.state = ReplicaState.READY
                    self.info = message["info"]
                    log.info("replica %d ready: %s", self.index, self.info)
                self._on_message(self, message)
        except (EOFError, OSError):
            self._died()

    def _died(self) -> None:
        asyncio.get_running_loop().remove_reader(self._conn.fileno())
        self._conn.close()
        self.state = ReplicaState.DEAD
        self.outstanding = 0
        if self._process is not None:
            self._process.join(timeout=1)
            log.warning("replica %d died (exit code %s)", self.index, self._process.exitcode)
        self._on_death(self)

    def kill(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()

    def shutdown(self) -> None:
        """Ask the replica to exit; its pipe closing then reads as a (planned) death."""
        if self.state is not ReplicaState.DEAD:
            try:
                self._conn.send({"op": "shutdown"})
            except OSError:
                self.kill()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None
