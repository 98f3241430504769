"""A checkpoint's generation_config.json: its sampling settings replace a request's where the
request leaves them open (vLLM's default), and on the course path only for a model that thinks,
seeded by the prompt so the same prompt gets the same answer."""

from __future__ import annotations

import json
import shutil
import socket
import threading
from pathlib import Path

import orjson
import pytest

from api.responses import parse_chat_request, parse_completion_request
from replica.loading.config import tiny_random_config
from replica.loading.source import THINKING_TEMPLATE, VENDORED_TOKENIZER, sampling_defaults
from replica.wire.framing import BlockingChannel
from replica.wire.messages import (
    Decoding,
    GenerateJob,
    Reasoning,
    Request,
    SamplingParams,
    Shutdown,
)
from replica.wire.spec import ReplicaSpec
from replica.worker import Replica, prompt_seed
from tests.test_reasoning import Front, ask

CHAT = [{"role": "user", "content": "Name a colour."}]
RECOMMENDED = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}  # Thinking-2507's cards


def tiny_checkpoint(root: Path, generation: dict | None, thinking: bool = True) -> Path:
    """A config-only tiny Qwen3 dir (random weights) with the Thinking-2507 template (or the
    hybrid one) and, when given, a generation_config.json."""
    root.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(VENDORED_TOKENIZER / name, root / name)
    if thinking:
        shutil.copy(THINKING_TEMPLATE / "tokenizer_config.json", root / "tokenizer_config.json")
    (root / "config.json").write_text(tiny_random_config().to_json_string())
    if generation is not None:
        (root / "generation_config.json").write_text(json.dumps(generation))
    return root


def test_the_checkpoint_s_sampling_settings_are_read(tmp_path):
    path = tmp_path / "generation_config.json"
    assert sampling_defaults(path) is None  # absent
    path.write_text(json.dumps({"bos_token_id": 1, "do_sample": True}))
    assert sampling_defaults(path) is None  # sets none of the three
    path.write_text(json.dumps(RECOMMENDED))
    assert sampling_defaults(path) == SamplingParams(0.6, 0.95, 20)
    path.write_text(json.dumps({"top_p": 0.8}))
    assert sampling_defaults(path) == SamplingParams(1.0, 0.8, 0)  # the rest: a request's


@pytest.mark.parametrize(
    ("fields", "chat", "completions"),
    [
        ({}, "always", "thinking"),
        ({"seed": 3}, "always", "thinking"),  # a seed alone leaves the settings open
        ({"temperature": 0}, "never", "never"),
        ({"top_k": 5}, "never", "never"),
    ],
)
def test_a_request_leaves_sampling_to_the_checkpoint_only_when_it_sets_none(
    fields, chat, completions
):
    chat_body = orjson.dumps({"messages": CHAT, **fields})
    completion_body = orjson.dumps({"prompt": "Hi", **fields})
    assert parse_chat_request(chat_body).options.decoding.defaults == chat
    assert parse_completion_request(completion_body).options.decoding.defaults == completions


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> dict[str, Replica]:
    root = tmp_path_factory.mktemp("models")
    return {
        name: Replica(
            ReplicaSpec(str(tiny_checkpoint(root / name, RECOMMENDED, thinking)), (), True)
        )
        for name, thinking in (("thinking", True), ("hybrid", False))
    }


def engine_sampling(
    replica: Replica, decoding: Decoding, reasoning: Reasoning | None = None
) -> SamplingParams | None:
    job = GenerateJob(CHAT, 32, decoding, reasoning=reasoning or Reasoning())
    return replica._to_engine_request(Request(1, job)).sampling


def test_the_checkpoint_s_settings_apply_where_the_request_leaves_them(replicas):
    thinking, hybrid = replicas["thinking"], replicas["hybrid"]
    assert thinking.source.sampling_defaults == SamplingParams(0.6, 0.95, 20)
    prompt = thinking._to_engine_request(Request(1, GenerateJob(CHAT, 32))).prompt_ids
    # the course path: a thinking model samples, seeded by its prompt
    course = engine_sampling(thinking, Decoding(defaults="thinking"))
    assert course == SamplingParams(0.6, 0.95, 20, prompt_seed(prompt))
    # ... a model that does not think stays greedy there, and samples once it is asked to think
    assert engine_sampling(hybrid, Decoding(defaults="thinking")) is None
    assert (
        engine_sampling(hybrid, Decoding(defaults="thinking"), Reasoning(enabled=True)).top_k == 20
    )
    # chat: always, the client's seed kept (none: the engine draws one)
    seeded = Decoding(SamplingParams(1.0, seed=7), defaults="always")
    assert engine_sampling(hybrid, seeded) == SamplingParams(0.6, 0.95, 20, 7)
    assert engine_sampling(thinking, Decoding(SamplingParams(1.0), defaults="always")).seed is None
    # a request that set its own settings keeps them
    own = SamplingParams(0.3, 0.5, 2, 9)
    assert engine_sampling(thinking, Decoding(own, defaults="never")) == own
    assert engine_sampling(thinking, Decoding(None, defaults="never")) is None


def test_the_course_path_answer_of_a_thinking_model_is_reproducible(replicas):
    """Served end to end: sampled (not the greedy answer), the same text twice."""
    replica = replicas["thinking"]
    ours, theirs = socket.socketpair()
    ours.settimeout(120)
    loop = threading.Thread(target=replica.run, args=(BlockingChannel(theirs),), daemon=True)
    loop.start()
    front = Front(ours)
    budget = Reasoning(budget=8)
    first, _ = ask(front, GenerateJob(CHAT, 24, Decoding(defaults="thinking"), reasoning=budget))
    again, _ = ask(front, GenerateJob(CHAT, 24, Decoding(defaults="thinking"), reasoning=budget), 2)
    greedy, _ = ask(front, GenerateJob(CHAT, 24, Decoding(defaults="never"), reasoning=budget), 3)
    front.send(Shutdown())
    loop.join(30)
    assert (first.reasoning, first.text) == (again.reasoning, again.text)
    assert (first.reasoning, first.text) != (greedy.reasoning, greedy.text)
