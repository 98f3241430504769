"""Bad input, overload, replica death, client disconnects, API key and SIGTERM lose nothing."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import threading
import time

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server_process import ServerProcess, request

GOOD = {"prompt": "Say something.", "max_tokens": 4}
ROUTE = "/v1/completions"


def assert_openai_error(status: int, body, expected_status: int) -> None:
    assert status == expected_status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]


def still_serving(server: ServerProcess) -> None:
    status, body, _ = request(server.url + ROUTE, GOOD)
    assert status == 200, body


BAD_BODIES = {
    "invalid json": (b'{"prompt": ', 400),
    "not an object": (b'["a prompt"]', 400),
    "a bare string": (b'"a prompt"', 400),
    "missing prompt": (b'{"max_tokens": 4}', 400),
    "null prompt": (b'{"prompt": null}', 400),
    "empty list": (b'{"prompt": []}', 400),
    "number prompt": (b'{"prompt": 7}', 400),
    "token-id prompt": (b'{"prompt": [1, 2, 3]}', 400),
    "mixed list": (b'{"prompt": ["ok", 3]}', 400),
    "invalid utf-8": (b'{"prompt": "\xff\xfe"}', 400),
    "negative max_tokens": (b'{"prompt": "a", "max_tokens": -1}', 400),
    "zero max_tokens": (b'{"prompt": "a", "max_tokens": 0}', 400),
    "float max_tokens": (b'{"prompt": "a", "max_tokens": 2.5}', 400),
    "string max_tokens": (b'{"prompt": "a", "max_tokens": "8"}', 400),
    "bool max_tokens": (b'{"prompt": "a", "max_tokens": true}', 400),
    "stream not a flag": (b'{"prompt": "a", "stream": "yes"}', 400),
    "temperature out of range": (b'{"prompt": "a", "temperature": 9}', 400),
    "echo (not implemented)": (b'{"prompt": "a", "echo": true}', 400),
    "n = 0": (b'{"prompt": "a", "n": 0}', 400),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_body_gets_an_openai_error(server, case):
    body, expected = BAD_BODIES[case]
    status, answer, _ = request(server.url + ROUTE, body)
    assert_openai_error(status, answer, expected)
    still_serving(server)


def test_body_over_the_size_limit_is_413(server):
    status, answer, _ = request(server.url + ROUTE, b'{"prompt": "' + b"a" * (5 << 20) + b'"}')
    assert_openai_error(status, answer, 413)
    still_serving(server)


def test_prompt_longer_than_the_context_names_both_counts(server):
    status, answer, _ = request(server.url + ROUTE, {"prompt": "hello " * 5000, "max_tokens": 4})
    assert_openai_error(status, answer, 400)
    assert answer["error"]["param"] == "prompt"
    assert answer["error"]["code"] == "context_length_exceeded"
    counts = [int(n) for n in re.findall(r"\d+", answer["error"]["message"])]
    assert 4096 in counts and any(count > 5000 for count in counts), counts
    still_serving(server)


def test_unknown_route_and_wrong_method(server):
    status, answer, _ = request(server.url + "/v2/nothing", GOOD)
    assert_openai_error(status, answer, 404)
    status, answer, headers = request(server.url + ROUTE, method="GET")
    assert_openai_error(status, answer, 405)
    assert "POST" in headers["Allow"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=10,
)
fuzz_bodies = (
    st.dictionaries(
        st.sampled_from(["prompt", "max_tokens", "stream", "n", "temperature", "model"])
        | st.text(),
        json_values,
        max_size=5,
    )
    | json_values
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=fuzz_bodies)
def test_fuzzed_json_never_gets_a_5xx_or_hangs(server, body):
    if isinstance(body, dict) and isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(body["max_tokens"], 8)  # bound CPU time, not behaviour
    status, answer, _ = request(server.url + ROUTE, json.dumps(body).encode(), timeout=30)
    assert status < 500, answer
    if status != 200:
        assert_openai_error(status, answer, status)


@pytest.mark.slow
def test_admission_bound_answers_503_with_retry_after():
    with ServerProcess("--max-in-flight", "2") as process:
        # the two admitted hold their places for seconds: the others arrive within milliseconds
        body = {"prompt": ["Tell me a long story."] * 2, "max_tokens": 100}
        results = []
        threads = [
            threading.Thread(target=lambda: results.append(request(process.url + ROUTE, body)))
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        statuses = sorted(status for status, _, _ in results)
        assert 200 in statuses and 503 in statuses, statuses
        for status, answer, headers in results:
            if status == 503:
                assert_openai_error(status, answer, 503)
                assert headers["Retry-After"]
        still_serving(process)


async def _post(session: aiohttp.ClientSession, url: str, body, timeout: float = 120):
    async with session.post(
        url, data=body, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as response:
        return response.status, await response.json(content_type=None)


async def _many(url: str, bodies: list[bytes]) -> list[tuple[int, dict]]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        return await asyncio.gather(*[_post(session, url, body) for body in bodies])


def _batch_bodies(count: int, max_tokens: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [
        json.dumps(
            {
                "prompt": [f"Question {i}.{j}: name a number." for j in range(rng.randint(1, 8))],
                "max_tokens": max_tokens,
            }
        ).encode()
        for i in range(count)
    ]


@pytest.mark.slow
def test_300_concurrent_batches_are_all_answered(server):
    bodies = _batch_bodies(300, max_tokens=4)
    results = asyncio.run(_many(server.url + ROUTE, bodies))
    assert [status for status, _ in results] == [200] * 300
    for body, (_, answer) in zip(bodies, results, strict=True):
        assert len(answer["choices"]) == len(json.loads(body)["prompt"])


def _replica_pids(process: ServerProcess) -> list[int]:
    _, body, _ = request(process.url + "/health", method="GET")
    return [replica["pid"] for replica in body["replicas"]]


@pytest.mark.slow
def test_killed_replica_loses_nothing_and_is_restarted():
    with ServerProcess("--cpu-replicas", "2") as process:
        victim = _replica_pids(process)[0]
        bodies = _batch_bodies(40, max_tokens=16, seed=1)  # 15 s or more of work on 2 CPUs

        def kill_soon() -> None:
            """Kill replica 0 once it has work in flight, so that work must be re-run."""
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                _, health, _ = request(process.url + "/health", method="GET")
                if health["replicas"][0]["in_flight"] > 0:
                    break
                time.sleep(0.02)
            os.kill(victim, signal.SIGKILL)

        killer = threading.Thread(target=kill_soon)
        killer.start()
        results = asyncio.run(_many(process.url + ROUTE, bodies))
        killer.join()
        assert [status for status, _ in results] == [200] * len(bodies)
        process.wait_ready(timeout=60)
        _, health, _ = request(process.url + "/health", method="GET")
        assert health["replicas"][0]["restarts"] == 1 and victim not in _replica_pids(process)
        _, metrics, _ = request(process.url + "/metrics", method="GET")
        assert 'replica_deaths_total{replica="0"} 1' in metrics
        assert 'replica_restarts{replica="0"} 1' in metrics
        assert _metric(process, "retried_total") > 0


@pytest.mark.slow
def test_no_live_replica_gets_a_quick_503():
    with ServerProcess() as process:
        os.kill(_replica_pids(process)[0], signal.SIGKILL)
        while process.health_status() == 200:
            time.sleep(0.05)
        started = time.monotonic()
        status, answer, headers = request(process.url + ROUTE, GOOD)
        assert time.monotonic() - started < 2
        assert_openai_error(status, answer, 503)
        assert headers["Retry-After"]
        process.wait_ready(timeout=60)
        still_serving(process)


def _metric(server: ServerProcess, name: str) -> float:
    _, text, _ = request(server.url + "/metrics", method="GET")
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return values[0] if values else 0.0


def test_client_disconnect_cancels_the_work(server):
    before = _metric(server, "replica_cancelled_total")
    body = json.dumps({"prompt": "Write a very long essay.", "max_tokens": 512}).encode()
    head = f"POST {ROUTE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.5)
    deadline = time.monotonic() + 10
    while _metric(server, "replica_cancelled_total") <= before:
        assert time.monotonic() < deadline, "the replica never freed the cancelled request"
        time.sleep(0.1)
    assert _metric(server, "cancelled_total") >= 1
    assert _metric(server, "in_flight") == 0


def test_api_key_is_required_when_set_and_health_stays_open():
    with ServerProcess("--metrics-auth", env={"API_KEY": "sesame"}) as process:
        status, answer, _ = request(process.url + ROUTE, GOOD)
        assert_openai_error(status, answer, 401)
        wrong = {"Authorization": "Bearer nope"}
        assert request(process.url + ROUTE, GOOD, headers=wrong)[0] == 401
        right = {"Authorization": "Bearer sesame"}
        assert request(process.url + ROUTE, GOOD, headers=right)[0] == 200
        assert process.health_status() == 200 and process.health_status("/ready") == 200
        status, answer, _ = request(process.url + "/metrics", method="GET")
        assert_openai_error(status, answer, 401)
        status, text, _ = request(process.url + "/metrics", method="GET", headers=right)
        assert status == 200 and 'requests_total{status="200"} 1' in text


def _wait_in_flight(process: ServerProcess, prompts: int) -> None:
    """Until `prompts` prompts are in flight: the signal that follows finds them mid-answer
    (100 tokens of 4 prompts take seconds on a CPU replica)."""
    deadline = time.monotonic() + 30
    while _metric(process, "in_flight") < prompts:
        assert time.monotonic() < deadline, "the request never reached the replica"
        time.sleep(0.02)


def _send(process: ServerProcess, how: str) -> None:
    if how == "SIGTERM":
        process.process.send_signal(signal.SIGTERM)
    else:  # Ctrl-C or `kill -TERM -pgid`: the replicas get it too
        os.killpg(process.process.pid, signal.SIGINT if how == "group SIGINT" else signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "group SIGTERM", "group SIGINT"])
def test_a_stop_signal_drains_in_flight_work_and_exits_zero(how):
    """SIGTERM to the server, or a signal to its whole process group (replicas must keep
    serving the drain): the in-flight prompts are answered, the server exits 0, and every
    process it started (replicas, planner workers, resource tracker) is gone."""
    with ServerProcess() as process:
        result = []
        body = {"prompt": ["Tell me a long story."] * 4, "max_tokens": 100}
        client = threading.Thread(target=lambda: result.append(request(process.url + ROUTE, body)))
        client.start()
        _wait_in_flight(process, 4)
        _send(process, how)
        client.join()
        assert result[0][0] == 200, result[0][1]
        assert len(result[0][1]["choices"]) == 4
        assert process.process.wait(30) == 0
        deadline = time.monotonic() + 5
        while process.processes():
            assert time.monotonic() < deadline, process.processes()
            time.sleep(0.05)


SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "15"))  # longer by hand: SOAK_SECONDS=600


async def _soak_client(session, url: str, deadline: float, seed: int, tally: dict) -> None:
    rng = random.Random(seed)
    bad = [body for body, _ in BAD_BODIES.values()]
    while time.monotonic() < deadline:
        good = rng.random() < 0.7
        body = (
            _batch_bodies(1, rng.randint(1, 8), seed=rng.random())[0] if good else rng.choice(bad)
        )
        try:
            status, _ = await _post(session, url, body)
        except (aiohttp.ClientError, TimeoutError):
            status = None
        key = ("good" if good else "bad", status)
        tally[key] = tally.get(key, 0) + 1


@pytest.mark.slow
def test_soak_300_clients_mixing_good_and_bad_loses_nothing(server):
    async def soak() -> dict:
        tally: dict = {}
        deadline = time.monotonic() + SOAK_SECONDS
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await asyncio.gather(
                *[_soak_client(session, server.url + ROUTE, deadline, i, tally) for i in range(300)]
            )
        return tally

    tally = asyncio.run(soak())
    print(f"soak {SOAK_SECONDS:.0f}s tally: {tally}")
    good = {status: n for (kind, status), n in tally.items() if kind == "good"}
    bad = {status: n for (kind, status), n in tally.items() if kind == "bad"}
    assert set(good) == {200}, good
    assert bad and all(status is not None and 400 <= status < 500 for status in bad), bad
