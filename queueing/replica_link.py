"""One replica process as seen from the event loop: spawn, framed socket I/O, death.

The parent's end of the socket is an asyncio transport, so sends never block the event loop even
when a busy replica is not reading (the transport buffers), and reads arrive as callbacks.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import socket
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from queueing.orphans import die_with_parent
from replica.protocol import FrameDecoder, encode_frame
from replica.worker import ReplicaSpec, serve

log = logging.getLogger(__name__)


class ReplicaState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    DEAD = "dead"


def _serve_until_parent_dies(sock: socket.socket, spec: ReplicaSpec, parent_pid: int) -> None:
    """Replica process entry: `serve`, but SIGKILLed if the front end dies (even by SIGKILL)."""
    die_with_parent(parent_pid)
    serve(sock, spec)


class _ReplicaProtocol(asyncio.Protocol):
    def __init__(self, link: ReplicaLink) -> None:
        self.link = link
        self.decoder = FrameDecoder()

    def data_received(self, data: bytes) -> None:
        for message in self.decoder.feed(data):
            self.link._received(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.link._died()


class ReplicaLink:
    """Owns a replica process and the parent end of its socket.

    `on_message(link, message)` receives every message; `on_death(link)` fires once per process
    when its socket closes. `in_flight` maps request id to the message sent, so a dead replica's
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
        self._transport: asyncio.Transport | None = None

    async def start(self) -> None:
        parent_end, child_end = socket.socketpair()
        context = mp.get_context("spawn")
        self._process = context.Process(
            target=_serve_until_parent_dies,
            args=(child_end, self.spec, os.getpid()),
            name=f"replica-{self.index}",
            daemon=True,
        )
        self._process.start()
        child_end.close()
        self.state = ReplicaState.LOADING
        self.restarts += 1
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.connect_accepted_socket(
            lambda: _ReplicaProtocol(self), parent_end
        )

    def send(self, message: dict[str, Any], work: int) -> None:
        self.in_flight[message["id"]] = message
        self.outstanding += work
        self._transport.write(encode_frame(message))

    def done(self, request_id: int, work: int) -> dict[str, Any] | None:
        """Forget a request; returns its message if it was in flight here."""
        message = self.in_flight.pop(request_id, None)
        if message is not None:
            self.outstanding -= work
        return message

    def cancel(self, request_id: int, work: int) -> None:
        if self.done(request_id, work) is not None and self.state is ReplicaState.READY:
            self._transport.write(encode_frame({"op": "cancel", "id": request_id}))

    def _received(self, message: dict[str, Any]) -> None:
        if message["op"] == "ready":
            self.state = ReplicaState.READY
            self.info = message["info"]
            log.info("replica %d ready: %s", self.index, self.info)
        self._on_message(self, message)

    def _died(self) -> None:
        self.state = ReplicaState.DEAD
        self.outstanding = 0
        if self._process is not None:
            self._process.join(timeout=1)
            log.warning("replica %d exited (code %s)", self.index, self._process.exitcode)
        self._on_death(self)

    def kill(self) -> None:
        """SIGKILL: the replica ignores SIGTERM (the front end owns its lifecycle)."""
        if self.alive:
            self._process.kill()

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    @property
    def serving(self) -> bool:
        """Ready and its process still running: a replica killed a moment ago still reads as
        READY until its socket's close is read, and work sent to it would be lost."""
        return self.state is ReplicaState.READY and self.alive

    def shutdown(self) -> None:
        """Ask the replica to exit; its socket closing then reads as a (planned) death."""
        if self.state is not ReplicaState.DEAD:
            self._transport.write(encode_frame({"op": "shutdown"}))

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None
