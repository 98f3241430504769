"""The OpenAI surface of reasoning models: reasoning_effort and chat_template_kwargs parsed (or
a 400 naming them), the thinking budget's precedence (request, then --reasoning-budget, then
the profile), thoughts in chat bodies and deltas, reasoning tokens in usage. The replicas are
faked: their results and deltas carry thoughts as the wire says they do."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

import server
from api.errors import ApiError
from api.params import EFFORT_BUDGETS, UNSUPPORTED
from api.responses import chat_body, completion_body, parse_chat_request, parse_completion_request
from replica.wire import messages as wire
from shortcuts import PROFILES, Reply
from tests.shortcuts_dev_data import rows_of
from tests.test_server_app import FakeDispatcher, parse_args

CHAT = [{"role": "user", "content": "Hi"}]
THOUGHT = ("Let me", " think.")
USAGE = wire.Usage(5, 7, reasoning_tokens=4)


class ThinkingDispatcher(FakeDispatcher):
    """Answers every GenerateJob as a model that thought: `deltas` (text, is thought) stream
    first, then a Result whose text is the answer pieces and whose reasoning is the thought
    pieces (None when there were none)."""

    deltas: tuple[tuple[str, bool], ...] = (*((text, True) for text in THOUGHT), ("Paris", False))
    finish: wire.FinishReason = "stop"

    def result(self) -> wire.Result:
        thought = "".join(text for text, is_thought in self.deltas if is_thought)
        answer = "".join(text for text, is_thought in self.deltas if not is_thought)
        return wire.Result(len(self.sent), answer, self.finish, USAGE, reasoning=thought or None)

    async def submit(self, job: wire.Job) -> wire.Result:
        if isinstance(job, wire.ScoreJob):
            return await super().submit(job)
        self.sent.append(job)
        return self.result()

    async def stream(self, job: wire.GenerateJob) -> AsyncIterator[wire.Delta | wire.Result]:
        self.sent.append(job)
        for text, is_thought in self.deltas:
            yield wire.Delta(len(self.sent), text, reasoning=is_thought)
        yield self.result()


def serve(scenario, *flags: str, deltas=None, finish: wire.FinishReason = "stop") -> None:
    """Run `scenario(client, dispatcher)` against an in-process app with a thinking fake."""

    async def main() -> None:
        args = parse_args(*flags)
        app = server.build_app(args)
        front = app[server.FRONTEND]
        dispatcher = ThinkingDispatcher(args.max_in_flight)
        dispatcher.deltas = ThinkingDispatcher.deltas if deltas is None else deltas
        dispatcher.finish = finish
        front.service.dispatcher = dispatcher
        async with TestClient(TestServer(app)) as client:
            await scenario(client, dispatcher)

    asyncio.run(main())


async def post(client: TestClient, route: str, body: dict) -> dict:
    async with client.post(route, json=body) as response:
        answer = await response.json()
    assert response.status == 200, answer
    return answer


async def events(client: TestClient, route: str, body: dict) -> list[dict]:
    """A stream's chunks, [DONE] checked and dropped."""
    async with client.post(route, json={**body, "stream": True}) as response:
        lines = [line for line in (await response.text()).splitlines() if line]
    assert response.status == 200 and lines[-1] == "data: [DONE]"
    return [orjson.loads(line.removeprefix("data: ")) for line in lines[:-1]]


# Parsing


def chat_options(**fields):
    return parse_chat_request(orjson.dumps({"messages": CHAT, **fields})).options


def completion_options(**fields):
    return parse_completion_request(orjson.dumps({"prompt": "Hi", **fields})).options


@pytest.mark.parametrize("options", [chat_options, completion_options])
def test_reasoning_settings_are_read_on_both_endpoints(options):
    assert (options().enable_thinking, options().thinking_budget) == (None, None)
    assert options(chat_template_kwargs=None, reasoning_effort=None).thinking_budget is None
    for effort, budget in EFFORT_BUDGETS.items():
        assert options(reasoning_effort=effort).thinking_budget == budget
    assert options(reasoning_effort="none").thinking_budget == 0  # the block closes at once
    on = options(chat_template_kwargs={"enable_thinking": True, "other": 1})
    assert on.enable_thinking is True
    assert options(chat_template_kwargs={"enable_thinking": False}).enable_thinking is False
    assert options(chat_template_kwargs={}).enable_thinking is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("reasoning_effort", "extreme"),
        ("reasoning_effort", 3),
        ("reasoning_effort", ["high"]),
        ("chat_template_kwargs", [1]),
        ("chat_template_kwargs", "enable_thinking"),
        ("chat_template_kwargs", {"enable_thinking": "yes"}),
        ("chat_template_kwargs", {"enable_thinking": 1}),
    ],
)
@pytest.mark.parametrize("options", [chat_options, completion_options])
def test_bad_reasoning_settings_are_a_400_naming_them(options, field, value):
    with pytest.raises(ApiError) as refused:
        options(**{field: value})
    assert refused.value.status == 400 and refused.value.param == field
    assert field in str(refused.value)


