"""Worker processes for CPU-heavy calls that the event loop must not run, and that can be killed.

A ProcessPoolExecutor can neither kill one busy worker nor let the interpreter exit while one is
busy (its exit hook joins them). Here each worker is a spawned process behind its own socket: a
call past its deadline, or whose caller went away, kills its worker and starts a replacement at
once, so nothing keeps spinning for an answer nobody waits for. Workers ignore SIGINT/SIGTERM
(the front end stops them) and die with the front end (`orphans.die_with_parent`).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import pickle
import socket
import struct
from collections.abc import Callable
from typing import Any

from queueing.metrics import Metrics
from queueing.orphans import die_with_parent, ignore_stop_signals

log = logging.getLogger(__name__)

FRAME = struct.Struct("!I")  # each message: its pickled length, then the pickle
JOIN_S = 1.0  # for a SIGKILLed worker to be reaped


class WorkerDied(Exception):
    """The worker exited (or was killed by the OS) before answering."""


class CallFailed(Exception):
    """The function raised in the worker; the message names the exception."""


def _serve(sock: socket.socket, function: Callable[..., Any], parent_pid: int) -> None:
    """Worker process: answer (ok, value) to each pickled argument tuple until EOF."""
    die_with_parent(parent_pid)
    ignore_stop_signals()
    with sock:
        while (args := _receive(sock)) is not None:
            try:
                reply = (True, function(*args))
            except Exception as error:
                reply = (False, f"{type(error).__name__}: {error}")
            body = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
            sock.sendall(FRAME.pack(len(body)) + body)


def _receive(sock: socket.socket) -> Any | None:
    """One message from a blocking socket; None at EOF."""
    header = _exactly(sock, FRAME.size)
    if header is None:
        return None
    body = _exactly(sock, FRAME.unpack(header)[0])
    return None if body is None else pickle.loads(body)


def _exactly(sock: socket.socket, size: int) -> bytes | None:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        read = sock.recv_into(view[got:])
        if read == 0:
            return None
        got += read
    return bytes(buffer)


class _Worker:
    """One spawned process and the front end's non-blocking end of its socket."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.sock, child_end = socket.socketpair()
        context = mp.get_context("spawn")
        self.process = context.Process(
            target=_serve, args=(child_end, function, os.getpid()), name="planner", daemon=True
        )
        self.process.start()  # returns at once: the child boots while the first call is sent
        child_end.close()
        self.sock.setblocking(False)

    async def call(self, args: tuple[Any, ...]) -> Any:
        loop = asyncio.get_running_loop()
        body = pickle.dumps(args, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            await loop.sock_sendall(self.sock, FRAME.pack(len(body)) + body)
            (length,) = FRAME.unpack(await self._exactly(FRAME.size))
            ok, value = pickle.loads(await self._exactly(length))
        except (ConnectionError, EOFError) as error:
            raise WorkerDied(f"planner worker {self.process.pid} died: {error!r}") from None
        if not ok:
            raise CallFailed(value)
        return value

    async def _exactly(self, size: int) -> bytes:
        loop = asyncio.get_running_loop()
        buffer = bytearray(size)
        view, got = memoryview(buffer), 0
        while got < size:
            read = await loop.sock_recv_into(self.sock, view[got:])
            if read == 0:
                raise EOFError("connection closed")
            got += read
        return bytes(buffer)

    def kill(self) -> None:
        """SIGKILL (the worker ignores SIGTERM); reaped later, off the loop's critical path."""
        self.sock.close()
        if self.process.is_alive():
            self.process.kill()
        asyncio.get_running_loop().call_later(JOIN_S, self.process.join, 0)


class PlannerPool:
    """`size` workers running `function`; `call` bounds each call by a deadline.

    `function` must be importable by name (it is pickled by reference into each worker).
    Workers start at `start()` or on first use; `close()` kills them all, busy or not.
    """

    def __init__(self, size: int, function: Callable[..., Any], metrics: Metrics) -> None:
        self.size = size
        self.function = function
        self._killed = metrics.counter(
            "planner_workers_killed_total",
            "Planner workers killed (past the plan timeout, caller gone, or died) and replaced.",
        )
        self._free_workers = asyncio.Semaphore(size)
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._closed = False

    def start(self) -> None:
        while len(self._idle) + len(self._busy) < self.size:
            self._idle.append(_Worker(self.function))

    async def call(self, timeout: float, *args: Any) -> Any:
        """`function(*args)` in a worker: TimeoutError past `timeout` (queueing included),
        WorkerDied, or CallFailed when the function raised."""
        async with asyncio.timeout(timeout), self._free_workers:
            if self._closed:
                raise WorkerDied("the planner pool is closed")
            worker = self._idle.pop() if self._idle else _Worker(self.function)
            self._busy.add(worker)
            try:
                result = await worker.call(args)
            except CallFailed:
                self._idle.append(worker)
                raise
            except BaseException:  # timed out, cancelled or died: never left running
                self._replace(worker)
                raise
            finally:
                self._busy.discard(worker)
            self._idle.append(worker)
            return result

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._killed.inc()
        if not self._closed:
            self._idle.append(_Worker(self.function))

    def close(self) -> None:
        """Kill every worker now, busy or not (shutdown must not wait for a runaway plan).

        A busy worker's caller then reads EOF and gets WorkerDied; no replacement starts."""
        self._closed = True
        idle, busy = list(self._idle), list(self._busy)
        self._idle.clear()
        for worker in idle:
            worker.sock.close()
        for worker in idle + busy:
            worker.process.kill()
        for worker in idle + busy:
            worker.process.join(JOIN_S)
