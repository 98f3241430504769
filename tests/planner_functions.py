"""Functions for planner-pool tests: importable by name, so a spawned worker can run them."""

from __future__ import annotations

import os
import time


def pid_of_worker() -> int:
    return os.getpid()


def spin(seconds: float) -> int:
    """Burn CPU like a runaway parse; returns the worker's pid if it ever finishes."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass
    return os.getpid()


def fail(message: str) -> None:
    raise ValueError(message)
