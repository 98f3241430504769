"""The time budget of a shutdown: from SIGTERM to exit within `--shutdown-timeout`, whatever runs.

In-flight requests drain until `drain_by` (all of the timeout but STOP_RESERVE_S), then get a
503 (ShuttingDown): aiohttp alone would wait twice its timeout for a handler and then only drop
the connection. The rest stops the processes; a watchdog thread ends the process at the timeout
if anything still holds it (its children die with it: orphans.die_with_parent).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

log = logging.getLogger(__name__)

STOP_RESERVE_S = 3.0  # of the timeout (at most half) to stop processes after the drain


class ShuttingDown(Exception):
    """The request was still running when the drain time ran out."""


class Shutdown:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.drain_s = timeout - min(STOP_RESERVE_S, timeout / 2)
        self.drain_by: float | None = None  # loop times, set when shutdown begins
        self.stop_by: float | None = None
        self._deadlines: set[asyncio.Timeout] = set()

    def begin(self) -> None:
        """Start the clock: every request in flight (or still to come) ends by `drain_by`."""
        now = asyncio.get_running_loop().time()
        self.drain_by, self.stop_by = now + self.drain_s, now + self.timeout
        for deadline in self._deadlines:
            deadline.reschedule(self.drain_by)

    @asynccontextmanager
    async def draining(self) -> AsyncIterator[None]:
        """Run a request's work; past `drain_by` it is cancelled and ShuttingDown raised."""
        deadline = asyncio.timeout_at(self.drain_by)
        self._deadlines.add(deadline)
        try:
            async with deadline:
                yield
        except TimeoutError:
            if not deadline.expired():
                raise
            raise ShuttingDown from None
        finally:
            self._deadlines.discard(deadline)

    def seconds_left(self, margin: float) -> float:
        """Until `stop_by`, less `margin`; infinite before shutdown begins."""
        if self.stop_by is None:
            return math.inf
        return max(0.0, self.stop_by - asyncio.get_running_loop().time() - margin)

    def arm_watchdog(self) -> None:
        """End the process `timeout` seconds from now, whatever still runs (exit status 1)."""

        def force_exit() -> None:
            log.error("shutdown took over %.1f s; exiting now", self.timeout)
            logging.shutdown()
            os._exit(1)

        watchdog = threading.Timer(self.timeout, force_exit)
        watchdog.daemon = True
        watchdog.start()
