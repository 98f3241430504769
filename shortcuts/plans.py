"""What the server does with one planned prompt, and how each plan reaches its final answer.

A plan asks the model (a `Model`: the dispatcher, in the server) zero, one or two times and
returns a Reply: the final text plus the tokens spent. Every decision about the model's output
(stripping reasoning, reading the chosen letter, falling back to scoring) is made here, so the
HTTP layer only awaits `plan.replies(model, n)` and renders what comes back: n replies, one per
sample the client asked for (an answer found without sampling is the same in each).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Literal

from replica.wire import messages as wire
from shortcuts import mcq
from shortcuts.router import Route
from shortcuts.text import strip_think

Model = Callable[[wire.Job], Awaitable[wire.Result]]
Task = Route | Literal["chat"]  # chat: /v1/chat/completions, the messages as given (no routing)


@dataclass(frozen=True)
class Reply:
    """One prompt's final answer, and the tokens the model processed for it (none for an
    answer found in the front end); for chat, the thought before it (None: none)."""

    task: Task
    text: str
    finish_reason: wire.FinishReason = "stop"
    usage: wire.Usage = field(default_factory=wire.Usage)
    reasoning: str | None = None


@dataclass(frozen=True)
class Answer:
    """Answered in the front end (a solved graph): no model call."""

    task: Route
    text: str

    async def replies(self, model: Model, n: int = 1) -> list[Reply]:
        return [Reply(self.task, self.text)] * n


@dataclass(frozen=True)
class Score:
    """Pick one of `choices` (option letters) by the model's next token after the chat
    template of `messages` plus `prefix`: one prefill, no decoding."""

    task: Route
    messages: wire.Chat
    prefix: str
    choices: list[str]

    async def replies(self, model: Model, n: int = 1) -> list[Reply]:
        """One scoring prefill; its argmax is every sample's answer."""
        result = await model(wire.ScoreJob(self.messages, self.prefix, tuple(self.choices)))
        reply = Reply(self.task, mcq.answer_line(self.letter(result)), "stop")
        return carrying([reply] * n, result.usage)

    def letter(self, result: wire.Result) -> str:
        """The letter of the option the replica chose."""
        if result.choice is None or not 0 <= result.choice < len(self.choices):
            raise ValueError(f"choice {result.choice!r} is not an index into {self.choices}")
        return self.choices[result.choice]


@dataclass(frozen=True)
class Generate:
    """Decode an assistant turn for `messages`, at most `max_tokens` tokens (the profile's cap
    and the client's). With a `fallback` (an MCQ under the accuracy profile) the turn reasons
    its way to a letter, and the fallback Score runs when the reasoning names none. A model
    that thinks does so under `reasoning`; the answer text (never the thought) is read. Such a
    model answers an MCQ by thinking and then scoring the fallback's letters after the thought,
    over `votes` sampled thoughts (the replica's `if_thinking` path): no text to parse."""

    task: Route
    messages: wire.Chat
    max_tokens: int
    fallback: Score | None = None
    decoding: wire.Decoding = field(default_factory=wire.Decoding)  # the default: greedy
    reasoning: wire.Reasoning = field(default_factory=wire.Reasoning)
    votes: int = 1

    def job(self, n: int = 1) -> wire.GenerateJob:
        fallback = self.fallback
        if_thinking = None
        if fallback is not None:
            choices = tuple(fallback.choices)
            if_thinking = wire.ScoreJob(fallback.messages, fallback.prefix, choices, self.votes)
        return wire.GenerateJob(
            self.messages,
            self.max_tokens,
            self.decoding,
            n=n,
            reasoning=self.reasoning,
            if_thinking=if_thinking,
        )

    async def replies(self, model: Model, n: int = 1) -> list[Reply]:
        result = await model(self.job(n))
        if self.fallback is not None and result.choice is not None:  # thought, then scored
            reply = Reply(self.task, mcq.answer_line(self.fallback.letter(result)), "stop")
            return carrying([reply] * n, result.usage)
        samples = [(strip_think(s.text), s.finish_reason) for s in result.samples]
        if self.fallback is None:
            return carrying([Reply(self.task, *sample) for sample in samples], result.usage)
        letters = [mcq.chosen_letter(text, self.fallback.choices) for text, _ in samples]
        # One scoring prefill answers every sample that named no letter.
        scored = await self.fallback.replies(model) if None in letters else []
        replies = [
            scored[0] if letter is None else Reply(self.task, mcq.answer_line(letter), reason)
            for letter, (_, reason) in zip(letters, samples, strict=True)
        ]
        return carrying(replies, sum((r.usage for r in scored), result.usage))


def carrying(replies: list[Reply], usage: wire.Usage) -> list[Reply]:
    """The replies of one prompt with its usage on the first: summed over a response's
    choices, the prompt counts once and every sample's tokens count."""
    empty = wire.Usage()
    return [replace(reply, usage=usage if i == 0 else empty) for i, reply in enumerate(replies)]


class UnsolvedGraph(Generate):
    """A graph-shaped prompt the solver cannot take (unparsable, or over its caps): the model
    answers it as an open instruction, and the planner logs and counts it."""


Plan = Answer | Score | Generate


def with_settings(
    plan: Plan, decoding: wire.Decoding, reasoning: wire.Reasoning, votes: int = 1
) -> Plan:
    """The plan under the client's decoding settings, the request's reasoning and the server's
    MCQ votes: they apply to what the model generates (a Score picks its letter by argmax,
    whatever they say; only an MCQ's Generate votes)."""
    if isinstance(plan, Generate):
        votes = votes if plan.fallback is not None else 1
        return replace(plan, decoding=decoding, reasoning=reasoning, votes=votes)
    return plan
