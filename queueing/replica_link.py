"""One replica process as seen from the event loop: its lifecycle, framed socket I/O, death.

The parent's end of the socket is an asyncio transport, so sends never block the event loop even
when a busy replica is not reading (the transport buffers), and reads arrive as callbacks.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import multiprocessing as mp
import os
import socket
from collections.abc import Callable
from enum import StrEnum
from typing import Any, Protocol

from queueing.orphans import die_with_parent, ignore_stop_signals
from replica.wire.framing import FrameDecoder, encode_frame
from replica.wire.messages import Cancel, FromReplica, KVUsage, Ready, Request, Result, Shutdown
from replica.wire.spec import ReplicaSpec

log = logging.getLogger(__name__)

MAX_FAILED_STARTS = 3  # a replica that dies this often before ever being ready stays down


class ReplicaState(StrEnum):
    """loading -> ready -> dead -> restarting -> ready …; dead for good after too many failed
    starts, or when the owner does not restart it (shutdown)."""

    LOADING = "loading"  # first start: spawned, not ready yet
    READY = "ready"
    DEAD = "dead"
    RESTARTING = "restarting"  # spawned again after a death, not ready yet


class Process(Protocol):
    """What the link needs of a replica process (multiprocessing's, or a test's fake)."""

    @property
    def pid(self) -> int | None: ...
    @property
    def exitcode(self) -> int | None: ...
    def is_alive(self) -> bool: ...
    def join(self, timeout: float | None = None) -> None: ...
    def kill(self) -> None: ...


class ReplicaProtocol(asyncio.Protocol):
    """Decodes one replica socket's frames; hands messages and the close to its link."""

    def __init__(
        self, on_message: Callable[[FromReplica], None], on_closed: Callable[[], None]
    ) -> None:
        self.decoder = FrameDecoder[FromReplica]()
        self.on_message = on_message
        self.on_closed = on_closed

    def data_received(self, data: bytes) -> None:
        for message in self.decoder.feed(data):
            self.on_message(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_closed()


REPLICA_WORKER = "replica.worker"  # imported in the child only: the front end never loads torch


def _replica_process(sock: socket.socket, spec: ReplicaSpec, parent_pid: int) -> None:
    """Replica process entry: pinned to its GPUs (its stages') before torch is imported,
    SIGKILLed if the front end dies (even by SIGKILL), deaf to stop signals; then the worker
    serves."""
    die_with_parent(parent_pid)
    ignore_stop_signals()
    if spec.gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, dict.fromkeys(spec.gpus)))
    importlib.import_module(REPLICA_WORKER).serve(sock, spec)


async def launch(
    spec: ReplicaSpec, name: str, protocol: asyncio.Protocol
) -> tuple[Process, asyncio.WriteTransport]:
    """Spawn a replica process and connect `protocol` to the parent's end of its socket."""
    parent_end, child_end = socket.socketpair()
    process = mp.get_context("spawn").Process(
        target=_replica_process,
        args=(child_end, spec, os.getpid()),
        name=name,
        daemon=True,
    )
    process.start()
    child_end.close()
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
        lambda: protocol, parent_end
    )
    return process, transport


OnMessage = Callable[["ReplicaLink", FromReplica], None]
OnDeath = Callable[["ReplicaLink", list[int]], None]


