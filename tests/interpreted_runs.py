"""The interpreted kernel checks' child processes (`tests/interpreted_kernels.py NAME` under
TRITON_INTERPRET=1), started when collection ends rather than when each test runs.

Each check is as CPU-bound as it is long (moe_int4 runs for a minute and a half), while the
suite around it mostly waits on server processes. So the children run in the background, two
at a time (the CI machine's cores) at the lowest priority: they take the CPU the rest of the
suite leaves idle, never a test's own (its timings included). Each test then waits for its own
check's exit status; a check not yet begun when its test comes runs at once, in the foreground.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LANES = 2
TIMEOUT_S = 600

Outcome = tuple[int | None, str]  # exit status (None: killed at the timeout), stderr


class Background:
    """Checks queued in order, run by `LANES` threads; `result` waits for one."""

    def __init__(self) -> None:
        self.queue: list[str] = []
        self.outcomes: dict[str, Outcome | None] = {}  # None: running
        self.running: set[subprocess.Popen] = set()
        self.stopped = False
        self.changed = threading.Condition()

    def start(self, checks: list[str]) -> None:
        self.queue = list(checks)
        for _ in range(LANES):
            threading.Thread(target=self._lane, daemon=True).start()

    def stop(self) -> None:
        """The session ends: nothing more begins, and children still running are killed."""
        with self.changed:
            self.stopped = True
            self.queue.clear()
            for process in self.running:
                process.kill()

    def result(self, check: str) -> Outcome:
        with self.changed:
            if check in self.outcomes:
                self.changed.wait_for(lambda: self.outcomes[check] is not None)
                return self.outcomes[check]
            if check in self.queue:
                self.queue.remove(check)
        return self._run(check, nice=False)

    def _lane(self) -> None:
        while True:
            with self.changed:
                if not self.queue:
                    return
                check = self.queue.pop(0)
                self.outcomes[check] = None
            outcome = self._run(check, nice=True)
            with self.changed:
                self.outcomes[check] = outcome
                self.changed.notify_all()

    def _run(self, check: str, nice: bool) -> Outcome:
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
        script = ROOT / "tests" / "interpreted_kernels.py"
        process = subprocess.Popen(
            [sys.executable, str(script), check],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=nice,
        )
        if nice:
            lowest_priority(process.pid)
        with self.changed:
            self.running.add(process)
            if self.stopped:
                process.kill()
        try:
            _, stderr = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
            return None, f"{stderr}\n{check} ran past {TIMEOUT_S} s"
        finally:
            with self.changed:
                self.running.discard(process)
        return process.returncode, stderr


def lowest_priority(pid: int) -> None:
    """Nice 19, for the process and, where the kernel groups CPU time by session (autogroup:
    each server subprocess leads its own session), for its own session's group too, else the
    group would get as much CPU as a server's."""
    with contextlib.suppress(OSError):  # it may have exited already
        os.setpriority(os.PRIO_PROCESS, pid, 19)
        autogroup = Path(f"/proc/{pid}/autogroup")
        if autogroup.exists():
            autogroup.write_text("19")


RUNS = Background()
