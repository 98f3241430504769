"""The server's processes end to end: replicas dying (one, then both at once), planner workers
stuck mid-plan, SIGTERM with a busy worker, SIGKILL of the front end. Nothing may hang, answer
500 for the server's own trouble, or outlive the server."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import aiohttp
import pytest

from queueing.planning import INLINE_PROMPT_CHARS
from tests.server_process import ServerProcess, children, is_running, request
from tests.test_reliability import (
    ROUTE,
    _batch_bodies,
    _metric,
    _replica_pids,
    assert_openai_error,
    still_serving,
)

pytestmark = pytest.mark.slow  # each test starts, kills or signals server processes

LONG_PROMPT = "Say hi. " + "-" * (INLINE_PROMPT_CHARS + 600)  # planned in a worker, few tokens


def planner_pids(process: ServerProcess) -> list[int]:
    """The front end's running children that are neither replicas nor the resource tracker."""
    replicas = set(_replica_pids(process))
    return [
        pid
        for pid in children(process.process.pid)
        if pid not in replicas
        and is_running(pid)
        and b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def two_replicas():
    """One two-replica server for the module: its replicas are killed and restarted by the
    tests below, and the last test SIGKILLs its front end."""
    with ServerProcess("--cpu-replicas", "2") as process:
        yield process


def test_health_stays_200_while_one_replica_restarts_and_ready_waits_for_all(two_replicas):
    process = two_replicas
    process.wait_ready()
    os.kill(_replica_pids(process)[0], signal.SIGKILL)
    wait_until(
        lambda: (
            request(process.url + "/health", method="GET")[1]["replicas"][0]["state"] != "ready"
        ),
        10,
        "the death to be noticed",
    )
    status, health, _ = request(process.url + "/health", method="GET")
    assert status == 200, health
    assert health["ready"] == "some" and health["status"] == "degraded"
    assert [r["serving"] for r in health["replicas"]] == [False, True]
    status, readiness, _ = request(process.url + "/ready", method="GET")
    assert status == 503 and readiness["ready"] == "some"
    still_serving(process)
    process.wait_ready(timeout=90)
    status, readiness, _ = request(process.url + "/ready", method="GET")
    assert status == 200 and readiness["ready"] == "all"


async def _post_with_headers(session: aiohttp.ClientSession, url: str, body: bytes):
    async with session.post(url, data=body, timeout=aiohttp.ClientTimeout(total=120)) as answer:
        return answer.status, await answer.json(content_type=None), dict(answer.headers)


async def _many_with_headers(url: str, bodies: list[bytes]) -> list[tuple[int, dict, dict]]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        return await asyncio.gather(*[_post_with_headers(session, url, b) for b in bodies])


def test_both_replicas_killed_with_requests_in_flight_get_503_never_500(two_replicas):
    """The issue's case: work re-sent to a replica already dead (not yet noticed) counted as
    the request's second crash, a 500. With no replica left it is the server's trouble: 503."""
    process = two_replicas
    process.wait_ready()
    victims = _replica_pids(process)

    def kill_both_once_busy() -> None:
        def both_busy() -> bool:
            _, health, _ = request(process.url + "/health", method="GET")
            return all(replica["in_flight"] > 0 for replica in health["replicas"])

        wait_until(both_busy, 60, "both replicas to have work in flight")
        for pid in victims:
            os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_both_once_busy)
    killer.start()
    results = asyncio.run(_many_with_headers(process.url + ROUTE, _batch_bodies(40, 48, seed=2)))
    killer.join()
    statuses = sorted({status for status, _, _ in results})
    assert 503 in statuses and set(statuses) <= {200, 503}, statuses
    for status, body, headers in results:
        if status == 503:
            assert_openai_error(status, body, 503)
            assert headers["Retry-After"]
    process.wait_ready(timeout=120)
    still_serving(process)


def test_a_stuck_planner_worker_is_replaced_and_sigterm_still_exits_in_time():
    shutdown_timeout = 2.0
    with ServerProcess(
        "--plan-timeout", "2", "--shutdown-timeout", str(shutdown_timeout)
    ) as process:
        stuck = planner_pids(process)
        assert len(stuck) == 2, stuck
        for pid in stuck:  # stopped mid-plan, as a runaway plan would be: never answers
            os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        status, body, _ = request(process.url + ROUTE, {"prompt": LONG_PROMPT, "max_tokens": 2})
        assert status == 200 and body["choices"][0]["prompt"] == LONG_PROMPT, body
        assert 2 <= time.monotonic() - started < 15  # the model answered after the timeout
        assert _metric(process, 'plan_fallback_total{reason="timeout"}') == 1
        assert _metric(process, "planner_workers_killed_total") == 1
        replaced = planner_pids(process)
        assert len(replaced) == 2 and len(set(stuck) - set(replaced)) == 1, (stuck, replaced)

        for pid in replaced:
            if pid not in stuck:
                os.kill(pid, signal.SIGSTOP)
        cut_off: list = []
        waiting = threading.Thread(
            target=lambda: cut_off.append(
                request(process.url + ROUTE, {"prompt": LONG_PROMPT, "max_tokens": 2})
            )
        )
        waiting.start()
        wait_until(lambda: _metric(process, "admitted") >= 1, 10, "the request to plan")
        time.sleep(0.2)  # it now waits on a stopped worker
        stopping = time.monotonic()
        process.process.send_signal(signal.SIGTERM)
        code = process.process.wait(30)
        elapsed = time.monotonic() - stopping
        waiting.join()
        assert elapsed < shutdown_timeout + 0.5, f"exit took {elapsed:.1f} s"
        assert code in (0, 1), code  # 1 only if the watchdog had to end it
        [(status, body, headers)] = cut_off  # drained until the reserve, then told to retry
        assert_openai_error(status, body, 503)
        assert "shutting down" in body["error"]["message"] and headers["Retry-After"]
        wait_until(lambda: not process.processes(), 5, "every server process to exit")


def test_sigkill_of_the_front_end_leaves_no_process_behind(two_replicas):
    """Replicas and planner workers get SIGKILL when the front end dies (PR_SET_PDEATHSIG);
    then multiprocessing's resource tracker sees its last writer gone and exits too. The
    module's server ends here: this test must stay the last to use it (pytest runs a module's
    tests in file order), and its teardown's stop() finds the process already gone."""
    process = two_replicas
    process.wait_ready()  # both replicas back from the tests above: their restarts die too
    assert len(planner_pids(process)) == 2
    assert len(process.processes()) >= 6  # front end, 2 replicas, 2 planners, tracker
    process.process.kill()
    process.process.wait()
    wait_until(lambda: not process.processes(), 10, "the orphans to die")
