"""The front end in-process (no replicas): planning off the loop, the path from HTTP to the
model and back, errors, admission, shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

import server
import shortcuts
from api.responses import ApiError, parse_completion_request
from queueing.dispatcher import Dispatcher
from queueing.metrics import Metrics
from replica.wire import messages as wire
from shortcuts.prompts import OPEN_SYSTEM
from tests.loop_gaps import worst_loop_gap
from tests.prometheus_text import sample
from tests.shortcuts_dev_data import rows_of

ROUTE = "/v1/completions"


def huge_graph_prompt() -> str:
    """A graph-like prompt of ~8 MB: over the caps, yet its scans alone take 0.2 s or more."""
    edges = "\n".join(f"{i % 100} -> {(i * 7 + 1) % 100}, weight: 1" for i in range(360_000))
    return (
        "You are given a directed graph with 100 nodes (numbered 0 to 99) and the following "
        f"edges:\n\nEdges (source -> target, weight):\n{edges}\n\n"
        "Find the top 3 shortest paths from node 0 to node 99."
    )


class FakeDispatcher(Dispatcher):
    """No replicas: `submit` records jobs and answers them (or fails) at once; a Score gets
    its first option."""

    def __init__(self, max_in_flight: int) -> None:
        super().__init__([], Metrics(), max_in_flight)  # the app's metrics have a dispatcher
        self.sent: list[wire.Job] = []
        self.release = asyncio.Event()
        self.release.set()
        self.error: Exception | None = None
        self.running = self.peak = 0

    async def start(self) -> None:
        pass

    async def submit(self, job: wire.Job) -> wire.Result:
        self.sent.append(job)
        if self.error is not None:
            raise self.error
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        choice = 0 if isinstance(job, wire.ScoreJob) else None
        return wire.Result(len(self.sent), "hi", "stop", wire.Usage(1, 1), choice)

    async def stream(self, job: wire.GenerateJob) -> AsyncIterator[wire.Delta | wire.Result]:
        """Streams "hi" padded with the whitespace a shaped answer loses."""
        self.sent.append(job)
        for piece in ("  h", "i", " "):
            yield wire.Delta(len(self.sent), piece)
        yield wire.Result(len(self.sent), "  hi ", "length", wire.Usage(1, 3))


def parse_args(*flags: str):
    return server.parse_args(["--model", "tiny-random", "--gpus", "", *flags])


def serve(
    scenario: Callable[[TestClient, server.Frontend, FakeDispatcher], Awaitable[None]],
    *flags: str,
) -> None:
    """Run `scenario` against an in-process app whose dispatcher is a FakeDispatcher."""

    async def main() -> None:
        args = parse_args(*flags)
        app = server.build_app(args)
        front = app[server.FRONTEND]
        front.service.dispatcher = FakeDispatcher(args.max_in_flight)
        async with TestClient(TestServer(app)) as client:
            await scenario(client, front, front.service.dispatcher)

    asyncio.run(main())


async def metrics_text(client: TestClient) -> str:
    async with client.get("/metrics") as response:
        return await response.text()


@pytest.fixture
def front():
    front = server.Frontend(parse_args())
    yield front
    front.service.planner.pool.close()


def test_huge_graph_prompt_is_planned_without_stalling_the_loop(front):
    prompt = huge_graph_prompt()
    started = time.perf_counter()
    shortcuts.plan(prompt, "throughput")
    assert time.perf_counter() - started > 0.1, "the prompt must be slow to plan inline"

    [action], worst_gap = asyncio.run(worst_loop_gap(front.service.planner.plan_all([prompt])))
    assert isinstance(action, shortcuts.UnsolvedGraph)  # over the caps
    assert worst_gap < 0.1, f"the event loop stalled for {worst_gap:.3f} s"


def test_one_prompt_of_each_route_goes_its_way_and_comes_back_in_order():
    graph, mcq = rows_of("graph")[0]["prompt"], rows_of("mmlu_med")[0]["prompt"]

    async def scenario(client, front, dispatcher) -> None:
        request = {"prompt": [graph, mcq, "Hi"], "max_tokens": 5}
        async with client.post(ROUTE, json=request) as response:
            body = await response.json()
        assert response.status == 200, body
        [solved, scored, generated] = [choice["text"] for choice in body["choices"]]
        assert solved.startswith("submit_paths(paths=[[0, ")  # no model call
        assert (scored, generated) == ("The answer is (A).", "hi")
        [score, generate] = dispatcher.sent  # the letters go, the index (0) comes back
        assert isinstance(score, wire.ScoreJob) and score.options == ("A", "B", "C", "D")
        assert isinstance(generate, wire.GenerateJob) and generate.max_tokens == 5
        assert body["usage"] == {
            "prompt_tokens": 2,
            "completion_tokens": 2,
            "total_tokens": 4,
            "completion_tokens_details": {"reasoning_tokens": 0},
        }

    serve(scenario)


def test_a_stream_carries_every_route_and_the_clients_decoding_settings():
    graph, mcq = rows_of("graph")[0]["prompt"], rows_of("mmlu_med")[0]["prompt"]
    body = {"prompt": [graph, mcq, "Hi"], "temperature": 0.5, "stop": ["zz"]}

    async def scenario(client, front, dispatcher) -> None:
        async with client.post(ROUTE, json=body) as response:
            whole = await response.json()
        async with client.post(ROUTE, json={**body, "stream": True}) as response:
            events = [line for line in (await response.text()).splitlines() if line]
        assert events[-1] == "data: [DONE]"
        chunks = [orjson.loads(event.removeprefix("data: ")) for event in events[:-1]]
        texts, reasons = ["", "", ""], [None, None, None]
        for choice in (chunk["choices"][0] for chunk in chunks):
            texts[choice["index"]] += choice["text"]
            reasons[choice["index"]] = choice["finish_reason"]
        assert texts == [choice["text"] for choice in whole["choices"]]
        assert texts[2] == "hi" and reasons == ["stop", "stop", "length"]
        score, generate = dispatcher.sent[-2:]
        assert isinstance(score, wire.ScoreJob) and generate.stream
        assert generate.decoding == wire.Decoding(wire.SamplingParams(0.5), ("zz",))

    serve(scenario)


def test_reasoning_without_a_letter_falls_back_to_scoring():
    mcq = rows_of("mmlu_med")[0]["prompt"]

    async def scenario(client, front, dispatcher) -> None:
        async with client.post(ROUTE, json={"prompt": mcq}) as response:
            body = await response.json()
        assert response.status == 200, body
        assert body["choices"][0]["text"] == "The answer is (A)."  # "hi" names no letter
        assert [type(job) for job in dispatcher.sent] == [wire.GenerateJob, wire.ScoreJob]
        assert body["usage"]["prompt_tokens"] == 2 and body["usage"]["completion_tokens"] == 2

    serve(scenario, "--profile", "accuracy")


def test_planning_timeout_sends_the_prompt_to_the_model_as_open():
    prompt = huge_graph_prompt()

    async def scenario(client, front, dispatcher) -> None:
        async with client.post(ROUTE, json={"prompt": [prompt, "Hi"]}) as response:
            body = await response.json()
        assert response.status == 200, body
        assert [c["text"] for c in body["choices"]] == ["hi", "hi"]
        [fallback] = [job for job in dispatcher.sent if job.messages[-1]["content"] == prompt]
        assert fallback.messages[0] == {"role": "system", "content": OPEN_SYSTEM}
        assert 'plan_fallback_total{reason="timeout"} 1' in await metrics_text(client)

    serve(scenario, "--plan-timeout", "0.01", "--max-body-bytes", str(16 << 20))


def test_planning_error_sends_the_prompt_to_the_model_as_open(monkeypatch):
    def broken(prompt: str, profile: str, max_tokens: int | None) -> shortcuts.Plan:
        raise RuntimeError("planner bug")

    async def scenario(client, front, dispatcher) -> None:
        monkeypatch.setattr(shortcuts, "plan", broken)  # inline planning (the workers run on)
        body = {"prompt": "What is 2+2?", "max_tokens": 3}
        async with client.post(ROUTE, json=body) as response:
            body = await response.json()
        assert response.status == 200, body
        [sent] = dispatcher.sent
        assert sent.messages[-1]["content"] == "What is 2+2?" and sent.max_tokens == 3
        assert 'plan_fallback_total{reason="error"} 1' in await metrics_text(client)

    serve(scenario)


def test_unexpected_exception_is_an_openai_json_500_and_counted():
    async def scenario(client, front, dispatcher) -> None:
        dispatcher.error = KeyError("a bug")
        async with client.post(ROUTE, json={"prompt": "Hi"}) as response:
            assert response.status == 500
            assert response.content_type == "application/json"
            body = await response.json()
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["type"] == "server_error"
        text = await metrics_text(client)
        assert sample(text, "unhandled_errors_total") == 1
        assert sample(text, "requests_total", status="500") == 1
        assert sample(text, "prompts_total", task="open", status="error") == 1

    serve(scenario)


def test_burst_never_exceeds_the_admission_bound():
    async def scenario(client, front, dispatcher) -> None:
        dispatcher.release.clear()

        async def post() -> int:
            async with client.post(ROUTE, json={"prompt": ["a", "b"]}) as response:
                return response.status

        burst = [asyncio.create_task(post()) for _ in range(4)]
        while dispatcher.running < 4 and not any(task.done() for task in burst):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        dispatcher.release.set()
        statuses = sorted(await asyncio.gather(*burst))
        assert dispatcher.peak <= 4
        assert statuses == [200, 200, 503, 503], statuses
        assert dispatcher.admitted == 0

    serve(scenario, "--max-in-flight", "4")


def test_more_prompts_than_could_ever_be_admitted_is_a_400():
    async def scenario(client, front, dispatcher) -> None:
        async with client.post(ROUTE, json={"prompt": ["a", "b", "c"]}) as response:
            body = await response.json()
        assert response.status == 400, body
        assert body["error"]["param"] == "prompt" and "at most 2" in body["error"]["message"]
        assert body["error"]["type"] == "invalid_request_error"
        assert not dispatcher.sent
        async with client.post(ROUTE, json={"prompt": ["a", "b"], "n": 2}) as response:
            assert response.status == 400  # n samples of each prompt count against the bound
        assert not dispatcher.sent
        async with client.post(ROUTE, json={"prompt": ["a", "b"]}) as response:
            assert response.status == 200

    serve(scenario, "--max-in-flight", "2")


def test_n_null_means_the_default():
    assert parse_completion_request(b'{"prompt": "a", "n": null}').options.n == 1
    assert parse_completion_request(b'{"prompt": "a", "n": 1}').options.n == 1
    assert parse_completion_request(b'{"prompt": "a", "n": 3}').options.n == 3
    for bad in (b"129", b"0", b"true", b'"1"'):
        with pytest.raises(ApiError):
            parse_completion_request(b'{"prompt": "a", "n": ' + bad + b"}")


def test_shutdown_stops_replica_restarts_before_in_flight_work_drains():
    async def main() -> None:
        app = server.build_app(parse_args())
        app.freeze()
        await app.shutdown()  # on_shutdown: runs while handlers still drain
        assert app[server.FRONTEND].service.dispatcher.closing

    asyncio.run(main())


def test_requests_still_running_when_the_drain_ends_get_a_503():
    async def scenario(client, front, dispatcher) -> None:
        dispatcher.release.clear()  # the replica never answers
        async with asyncio.TaskGroup() as group:
            pending = group.create_task(client.post(ROUTE, json={"prompt": "Hi"}))
            while not dispatcher.running:
                await asyncio.sleep(0.01)
            started = asyncio.get_running_loop().time()
            front.begin_shutdown()
        async with pending.result() as response:
            body = await response.json()
        assert response.status == 503 and "shutting down" in body["error"]["message"], body
        assert response.headers["Retry-After"] and response.headers["Connection"] == "close"
        waited = asyncio.get_running_loop().time() - started
        assert front.shutdown.drain_s - 0.05 < waited < front.shutdown.drain_s + 0.5
        assert 'requests_total{status="503"} 1' in await metrics_text(client)

    serve(scenario, "--shutdown-timeout", "0.6")


@pytest.mark.parametrize("flag", ["--prefill-tokens", "--max-batch", "--max-model-len"])
def test_sizes_below_one_are_refused_at_start_up(flag, capsys):
    assert parse_args(flag, "64").__dict__[flag[2:].replace("-", "_")] == 64
    with pytest.raises(SystemExit):
        parse_args(flag, "0")
    assert "must be at least 1" in capsys.readouterr().err
