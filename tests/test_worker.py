"""The replica's side of the pipe: typed messages in, typed messages out, with a tiny-random
engine running in a thread of this process on one end of a socket pair."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from replica.wire.framing import BlockingChannel, FrameDecoder, encode_frame
from replica.wire.messages import (
    Cancel,
    Cancelled,
    Failed,
    FromReplica,
    GenerateJob,
    Request,
    Result,
    ScoreJob,
    Shutdown,
    ToReplica,
)
from replica.wire.spec import ReplicaSpec
from replica.worker import Replica

CHAT = [{"role": "user", "content": "Which letter comes first?\nA. a\nB. b\nC. c"}]


class FrontEnd:
    """The front end's end of the socket, read blocking (no event loop needed here)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = FrameDecoder[FromReplica]()

    def send(self, message: ToReplica) -> None:
        self.sock.sendall(encode_frame(message))

    def recv(self) -> FromReplica:
        """The next reply (each test reads all of its replies before the next one sends)."""
        replies: list[FromReplica] = []
        while not replies:
            data = self.sock.recv(1 << 16)
            assert data, "the replica closed its end"
            replies = self.decoder.feed(data)
        [reply] = replies
        return reply


@pytest.fixture(scope="module")
def front() -> Iterator[FrontEnd]:
    ours, theirs = socket.socketpair()
    ours.settimeout(120)
    replica = Replica(ReplicaSpec("tiny-random"))
    loop = threading.Thread(target=replica.run, args=(BlockingChannel(theirs),), daemon=True)
    loop.start()
    end = FrontEnd(ours)
    yield end
    end.send(Shutdown())
    loop.join(30)
    assert not loop.is_alive(), "Shutdown must end the replica's loop"


def test_a_score_comes_back_as_the_index_of_an_option(front):
    front.send(Request(1, ScoreJob(CHAT, "The answer is (", ("A", "B", "C"))))
    result = front.recv()
    assert isinstance(result, Result) and result.id == 1
    assert result.choice in (0, 1, 2) and result.text == ""
    assert result.usage.completion_tokens == 1 and result.usage.prompt_tokens > 10


def test_a_generate_comes_back_as_text_with_its_usage(front):
    front.send(Request(2, GenerateJob(CHAT, 3)))
    result = front.recv()
    assert isinstance(result, Result) and result.choice is None
    assert result.finish_reason == "length" and result.usage.completion_tokens == 3


def test_results_report_the_kv_pool_and_a_repeated_prompt_hits_the_prefix_cache(front):
    front.send(Request(20, GenerateJob(CHAT, 2)))
    first = front.recv()
    front.send(Request(21, GenerateJob(CHAT, 2)))
    second = front.recv()
    assert isinstance(first, Result) and isinstance(second, Result)
    assert first.kv is not None and second.kv is not None
    assert second.kv.blocks_free == second.kv.blocks_total  # nothing held once it is done
    assert second.kv.blocks_cached > 0
    admitted = second.kv.prompt_tokens - first.kv.prompt_tokens
    hits = second.kv.prompt_tokens_cached - first.kv.prompt_tokens_cached
    assert admitted == second.usage.prompt_tokens
    assert hits == (admitted - 1) // 16 * 16  # every full block but the one with the last token


def test_a_prompt_over_the_context_is_refused_with_openai_fields(front):
    front.send(Request(3, GenerateJob([{"role": "user", "content": "hello " * 5000}], 3)))
    refusal = front.recv()
    assert isinstance(refusal, Failed) and (refusal.id, refusal.status) == (3, 400)
    assert (refusal.param, refusal.code) == ("prompt", "context_length_exceeded")
    assert "maximum context length is 4096 tokens" in refusal.message


def test_a_cancelled_request_is_dropped_and_acknowledged(front):
    front.send(Request(4, GenerateJob(CHAT, 2000)))
    front.send(Cancel(4))
    assert front.recv() == Cancelled(4)
