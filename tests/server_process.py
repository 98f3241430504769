"""Start `server.py` as a real subprocess on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A tiny-random server on 127.0.0.1; `stop()` sends SIGTERM and waits."""

    def __init__(self, *extra_args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, str(ROOT / "server.py"), "--model", "tiny-random"]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--gpus", "", *extra_args]
        self.process = subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, **(env or {})}, start_new_session=True
        )

    def health_status(self, route: str = "/health") -> int | None:
        try:
            with urllib.request.urlopen(self.url + route, timeout=2) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return None

    def wait_ready(self, timeout: float = 120) -> None:
        """Until every replica serves (/ready), as a start-up wait should."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}")
            if self.health_status("/ready") == 200:
                return
            time.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def processes(self) -> list[int]:
        """Every live process of the server's session (it leads one): front end, replicas,
        planner workers, multiprocessing's resource tracker."""
        return session_processes(self.process.pid)

    def __enter__(self) -> ServerProcess:
        self.wait_ready()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


def session_processes(session: int) -> list[int]:
    """Live (not zombie) processes whose session id is `session`, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, _ppid, _pgrp, sid = stat.rsplit(")", 1)[1].split()[:4]
        if int(sid) == session and state != "Z":
            found.append(int(entry.name))
    return found


def is_running(pid: int) -> bool:
    """The process exists and is not a zombie (killed, not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def request(
    url: str,
    body: bytes | dict | None = None,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    timeout: float = 60,
) -> tuple[int, dict | str, dict[str, str]]:
    """One HTTP call; returns status, the decoded JSON (or text) and the headers."""
    import json

    data = json.dumps(body).encode() if isinstance(body, dict) else body
    call = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(call, timeout=timeout) as response:
            status, raw, response_headers = response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        status, raw, response_headers = error.code, error.read(), error.headers
    text = raw.decode()
    try:
        return status, json.loads(text), dict(response_headers)
    except ValueError:
        return status, text, dict(response_headers)
