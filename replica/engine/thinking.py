"""A thinking sequence's think block: where it ends, and the closing the engine forces once
the thought has used its budget.

The engine keeps one `Thought` per thinking sequence and passes each token it is about to
append through `Thought.choose`: a sampled token stays, unless the budget is spent, when the
closing text's next token replaces it (on the host, so decoding stays one graph replay a step).
"""

from __future__ import annotations

from dataclasses import dataclass

from replica.engine.request import EngineRequest, ThinkBudget


@dataclass
class Thought:
    """The think block of one sample. `budget` is the request's, at most half of what the
    sample may generate, so its answer always has room."""

    think: ThinkBudget
    budget: int
    forced: int = -1  # closing tokens forced so far; -1: not forcing
    end: int | None = None  # where `</think>` sits in the output; None: still thinking

    @classmethod
    def begin(cls, think: ThinkBudget | None, limit: int) -> Thought | None:
        if think is None:
            return None
        return cls(think, min(think.budget, limit // 2))

    def choose(self, sampled: int, generated: int) -> int:
        """The token to append as output token number `generated` (0-based)."""
        if self.end is None and self.forced < 0 and generated >= self.budget:
            self.forced = 0
        token = sampled
        if 0 <= self.forced < len(self.think.closing_ids):
            token = self.think.closing_ids[self.forced]
            self.forced += 1
        if self.end is None and token == self.think.end_id:
            self.end = generated
        return token

    def split(self, output: list[int]) -> tuple[list[int], list[int]]:
        """(the think block, its closing `</think>` included; the answer)."""
        cut = len(output) if self.end is None else self.end + 1
        return output[:cut], output[cut:]


def scoring_request(request: EngineRequest, thought: Thought, output: list[int]) -> EngineRequest:
    """The prefill that scores a finished thought (`request.then_score`): the prompt, the
    thought (closed with `</think>` if the model stopped inside it), the answer's opening."""
    assert request.then_score is not None
    ids, _ = thought.split(output)
    start = len(request.prompt_ids)
    closing = [] if thought.end is not None else [thought.think.end_id]
    return EngineRequest(
        request.id,
        request.prompt_ids + ids + closing + list(request.then_score.suffix_ids),
        choice_ids=list(request.then_score.choice_ids),
        thought_span=(start, start + len(ids)),
    )
