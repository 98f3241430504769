"""What the engine takes and gives back: tokens in, tokens (or a chosen option) out.

A request is frozen: it crosses into the engine unmodified, and what the engine decides about it
(a drawn seed, its KV) lives on its `Sequence`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from replica.wire.messages import FinishReason, SamplingParams


@dataclass(frozen=True)
class ThinkBudget:
    """A request whose prompt opens a think block (it ends with `<think>\n`): at most `budget`
    tokens of thought, then the engine forces `closing_ids` (which hold `end_id`, `</think>`)
    unless the model closed the block itself."""

    budget: int
    end_id: int
    closing_ids: tuple[int, ...]


@dataclass(frozen=True)
class ThenScore:
    """A thinking request that ends in a choice: once a sample's think block closes,
    `suffix_ids` (the answer's opening) follow it, and one more prefill over it all (the
    thought's blocks come from the prefix cache) ranks `choice_ids` next."""

    suffix_ids: tuple[int, ...]
    choice_ids: tuple[int, ...]


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
    think: ThinkBudget | None = None  # None: it starts in its answer
    then_score: ThenScore | None = None  # with `think`: score after the thought, no answer
    # A scoring request made of a finished thought: where that thought lies in its prompt
    thought_span: tuple[int, int] | None = None


@dataclass
class EngineResult:
    """A finished sample: `output_ids` is its answer; a thinking one's think block comes apart
    in `thought_ids` (its closing `</think>` included when it got there)."""

    id: int
    prompt_tokens: int
    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason = "stop"
    choice_index: int | None = None
    sample: int = 0  # which of the request's n samples this is
    thought_ids: list[int] | None = None  # None: it did not think
    choice_probs: list[float] | None = None  # a scoring one's: each choice's probability
