"""Child processes (replicas, planners) that the front end alone stops, and that cannot outlive
it, even when it is SIGKILLed.

Linux delivers a parent-death signal chosen with prctl(PR_SET_PDEATHSIG) when the thread that
started the child exits; the front end starts every child from its event-loop (main) thread.
Elsewhere this is a no-op and the front end's own shutdown is the only guarantee.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> bool:
    """Ask for SIGKILL when the parent dies; exit now if it already has. True if armed."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    return True


def ignore_stop_signals() -> None:
    """SIGINT/SIGTERM are ignored: a Ctrl-C or a process-group SIGTERM reaches children too, and
    the front end owns their lifecycle (it drains in-flight work, then stops them)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
