"""The interpreted kernel checks' child processes (`tests/interpreted_kernels.py NAME` under
TRITON_INTERPRET=1), started when collection ends rather than when each test runs.

Each check is as CPU-bound as it is long (moe_int4 runs for a minute and a half), while the
suite around it mostly waits on server processes. So the children run in the background, two
at a time (the CI machine's cores) at the lowest priority: they take the CPU the rest of the
suite leaves idle, never a test's own (its timings included). Each test then waits for its own
check's exit status; a check not yet begun when its test comes runs at once, in the foreground.

A check's limit is CPU time, not wall time: at the lowest priority a check may wait long for
the CPU while server tests run (moe_int4 once passed a 600 s wall limit on a loaded machine,
and passed alone in 140 s). A loop that burns CPU still ends at CPU_LIMIT_S, and WALL_LIMIT_S
bounds a child that hangs without running.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LANES = 2
CPU_LIMIT_S = 600
WALL_LIMIT_S = 1800
SCRIPT = ROOT / "tests" / "interpreted_kernels.py"

Outcome = tuple[int | None, str]  # exit status (None: killed at the timeout), stderr


class Background:
    """Checks queued in order, run by `LANES` threads; `result` waits for one."""

    def __init__(
        self,
        script: Path = SCRIPT,
        cpu_limit_s: int = CPU_LIMIT_S,
        wall_limit_s: int = WALL_LIMIT_S,
    ) -> None:
        self.script, self.cpu_limit_s, self.wall_limit_s = script, cpu_limit_s, wall_limit_s
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
        process = subprocess.Popen(
            [sys.executable, str(self.script), check],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=nice,
        )
        with contextlib.suppress(OSError):  # it may have exited already
            limit = (self.cpu_limit_s, self.cpu_limit_s + 5)  # SIGXCPU, then SIGKILL
            resource.prlimit(process.pid, resource.RLIMIT_CPU, limit)
        if nice:
            lowest_priority(process.pid)
        with self.changed:
            self.running.add(process)
            if self.stopped:
                process.kill()
        try:
            _, stderr = process.communicate(timeout=self.wall_limit_s)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
            return None, f"{stderr}\n{check} ran past {self.wall_limit_s} s"
        finally:
            with self.changed:
                self.running.discard(process)
        if process.returncode in (-signal.SIGXCPU, -signal.SIGKILL) and not self.stopped:
            stderr += f"\n{check} used up its {self.cpu_limit_s} s of CPU time"
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
