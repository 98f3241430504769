"""OpenAI parity end to end, with the real `openai` client against server subprocesses on
checkpoints saved by transformers: chat equals transformers' greedy generate, streams add up
to the unstreamed text, seeds, `n`, stops, /v1/models, refused fields, and a client that
leaves mid-stream frees its slot."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

from replica.loading.config import tiny_random_config
from replica.loading.source import VENDORED_TOKENIZER
from replica.tokenization import PromptCodec
from tests.prometheus_text import sample
from tests.server_process import ServerProcess, request
from tests.test_moe import save_tiny_moe
from tests.transformers_oracle import greedy_continuations

pytestmark = pytest.mark.slow
CHATS = [
    [{"role": "user", "content": "Hello there"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, ünïcödé ✓"},
    ],
]
NEW_TOKENS = 24


def at_once(*calls: Callable[[], Any]) -> list[Any]:
    """Each call's result, in order, the calls made concurrently: the server batches them, so
    a test of independent requests takes one request's decode steps, not the sum (and each
    answer must not depend on its neighbours in the batch)."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [future.result() for future in [pool.submit(call) for call in calls]]


def save_tiny_dense(directory: Path) -> Path:
    """A tiny dense Qwen3 with an untied head and the real tokenizer's vocabulary."""
    torch.manual_seed(0)
    config = tiny_random_config()
    config.tie_word_embeddings = False
    Qwen3ForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=["dense", "moe"])
def checkpoint(request, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp(request.param)
    return save_tiny_dense(directory) if request.param == "dense" else save_tiny_moe(directory)


@pytest.fixture(scope="module")
def server(checkpoint):
    with ServerProcess("--model", str(checkpoint), "--served-model-name", "tiny") as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_greedy_chat_equals_transformers_generate(checkpoint, client):
    codec = PromptCodec(VENDORED_TOKENIZER)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    for messages in CHATS:
        prompt = codec.encode_chat(messages)
        [expected] = greedy_continuations(reference, [prompt], NEW_TOKENS)
        answer = client.chat.completions.create(
            model="tiny", messages=messages, temperature=0, max_tokens=NEW_TOKENS
        )
        assert answer.object == "chat.completion" and answer.model == "tiny"
        assert answer.choices[0].message.content == codec.decode(expected)
        assert answer.usage.prompt_tokens == len(prompt)
        assert answer.usage.completion_tokens == len(expected)


def test_streams_add_up_to_the_unstreamed_text(client):
    settings = {"model": "tiny", "max_tokens": NEW_TOKENS, "temperature": 0}
    whole = client.chat.completions.create(messages=CHATS[1], **settings)
    chunks = list(
        client.chat.completions.create(
            messages=CHATS[1], stream=True, stream_options={"include_usage": True}, **settings
        )
    )
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    prompts = ["Tell me a story.", "Hi"]
    whole = client.completions.create(prompt=prompts, **settings)
    pieces = {0: "", 1: ""}
    for chunk in client.completions.create(prompt=prompts, stream=True, **settings):
        for choice in chunk.choices:
            pieces[choice.index] += choice.text
    assert [pieces[0], pieces[1]] == [choice.text for choice in whole.choices]


def test_seed_makes_sampling_reproducible(client):
    def sampled(seed: int) -> str:
        answer = client.chat.completions.create(
            model="tiny", messages=CHATS[0], temperature=1.0, seed=seed, max_tokens=NEW_TOKENS
        )
        return answer.choices[0].message.content

    first = sampled(1)  # alone; then again beside other requests
    again, other, completion, greedy = at_once(
        lambda: sampled(1),
        lambda: sampled(2),
        lambda: client.completions.create(
            model="tiny", prompt="Tell me a story.", temperature=1.0, seed=1, max_tokens=NEW_TOKENS
        ),
        lambda: client.completions.create(model="tiny", prompt="Tell me a story.", max_tokens=24),
    )
    assert first == again
    assert first != other
    assert completion.choices[0].text != greedy.choices[0].text


def test_n_samples_are_seed_plus_index_and_stream_alike(client):
    """n samples of one prompt: sample j is what n = 1 gives with seed + j; usage counts the
    prompt once; streamed choices add up to the unstreamed ones."""
    settings = {"model": "tiny", "temperature": 1.0, "max_tokens": NEW_TOKENS}
    alone = [
        client.chat.completions.create(messages=CHATS[1], seed=7 + j, **settings) for j in range(3)
    ]
    together = client.chat.completions.create(messages=CHATS[1], seed=7, n=3, **settings)
    assert [choice.index for choice in together.choices] == [0, 1, 2]
    texts = [answer.choices[0].message.content for answer in alone]
    assert len(set(texts)) == 3
    assert [choice.message.content for choice in together.choices] == texts
    assert together.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert together.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    pieces = ["", "", ""]
    for chunk in client.chat.completions.create(
        messages=CHATS[1], seed=7, n=3, stream=True, **settings
    ):
        for choice in chunk.choices:
            pieces[choice.index] += choice.delta.content or ""
    assert pieces == texts

    prompts = ["Tell me a story.", "Hi"]
    whole = client.completions.create(prompt=prompts, seed=3, n=2, **settings)
    assert [(c.index, c.model_extra["prompt"]) for c in whole.choices] == [
        (0, prompts[0]),
        (1, prompts[0]),
        (2, prompts[1]),
        (3, prompts[1]),
    ]
    for i, choice in enumerate(whole.choices):
        [single] = client.completions.create(
            prompt=prompts[i // 2], seed=3 + i % 2, **settings
        ).choices
        assert choice.text == single.text, i


def test_stop_strings_end_the_text(client):
    settings = {"model": "tiny", "messages": CHATS[0], "temperature": 0, "max_tokens": 200}
    full = client.chat.completions.create(**settings).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full[: full.find(stop)]

    def streamed() -> str:
        chunks = client.chat.completions.create(stop=stop, stream=True, **settings)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    answer, streamed_text, both = at_once(
        lambda: client.chat.completions.create(stop=[stop, "never-there"], **settings),
        streamed,
        lambda: client.chat.completions.create(stop=stop, n=2, **settings),  # each sample watched
    )
    assert answer.choices[0].message.content == cut
    assert answer.choices[0].finish_reason == "stop"
    assert streamed_text == cut
    assert [(c.message.content, c.finish_reason) for c in both.choices] == [(cut, "stop")] * 2


def test_models_and_refused_fields(server, client):
    assert [model.id for model in client.models.list()] == ["tiny"]
    for field, value in [("echo", True), ("logprobs", 2), ("suffix", "x"), ("best_of", 3)]:
        status, body, _ = request(server.url + "/v1/completions", {"prompt": "Hi", field: value})
        assert status == 400 and body["error"]["param"] == field
    status, body, _ = request(
        server.url + "/v1/chat/completions",
        {"messages": CHATS[0], "tools": [{"type": "function"}]},
    )
    assert status == 400 and body["error"]["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=CHATS[0], temperature=3)
    assert refused.value.body["param"] == "temperature"


def test_a_client_leaving_mid_stream_frees_its_slot(server):
    body = {"messages": CHATS[0], "max_tokens": 3000, "stream": True, "temperature": 0}
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", "/v1/chat/completions", json.dumps(body))
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    connection.close()  # mid-stream: thousands of tokens are still to come
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, metrics, _ = request(server.url + "/metrics", method="GET")
        if sample(metrics, "replica_cancelled_total") >= 1:
            break
        time.sleep(0.2)
    assert sample(metrics, "replica_cancelled_total") >= 1
    assert sample(metrics, "in_flight") == 0