class ReplicaLink:
    """Owns a replica process, the parent end of its socket and its lifecycle state.

    `on_message(link, message)` receives every message, after the link has taken Ready's info;
    `on_death(link, orphans)` fires once per process when its socket closes, with the ids of
    the requests that were in flight there (and, with none, when a restart cannot even spawn a
    process). Only the link's own methods change its state.
    """

    def __init__(
        self, index: int, spec: ReplicaSpec, on_message: OnMessage, on_death: OnDeath
    ) -> None:
        self.index = index
        self.spec = spec
        self._on_message = on_message
        self._on_death = on_death
        self._state = ReplicaState.DEAD  # until started
        self._info: dict[str, Any] = {}
        self._kv: KVUsage | None = None  # its KV pool, as its latest result reported it
        self._in_flight: dict[int, int] = {}  # request id -> its work estimate
        self._outstanding = 0  # their sum: what dispatch balances
        self._restarts = 0
        self._failed_starts = 0  # deaths before ready, since the last ready
        self._process: Process | None = None
        self._transport: asyncio.WriteTransport | None = None
        self._spawning: asyncio.Task | None = None  # a restart's spawn, referenced while it runs

    @property
    def state(self) -> ReplicaState:
        return self._state

    @property
    def info(self) -> dict[str, Any]:
        """What the replica reported when ready (model, pid, KV blocks…); empty until then."""
        return dict(self._info)

    @property
    def kv(self) -> KVUsage | None:
        return self._kv

    @property
    def restarts(self) -> int:
        return self._restarts

    @property
    def outstanding(self) -> int:
        """Work in flight here (estimated tokens): what dispatch balances."""
        return self._outstanding

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    @property
    def serving(self) -> bool:
        """Ready and its process still running: a replica killed a moment ago still reads as
        READY until its socket's close is read, and work sent to it would be lost."""
        return self._state is ReplicaState.READY and self.alive

    @property
    def starting(self) -> bool:
        """Spawned and not ready yet: requests may wait for it."""
        return self._state in (ReplicaState.LOADING, ReplicaState.RESTARTING)

    @property
    def may_restart(self) -> bool:
        """Dead, and has not failed to start MAX_FAILED_STARTS times in a row."""
        return self._state is ReplicaState.DEAD and self._failed_starts < MAX_FAILED_STARTS

    async def start(self) -> None:
        """The first start; a failure to spawn raises."""
        self._state = ReplicaState.LOADING
        await self._spawn()

    def restart(self) -> None:
        """Spawn again after a death. The state is RESTARTING from now on, so requests that wait
        for a replica keep waiting; a failure to even spawn leaves the replica dead for good."""
        if not self.may_restart:
            raise RuntimeError(f"replica {self.index} cannot restart from {self._state}")
        self._state = ReplicaState.RESTARTING
        self._restarts += 1
        self._info = {}
        self._spawning = asyncio.get_running_loop().create_task(self._respawn())

    async def _respawn(self) -> None:
        try:
            await self._spawn()
        except Exception:
            log.exception("replica %d could not be restarted", self.index)
            self._state = ReplicaState.DEAD
            self._failed_starts = MAX_FAILED_STARTS
            self._on_death(self, [])
        finally:
            self._spawning = None

    async def _spawn(self) -> None:
        protocol = ReplicaProtocol(self._received, self._closed)
        self._process, self._transport = await launch(self.spec, f"replica-{self.index}", protocol)

    def send(self, request: Request, work: int) -> None:
        self._in_flight[request.id] = work
        self._outstanding += work
        self._write(request)

    def holds(self, request_id: int) -> bool:
        return request_id in self._in_flight

    def done(self, request_id: int) -> bool:
        """Forget an answered (or failed) request; False if it was not in flight here."""
        work = self._in_flight.pop(request_id, None)
        if work is None:
            return False
        self._outstanding -= work
        return True

    def cancel(self, request_id: int) -> bool:
        """Forget a request and tell the replica to drop it and free its KV; False if it was
        not in flight here."""
        if not self.done(request_id):
            return False
        if self._state is ReplicaState.READY:
            self._write(Cancel(request_id))
        return True

    def shutdown(self) -> None:
        """Ask the replica to exit; its socket closing then reads as a (planned) death."""
        if self._state is not ReplicaState.DEAD:
            self._write(Shutdown())

    def kill(self) -> None:
        """SIGKILL: the replica ignores SIGTERM (the front end owns its lifecycle)."""
        if self._process is not None and self.alive:
            self._process.kill()

    def snapshot(self) -> dict[str, Any]:
        """This replica as /health shows it."""
        return {
            "replica": self.index,
            "state": self._state.value,
            "serving": self.serving,
            "pid": self.pid,
            "restarts": self._restarts,
            "outstanding": self.outstanding,
            "in_flight": self.in_flight,
            "gpus": list(self.spec.gpus),
            **self._info,
        }

    def _write(self, message: Request | Cancel | Shutdown) -> None:
        if self._transport is not None:
            self._transport.write(encode_frame(message))

    def _received(self, message: FromReplica) -> None:
        if isinstance(message, Ready):
            self._state = ReplicaState.READY
            self._info = dict(message.info)
            self._failed_starts = 0
            log.info("replica %d ready: %s", self.index, self._info)
        elif isinstance(message, Result) and message.kv is not None:
            self._kv = message.kv
        self._on_message(self, message)

    def _closed(self) -> None:
        if self._state is not ReplicaState.READY:
            self._failed_starts += 1
        self._state = ReplicaState.DEAD
        orphans, self._in_flight, self._outstanding = list(self._in_flight), {}, 0
        if self._process is not None:
            self._process.join(timeout=1)
            log.warning("replica %d exited (code %s)", self.index, self._process.exitcode)
        self._on_death(self, orphans)
