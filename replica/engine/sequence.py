"""One request's state inside the engine, from admission to its result.

Each piece has one writer: the engine writes what a sequence generated (`output`, `limit`,
`reported`, `thought`); the scheduler writes where it lives (`kv`: its blocks, its decode row, its
admission). The model runner reads both and keeps its own device-side copy of the block tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from replica.engine.request import EngineRequest, EngineResult
from replica.engine.thinking import Thought
from replica.wire.messages import FinishReason, SamplingParams

SEED_RANGE = 2**63  # seeds are int64 on the device
SampleKey = tuple[int, int]  # (request id, sample index): one sequence


@dataclass
class Placement:
    """Where a sequence's K/V live and which decode row it holds: the scheduler's to write."""

    blocks: list[int] = field(default_factory=list)  # its block table
    computed: int = 0  # tokens whose K/V are in its blocks
    row: int = -1  # its decode row while it runs
    admission: int = -1  # when it was last admitted: the newest is preempted first
    forks: int = 0  # samples still to fork from its prefill
    fork_blocks: list[int] = field(default_factory=list)  # reserved for the forks' copies


@dataclass
class Sequence:
    """One sample of a request. A request with n > 1 is admitted as its sample 0, holding
    n - 1 more decode rows' worth of promise; its prefill forks the others, which share its
    full blocks and start from its logits."""

    request: EngineRequest
    # How it draws its tokens: the request's settings with a seed (the engine draws one for a
    # sampled request that brings none); None for greedy, which takes the greedy decode graphs.
    sampling: SamplingParams | None = None
    sample: int = 0
    kv: Placement = field(default_factory=Placement)
    limit: int = 0  # most tokens it may generate: its cap, bounded by the context
    output: list[int] = field(default_factory=list)
    reported: int = 0  # output tokens Engine.new_tokens has handed out (watched requests)
    thought: Thought | None = None  # its think block, while and after it thinks

    @property
    def id(self) -> int:
        return self.request.id

    @property
    def key(self) -> SampleKey:
        return self.id, self.sample

    @property
    def rows_needed(self) -> int:
        """Decode rows it takes once prefilled: its own and its forks'."""
        return 1 + self.kv.forks

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

    def fork(self, sample: int, placement: Placement) -> Sequence:
        """Sample `sample` of the same request, prefilled as this one is (`placement` holds
        its K/V): drawn from seed + sample, so each sample has its own stream and a given seed
        repeats."""
        sampling = self.sampling
        if sampling is not None:
            sampling = replace(sampling, seed=((sampling.seed or 0) + sample) % SEED_RANGE)
        return Sequence(self.request, sampling, sample, placement)

    def choice_result(self, index: int, probs: list[float]) -> EngineResult:
        """A scoring sequence's result; one made of a finished thought reports that thought
        and its first prompt's length."""
        prompt_tokens, thought = self.prompt_len, None
        span = self.request.thought_span
        if span is not None:
            prompt_tokens, thought = span[0], self.request.prompt_ids[span[0] : span[1]]
        return EngineResult(
            self.id,
            prompt_tokens,
            choice_index=index,
            sample=self.sample,
            thought_ids=thought,
            choice_probs=probs,
        )

    def result(self, finish_reason: FinishReason) -> EngineResult:
        thought_ids, answer = None, self.output
        if self.thought is not None:
            thought_ids, answer = self.thought.split(self.output)
        return EngineResult(
            id=self.id,
            prompt_tokens=self.prompt_len,
            output_ids=answer,
            finish_reason=finish_reason,
            sample=self.sample,
            thought_ids=thought_ids,
        )
