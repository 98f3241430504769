"""What the engine takes and gives back: tokens in, tokens (or a chosen option) out.

A request is frozen: it crosses into the engine unmodified, and what the engine decides about it
(a drawn seed, its KV) lives on its `Sequence`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from replica.wire.messages import FinishReason, SamplingParams


@dataclass(frozen=True)
class EngineRequest:
    """A tokenized request. `choice_ids` is set for scoring: no decode, argmax among them."""

    id: int
    prompt_ids: list[int]
    max_new_tokens: int = 0
    choice_ids: list[int] | None = None
    sampling: SamplingParams | None = None  # None: greedy
    watch: bool = False  # report its new tokens each step (Engine.new_tokens)
    n: int = 1  # samples, forked from one prefill (OpenAI's `n`)


@dataclass
class EngineResult:
    id: int
    prompt_tokens: int
    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason = "stop"
    choice_index: int | None = None
    sample: int = 0  # which of the request's n samples this is
