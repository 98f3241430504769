"""One batch in which every row asks for something different, each row checked on its own.

Greedy and sampled rows, temperatures, top-k, top-p, seeds, stop strings and token caps share
one prefill and the same decode steps through the replica's worker (the path a request takes from
the pipe to the engine and back). Each row's text must be what transformers' logits and the
reference sampler give for that row alone, so a setting applied to the wrong row, or one row's
setting applied to all, fails here.
"""

from __future__ import annotations

import socket
import threading

import pytest

from replica.loading.reference import build_reference_model
from replica.loading.source import resolve
from replica.wire.framing import BlockingChannel, FrameDecoder, encode_frame
from replica.wire.messages import (
    Decoding,
    FromReplica,
    GenerateJob,
    Request,
    Result,
    SamplingParams,
    Shutdown,
)
from replica.wire.spec import EngineConfig, ReplicaSpec
from replica.worker import Replica
from tests.transformers_oracle import sampled_continuation

# (sampling, max_tokens, stop after this many tokens of the row's own text, or None)
ROWS: list[tuple[SamplingParams | None, int, int | None]] = [
    (None, 12, None),
    (SamplingParams(temperature=0.6, seed=11), 16, None),
    (SamplingParams(temperature=1.4, seed=12), 9, None),
    (SamplingParams(temperature=1.0, top_p=0.5, seed=13), 14, None),
    (SamplingParams(temperature=1.0, top_k=3, seed=14), 20, None),
    (SamplingParams(temperature=1.0, top_k=40, top_p=0.9, seed=15), 18, None),
    (SamplingParams(temperature=1.0, seed=16), 10, None),
    (SamplingParams(temperature=1.0, seed=17), 24, 6),
    (None, 22, 4),
]


def chat(row: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Row {row}: write " + "some words " * (row + 1)}]


@pytest.fixture(scope="module")
def replica() -> Replica:
    config = EngineConfig(max_batch=16, max_model_len=256)
    return Replica(ReplicaSpec("tiny-random", engine=config))


def run_together(replica: Replica, jobs: list[GenerateJob]) -> dict[int, Result]:
    """Send every job in one write, so the worker admits them all before its first step."""
    ours, theirs = socket.socketpair()
    ours.settimeout(120)
    loop = threading.Thread(target=replica.run, args=(BlockingChannel(theirs),), daemon=True)
    loop.start()
    ours.sendall(b"".join(encode_frame(Request(i, job)) for i, job in enumerate(jobs)))
    decoder, results = FrameDecoder[FromReplica](), {}
    while len(results) < len(jobs):
        data = ours.recv(1 << 16)
        assert data, "the replica closed its end"
        for message in decoder.feed(data):
            assert isinstance(message, Result), message
            results[message.id] = message
    ours.sendall(encode_frame(Shutdown()))
    loop.join(30)
    return results


def test_every_row_of_a_mixed_batch_gets_its_own_settings(replica):
    reference = build_reference_model(resolve("tiny-random"))
    codec = replica.codec
    jobs, expected = [], []
    for row, (sampling, cap, stop_after) in enumerate(ROWS):
        prompt = codec.encode_chat(chat(row), "")
        tokens = sampled_continuation(reference, prompt, sampling, cap)
        assert len(tokens) == cap  # these weights emit no EOS here: every cap is reached
        text, stop = codec.decode(tokens), ()
        if stop_after is not None:  # a stop string from the row's own text, past its start
            before = codec.decode(tokens[:stop_after])
            stop = (text[len(before) : len(before) + 3],)
            assert stop[0] and text.find(stop[0]) >= len(before) // 2
            text = text[: text.find(stop[0])]
        jobs.append(GenerateJob(chat(row), cap, Decoding(sampling, stop)))
        expected.append((text, cap if stop_after is None else None))
    prefills = replica.engine.stats.prefill_calls
    results = run_together(replica, jobs)
    assert replica.engine.stats.prefill_calls == prefills + 1  # one batch, all rows together
    for row, (text, tokens) in enumerate(expected):
        result = results[row]
        assert result.text == text, f"row {row}: {ROWS[row]}"
        if tokens is None:
            assert result.finish_reason == "stop", f"row {row}"
        else:
            assert (result.finish_reason, result.usage.completion_tokens) == ("length", tokens)