def test_the_refusal_table_leaves_the_reasoning_settings_alone():
    assert not {"reasoning_effort", "chat_template_kwargs"} & set(UNSUPPORTED)


def test_a_past_thought_is_accepted_and_not_rendered():
    turns = [
        *CHAT,
        {"role": "assistant", "content": "Hello", "reasoning": "greet", "reasoning_content": None},
        {"role": "assistant", "content": "Again", "reasoning_content": "greet again"},
        {"role": "user", "content": "Bye"},
    ]
    request = parse_chat_request(orjson.dumps({"messages": turns}))
    assert request.messages == [{"role": t["role"], "content": t["content"]} for t in turns]
    for name in ("reasoning", "reasoning_content"):
        bad = [*CHAT, {"role": "assistant", "content": "Hello", name: {"text": "x"}}]
        with pytest.raises(ApiError) as refused:
            parse_chat_request(orjson.dumps({"messages": bad}))
        assert refused.value.param == "messages" and name in str(refused.value)


# Bodies


def test_chat_body_carries_a_thought_under_both_names_or_neither():
    replies = [
        Reply("chat", "Paris", "stop", wire.Usage(5, 7, 4), reasoning="Let me think."),
        Reply("chat", "Lyon", "length", wire.Usage(0, 3, 1)),
    ]
    body = chat_body("m", replies)
    thinking, plain = (choice["message"] for choice in body["choices"])
    assert thinking == {
        "role": "assistant",
        "content": "Paris",
        "reasoning": "Let me think.",
        "reasoning_content": "Let me think.",
    }
    assert plain == {"role": "assistant", "content": "Lyon"}
    assert body["usage"]["completion_tokens"] == 10
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 5}


def test_completion_usage_sums_reasoning_tokens_and_text_is_the_answer():
    replies = [Reply("open", "a", usage=wire.Usage(2, 6, 4)), Reply("open", "b", usage=USAGE)]
    body = completion_body("m", ["p", "q"], replies)
    assert [choice["text"] for choice in body["choices"]] == ["a", "b"]
    assert body["usage"] == {
        "prompt_tokens": 7,
        "completion_tokens": 13,
        "total_tokens": 20,
        "completion_tokens_details": {"reasoning_tokens": 8},
    }


# Through the app


def test_chat_answers_with_its_thought_and_carries_the_reasoning():
    async def scenario(client, dispatcher) -> None:
        body = {
            "messages": CHAT,
            "reasoning_effort": "high",
            "chat_template_kwargs": {"enable_thinking": True},
        }
        answer = await post(client, "/v1/chat/completions", body)
        [choice] = answer["choices"]
        assert choice["message"]["content"] == "Paris"
        assert choice["message"]["reasoning"] == choice["message"]["reasoning_content"]
        assert choice["message"]["reasoning"] == "Let me think."
        assert answer["usage"]["completion_tokens_details"] == {"reasoning_tokens": 4}
        [job] = dispatcher.sent
        assert job.reasoning == wire.Reasoning(True, EFFORT_BUDGETS["high"])

    serve(scenario)


def test_a_chat_without_a_thought_has_no_reasoning_fields():
    async def scenario(client, dispatcher) -> None:
        answer = await post(client, "/v1/chat/completions", {"messages": CHAT})
        message = answer["choices"][0]["message"]
        assert message == {"role": "assistant", "content": "Paris"}
        streamed = await events(client, "/v1/chat/completions", {"messages": CHAT})
        deltas = [chunk["choices"][0]["delta"] for chunk in streamed]
        assert deltas == [{"role": "assistant", "content": "Paris"}, {"content": ""}]

    serve(scenario, deltas=(("Paris", False),))


def stream_deltas(chunks: list[dict]) -> list[tuple[dict, str | None]]:
    return [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks]


def test_chat_stream_sends_thought_pieces_then_the_answer_right_after():
    async def scenario(client, dispatcher) -> None:
        body = {"messages": CHAT, "stream_options": {"include_usage": True}}
        *chunks, usage = await events(client, "/v1/chat/completions", body)
        assert stream_deltas(chunks) == [
            ({"role": "assistant", "reasoning": "Let me", "reasoning_content": "Let me"}, None),
            ({"reasoning": " think.", "reasoning_content": " think."}, None),
            ({"content": "Paris"}, None),
            ({"content": ""}, "stop"),
        ]
        assert usage["choices"] == []
        assert usage["usage"]["completion_tokens_details"] == {"reasoning_tokens": 4}

    serve(scenario)


