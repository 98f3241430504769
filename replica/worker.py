"""The replica process: owns one device, turns pipe messages into engine requests and back.

torch is imported only inside `serve`, after CUDA_VISIBLE_DEVICES pins the process to its GPU.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from replica.protocol import BlockingChannel


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything a replica needs to start; picklable so a spawned process can receive it."""

    model: str
    gpu: int | None = None
    random_weights: bool = False
    cpu_threads: int = 1
    options: dict[str, Any] = field(default_factory=dict)


def serve(sock: socket.socket, spec: ReplicaSpec) -> None:
    """Process entry point: load, report ready, then serve until shutdown or a closed socket.

    SIGINT/SIGTERM are ignored: a Ctrl-C or a process-group SIGTERM reaches replicas too, and the
    front end owns their lifecycle (it drains in-flight work, then sends "shutdown").
    """
    ignore_stop_signals()
    from replica.protocol import BlockingChannel

    conn = BlockingChannel(sock)
    if spec.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(spec.gpu)
    started = time.monotonic()
    replica = Replica(spec)
    conn.send({"op": "ready", "info": replica.info(time.monotonic() - started)})
    replica.run(conn)


def ignore_stop_signals() -> None:
    """For processes the front end owns (replicas, planners): it alone decides when they stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class ContextOverflow(ValueError):
    """The prompt alone fills the context: OpenAI's context_length_exceeded."""

    param, code = "prompt", "context_length_exceeded"


class Replica:
    def __init__(self, spec: ReplicaSpec) -> None:
        import torch

        from replica.checkpoint import resolve
        from replica.engine import Engine
        from replica.tokenization import PromptCodec

        torch.set_num_threads(spec.cpu_threads)
        self.spec = spec
        self.device = "cuda" if spec.gpu is not None and torch.cuda.is_available() else "cpu"
        self.source = resolve(spec.model, spec.random_weights)
        self.codec = PromptCodec(self.source.tokenizer_dir)
        self.engine = Engine(self.source, self.device, eos_ids=self.codec.eos_ids, **spec.options)
        self.max_context = self.engine.max_seq_len
        self.pending: dict[int, dict[str, Any]] = {}

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
                if message["op"] == "shutdown":
                    return
                self._handle(conn, message)
            for result in self.engine.step():
                conn.send(self._answer(result))

    def _handle(self, conn: BlockingChannel, message: dict[str, Any]) -> None:
        if message["op"] == "cancel":
            if self.engine.cancel(message["id"]):
                self.pending.pop(message["id"], None)
                conn.send({"op": "cancelled", "id": message["id"]})
            return
        try:
            request = self._to_engine_request(message)
        except ValueError as error:
            conn.send(
                {
                    "op": "error",
                    "id": message["id"],
                    "status": 400,
                    "message": str(error),
                    "param": getattr(error, "param", None),
                    "code": getattr(error, "code", None),
                }
            )
            return
        self.pending[request.id] = message
        self.engine.add(request)

    def _to_engine_request(self, message: dict[str, Any]):
        from replica.protocol import EngineRequest

        prompt_ids = self.codec.encode_chat(message["messages"], message.get("prefix", ""))
        room = self.max_context - len(prompt_ids)
        if room < 1:
            raise ContextOverflow(
                f"This model's maximum context length is {self.max_context} tokens, "
                f"but the prompt has {len(prompt_ids)} tokens."
            )
        if message["op"] == "score":
            choice_ids = self.codec.choice_ids(message["choices"])
            return EngineRequest(message["id"], prompt_ids, 0, choice_ids)
        return EngineRequest(message["id"], prompt_ids, min(message["max_tokens"], room))

    def _answer(self, result) -> dict[str, Any]:
        message = self.pending.pop(result.id)
        choice = None if result.choice_index is None else message["choices"][result.choice_index]
        return {
            "op": "result",
            "id": result.id,
            "text": self.codec.decode(result.output_ids),
            "finish_reason": result.finish_reason,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": 1 if choice is not None else len(result.output_ids),
            "choice": choice,
        }
