"""What crosses the pipe between the front end and a replica, and what an engine consumes.

Pipe messages are plain dicts (cheap to pickle). Front end -> replica:
  {"op": "generate", "id": int, "messages": [{"role", "content"}], "max_tokens": int}
  {"op": "score", "id": int, "messages": [...], "prefix": str, "choices": ["A", "B", ...]}
  {"op": "cancel", "id": int}
  {"op": "shutdown"}
Replica -> front end:
  {"op": "ready", "info": {...}}
  {"op": "result", "id": int, "text": str, "finish_reason": "stop" | "length",
   "prompt_tokens": int, "completion_tokens": int, "choice": str | None}
  {"op": "error", "id": int, "status": int, "message": str, "code": str}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

Kind = Literal["generate", "score"]


@dataclass
class EngineRequest:
    """A tokenized request. `choice_ids` is set for scoring: no decode, argmax among them."""

    id: int
    prompt_ids: list[int]
    max_new_tokens: int = 0
    choice_ids: list[int] | None = None

    @property
    def kind(self) -> Kind:
        return "score" if self.choice_ids is not None else "generate"


@dataclass
class EngineResult:
    id: int
    prompt_tokens: int
    output_ids: list[int] = field(default_factory=list)
    finish_reason: Literal["stop", "length"] = "stop"
    choice_index: int | None = None
    choice_logits: list[float] | None = None


class Engine(Protocol):
    """The contract every backend of a replica fulfils (reference or our own engine)."""

    def add(self, request: EngineRequest) -> None:
        """Queue a request; it is admitted on a later `step`."""

    def cancel(self, request_id: int) -> bool:
        """Drop a queued or running request and free its slot; False if unknown."""

    def has_work(self) -> bool:
        """True while any request is queued or running."""

    def step(self) -> list[EngineResult]:
        """Advance all running work by one unit (a decode step, a prefill); return what finished."""
