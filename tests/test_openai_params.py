"""Request validation of the OpenAI settings: each wrong or unsupported field is a 400 that
names it; bodies without decoding settings keep the course's greedy path."""

from __future__ import annotations

import orjson
import pytest

from api.errors import ApiError
from api.responses import parse_chat_request, parse_completion_request
from replica.wire.messages import Decoding, SamplingParams

CHAT = [{"role": "user", "content": "Hi"}]


def completion(**fields):
    return parse_completion_request(orjson.dumps({"prompt": "Hi", **fields})).options


def test_no_decoding_settings_is_the_greedy_unstopped_default():
    # greedy, unless the model thinks and its checkpoint recommends sampling settings
    assert completion(max_tokens=5).decoding == Decoding(defaults="thinking")
    assert completion(temperature=0, stop=None).decoding == Decoding()
    assert completion(echo=False, logprobs=None, best_of=1, n=1).max_tokens is None


def test_sampling_fields_and_their_defaults():
    assert completion(seed=3).decoding.sampling == SamplingParams(1.0, 1.0, 0, 3)
    assert completion(temperature=0.5, top_p=0.9, top_k=-1).decoding.sampling == SamplingParams(
        0.5, 0.9, 0, None
    )
    chat = parse_chat_request(orjson.dumps({"messages": CHAT})).options
    assert chat.decoding.sampling == SamplingParams(1.0)
    assert completion(max_completion_tokens=7, max_tokens=9).max_tokens == 7
    assert completion(stop="x").decoding.stop == ("x",)
    streamed = completion(stream=True, stream_options={"include_usage": True})
    assert streamed.stream and streamed.include_usage


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 2.5),
        ("temperature", "hot"),
        ("top_p", 0),
        ("top_k", -2),
        ("seed", -1),
        ("seed", 1.5),
        ("max_completion_tokens", 0),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", [""]),
        ("stream", "yes"),
        ("stream_options", [1]),
        ("n", 0),
        ("n", 129),
        ("n", 1.5),
        ("echo", True),
        ("suffix", "x"),
        ("best_of", 2),
        ("logprobs", 1),
        ("logit_bias", {"1": 5}),
        ("presence_penalty", 0.5),
        ("tools", [{"type": "function"}]),
    ],
)
def test_each_bad_or_unsupported_field_is_named(field, value):
    with pytest.raises(ApiError) as refused:
        completion(**{field: value})
    assert refused.value.status == 400 and refused.value.param == field


@pytest.mark.parametrize(
    "messages",
    [[], "Hi", [{"role": "tool", "content": "x"}], [{"role": "user", "content": 3}]],
)
def test_chat_messages_must_be_text_turns(messages):
    with pytest.raises(ApiError) as refused:
        parse_chat_request(orjson.dumps({"messages": messages}))
    assert refused.value.param == "messages"


def test_chat_text_parts_are_joined():
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    request = parse_chat_request(orjson.dumps({"messages": [{"role": "user", "content": parts}]}))
    assert request.messages == [{"role": "user", "content": "Hello"}]
