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
    arrival: int = 0  # admission order: the newest running sequence is preempted first
    blocks: list[int] = field(default_factory=list)  # its block table (the scheduler's to fill)
    computed: int = 0  # tokens whose K/V are in its blocks
    row: int = -1  # its decode row while it runs
    table_written: int = 0  # blocks of `blocks` already in the decode graphs' block table
    limit: int = 0  # most tokens it may generate: its cap, bounded by the context
    output: list[int] = field(default_factory=list)
    reported: int = 0  # output tokens Engine.new_tokens has handed out (watched requests)

    @property
    def id(self) -> int:
        return self.request.id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def tokens(self) -> list[int]:
        """What its K/V must hold: the prompt and what it generated (a preempted sequence
        computes them all again)."""
        return self.request.prompt_ids + self.output

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
