"""One request's state inside the engine, from admission to its result."""

from __future__ import annotations

from dataclasses import dataclass, field

from replica.engine.request import EngineRequest, EngineResult
from replica.wire.messages import FinishReason, SamplingParams


@dataclass
class Sequence:
    request: EngineRequest
    # How it draws its tokens: the request's settings with a seed (the engine draws one for a
    # sampled request that brings none); None for greedy, which takes the greedy decode graphs.
    sampling: SamplingParams | None = None
    slot: int = -1  # its KV-cache slot while it runs (the scheduler's to give and take)
    limit: int = 0  # most tokens it may generate: its cap, bounded by the slot's length
    output: list[int] = field(default_factory=list)
    reported: int = 0  # output tokens Engine.new_tokens has handed out (watched requests)

    @property
    def id(self) -> int:
        return self.request.id

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def is_scoring(self) -> bool:
        return self.request.choice_ids is not None

    @property
    def position(self) -> int:
        """Where its newest token sits: the next decode step feeds that token at that position."""
        return self.prompt_len + len(self.output) - 1

    def result(self, finish_reason: FinishReason) -> EngineResult:
        return EngineResult(
            id=self.id,
            prompt_tokens=self.prompt_len,
            output_ids=self.output,
            finish_reason=finish_reason,
        )