def test_chat_stream_of_a_thought_that_never_closes():
    async def scenario(client, dispatcher) -> None:
        chunks = await events(client, "/v1/chat/completions", {"messages": CHAT})
        assert stream_deltas(chunks) == [
            ({"role": "assistant", "reasoning": "Let me", "reasoning_content": "Let me"}, None),
            ({"reasoning": " think.", "reasoning_content": " think."}, None),
            ({"content": ""}, "length"),
        ]
        answer = await post(client, "/v1/chat/completions", {"messages": CHAT})
        message = answer["choices"][0]["message"]
        assert message["content"] == "" and message["reasoning_content"] == "Let me think."

    serve(scenario, deltas=tuple((text, True) for text in THOUGHT), finish="length")


def test_completions_send_the_answer_alone_streamed_or_not():
    async def scenario(client, dispatcher) -> None:
        body = {"prompt": "What is the capital of France?", "reasoning_effort": "low"}
        whole = await post(client, "/v1/completions", body)
        assert whole["choices"][0]["text"] == "Paris"
        assert whole["usage"]["completion_tokens_details"] == {"reasoning_tokens": 4}
        chunks = await events(client, "/v1/completions", body)
        pieces = [(c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in chunks]
        assert pieces == [("Paris", None), ("", "stop")]
        assert all(job.reasoning.budget == EFFORT_BUDGETS["low"] for job in dispatcher.sent)

    serve(scenario, deltas=(*((text, True) for text in THOUGHT), ("Paris ", False)))


# Budgets and their precedence


def test_reasoning_budget_below_one_is_refused_at_start_up(capsys):
    assert parse_args("--reasoning-budget", "64").reasoning_budget == 64
    assert parse_args().reasoning_budget is None
    with pytest.raises(SystemExit):
        parse_args("--reasoning-budget", "0")
    assert "must be at least 1" in capsys.readouterr().err


def test_each_profile_has_a_budget_under_its_open_cap():
    budgets = [PROFILES[name].reasoning_budget for name in ("throughput", "balanced", "accuracy")]
    assert budgets == sorted(budgets) and budgets[0] >= 1
    assert all(p.reasoning_budget < p.open_cap for p in PROFILES.values())


@pytest.mark.parametrize(
    ("flags", "effort", "budget"),
    [
        (("--profile", "balanced"), None, PROFILES["balanced"].reasoning_budget),
        (("--profile", "accuracy"), None, PROFILES["accuracy"].reasoning_budget),
        (("--profile", "accuracy", "--reasoning-budget", "77"), None, 77),
        (("--reasoning-budget", "77"), "medium", EFFORT_BUDGETS["medium"]),
        (("--reasoning-budget", "77"), "none", 0),
    ],
)
def test_budget_precedence_request_then_flag_then_profile(flags, effort, budget):
    mcq = rows_of("mmlu_med")[0]["prompt"]
    extra = {} if effort is None else {"reasoning_effort": effort}

    async def scenario(client, dispatcher) -> None:
        await post(client, "/v1/chat/completions", {"messages": CHAT, **extra})
        await post(client, "/v1/completions", {"prompt": [mcq, "Hi"], **extra})
        generated = [job for job in dispatcher.sent if isinstance(job, wire.GenerateJob)]
        assert len(generated) >= 2  # the chat turn and the open prompt (an MCQ may reason too)
        assert all(job.reasoning == wire.Reasoning(None, budget) for job in generated)
        assert any(isinstance(job, wire.ScoreJob) for job in dispatcher.sent)  # unchanged

    serve(scenario, *flags)


def test_chat_default_cap_leaves_the_thought_its_budget_unless_thinking_is_off():
    async def scenario(client, dispatcher) -> None:
        await post(client, "/v1/chat/completions", {"messages": CHAT})
        await post(client, "/v1/chat/completions", {"messages": CHAT, "reasoning_effort": "high"})
        off = {"enable_thinking": False}
        await post(client, "/v1/chat/completions", {"messages": CHAT, "chat_template_kwargs": off})
        await post(client, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 9})
        caps = [job.max_tokens for job in dispatcher.sent]
        assert caps == [4096 + 100, 4096 + EFFORT_BUDGETS["high"], 4096, 9]

    serve(scenario, "--reasoning-budget", "100")
