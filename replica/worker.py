"""The replica process: owns one device, turns pipe messages into engine requests and back.

The front end spawns it (queueing.replica_link) with CUDA_VISIBLE_DEVICES already pinned to its
GPU, so importing torch here sees only that device.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import torch

from replica.engine.engine import Engine
from replica.engine.request import EngineRequest, EngineResult
from replica.loading.source import resolve
from replica.text_watch import TextWatch
from replica.tokenization import PromptCodec
from replica.wire.framing import BlockingChannel
from replica.wire.messages import (
    Cancel,
    Cancelled,
    Delta,
    Failed,
    GenerateJob,
    Ready,
    Request,
    Result,
    ScoreJob,
    Shutdown,
    Usage,
)
from replica.wire.spec import ReplicaSpec


def serve(sock: socket.socket, spec: ReplicaSpec) -> None:
    """Process entry point: load, report ready, then serve until shutdown or a closed socket."""
    conn = BlockingChannel(sock)
    started = time.monotonic()
    replica = Replica(spec)
    conn.send(Ready(replica.info(time.monotonic() - started)))
    replica.run(conn)


class ContextOverflow(ValueError):
    """The prompt alone fills the context: OpenAI's context_length_exceeded."""

    param, code = "prompt", "context_length_exceeded"


class Replica:
    def __init__(self, spec: ReplicaSpec) -> None:
        torch.set_num_threads(spec.cpu_threads)
        self.spec = spec
        self.device = "cuda" if spec.gpu is not None and torch.cuda.is_available() else "cpu"
        self.source = resolve(spec.model, spec.random_weights)
        self.codec = PromptCodec(self.source.tokenizer_dir)
        self.engine = Engine(self.source, self.device, eos_ids=self.codec.eos_ids, **spec.options)
        self.max_context = self.engine.max_context
        self.watches: dict[int, tuple[TextWatch, bool]] = {}  # id -> its text, streamed or not

    def info(self, startup_s: float) -> dict[str, Any]:
        return {
            **self.engine.info,
            "model": self.source.name,
            "gpu": self.spec.gpu,
            "pid": os.getpid(),
            "max_context": self.max_context,
            "engine_startup_s": self.engine.info["startup_s"],
            "startup_s": round(startup_s, 2),  # the whole replica: imports, tokenizer, engine
        }

    def run(self, conn: BlockingChannel) -> None:
        while True:
            # Block only when idle; while busy, take what has arrived and step again.
            while not self.engine.has_work() or conn.poll():
                try:
                    message = conn.recv()
                except EOFError:
                    return
                if isinstance(message, Shutdown):
                    return
                self._handle(conn, message)
            for result in self.engine.step():
                conn.send(self._result(result))
            self._follow(conn)

    def _follow(self, conn: BlockingChannel) -> None:
        """Watched requests' new text: streamed out as Deltas, and a stop string ends its
        request at once (cancelled in the engine, so its slot frees now)."""
        for request_id, ids in self.engine.new_tokens():
            watch, streamed = self.watches[request_id]
            watch.add(ids)
            if watch.stopped:
                self.engine.cancel(request_id)
                del self.watches[request_id]
                usage = Usage(watch.prompt_tokens, len(watch.ids))
                conn.send(Result(request_id, watch.text, "stop", usage))
            elif streamed and (piece := watch.unsent()):
                conn.send(Delta(request_id, piece))

    def _handle(self, conn: BlockingChannel, message: Request | Cancel) -> None:
        if isinstance(message, Cancel):
            self.watches.pop(message.id, None)
            if self.engine.cancel(message.id):
                conn.send(Cancelled(message.id))
            return
        try:
            request = self._to_engine_request(message)
        except ValueError as error:  # the request's fault (too long, an odd option): a 400
            param, code = getattr(error, "param", None), getattr(error, "code", None)
            conn.send(Failed(message.id, 400, str(error), param, code))
            return
        self.engine.add(request)
        job = message.job
        if request.watch and isinstance(job, GenerateJob):
            watch = TextWatch(self.codec.decode, len(request.prompt_ids), job.decoding.stop)
            self.watches[message.id] = (watch, job.stream)

    def _to_engine_request(self, message: Request) -> EngineRequest:
        job = message.job
        prefix = job.prefix if isinstance(job, ScoreJob) else ""
        prompt_ids = self.codec.encode_chat(job.messages, prefix)
        room = self.max_context - len(prompt_ids)
        if room < 1:
            raise ContextOverflow(
                f"This model's maximum context length is {self.max_context} tokens, "
                f"but the prompt has {len(prompt_ids)} tokens."
            )
        if isinstance(job, ScoreJob):
            return EngineRequest(
                message.id, prompt_ids, 0, self.codec.choice_ids(list(job.options))
            )
        return EngineRequest(
            message.id,
            prompt_ids,
            min(job.max_tokens, room),
            sampling=job.decoding.sampling,
            watch=job.stream or bool(job.decoding.stop),
        )

    def _result(self, result: EngineResult) -> Result:
        """A Score's answer is its option index and counts one completion token; a watched
        request's text is its watch's, which a stop string in its last tokens still cuts."""
        scored = result.choice_index is not None
        usage = Usage(result.prompt_tokens, 1 if scored else len(result.output_ids))
        kv = self.engine.kv_usage()
        watched = self.watches.pop(result.id, None)
        if watched is None:
            text = self.codec.decode(result.output_ids)
            return Result(result.id, text, result.finish_reason, usage, result.choice_index, kv)
        watch = watched[0]
        watch.add(result.output_ids[len(watch.ids) :])
        text = watch.finish()
        if watch.stopped:
            usage = Usage(result.prompt_tokens, len(watch.ids))
            return Result(result.id, text, "stop", usage, kv=kv)
        return Result(result.id, text, result.finish_reason, usage, kv=kv)
