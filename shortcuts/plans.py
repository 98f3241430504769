"""What the server does with one planned prompt, and how each plan reaches its final answer.

A plan asks the model (a `Model`: the dispatcher, in the server) zero, one or two times and
returns a Reply: the final text plus the tokens spent. Every decision about the model's output
(stripping reasoning, reading the chosen letter, falling back to scoring) is made here, so the
HTTP layer only awaits `plan.reply(model)` and renders what comes back.
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
    answer found in the front end)."""

    task: Task
    text: str
    finish_reason: wire.FinishReason = "stop"
    usage: wire.Usage = field(default_factory=wire.Usage)


@dataclass(frozen=True)
class Answer:
    """Answered in the front end (a solved graph): no model call."""

    task: Route
    text: str

    async def reply(self, model: Model) -> Reply:
        return Reply(self.task, self.text)


@dataclass(frozen=True)
class Score:
    """Pick one of `choices` (option letters) by the model's next token after the chat
    template of `messages` plus `prefix`: one prefill, no decoding."""

    task: Route
    messages: wire.Chat
    prefix: str
    choices: list[str]

    async def reply(self, model: Model) -> Reply:
        result = await model(wire.ScoreJob(self.messages, self.prefix, tuple(self.choices)))
        return Reply(self.task, mcq.answer_line(self.letter(result)), "stop", result.usage)

    def letter(self, result: wire.Result) -> str:
        """The letter of the option the replica chose."""
        if result.choice is None or not 0 <= result.choice < len(self.choices):
            raise ValueError(f"choice {result.choice!r} is not an index into {self.choices}")
        return self.choices[result.choice]


@dataclass(frozen=True)
class Generate:
    """Decode an assistant turn for `messages`, at most `max_tokens` tokens (the profile's cap
    and the client's). With a `fallback` (an MCQ under the accuracy profile) the turn reasons
    its way to a letter, and the fallback Score runs when the reasoning names none."""

    task: Route
    messages: wire.Chat
    max_tokens: int
    fallback: Score | None = None
    decoding: wire.Decoding = field(default_factory=wire.Decoding)  # the default: greedy

    @property
    def job(self) -> wire.GenerateJob:
        return wire.GenerateJob(self.messages, self.max_tokens, self.decoding)

    async def reply(self, model: Model) -> Reply:
        result = await model(self.job)
        text = strip_think(result.text)
        if self.fallback is None:
            return Reply(self.task, text, result.finish_reason, result.usage)
        letter = mcq.chosen_letter(text, self.fallback.choices)
        if letter is not None:
            return Reply(self.task, mcq.answer_line(letter), result.finish_reason, result.usage)
        scored = await self.fallback.reply(model)
        return replace(scored, usage=result.usage + scored.usage)


class UnsolvedGraph(Generate):
    """A graph-shaped prompt the solver cannot take (unparsable, or over its caps): the model
    answers it as an open instruction, and the planner logs and counts it."""


Plan = Answer | Score | Generate


def with_decoding(plan: Plan, decoding: wire.Decoding) -> Plan:
    """The plan under the client's decoding settings: they apply to what the model generates
    (a Score picks its letter by argmax, whatever they say)."""
    return replace(plan, decoding=decoding) if isinstance(plan, Generate) else plan
