"""Prompt shaping: turn a routed prompt into what the server does next, and the model's output
into the final answer text.

`plan` returns an immediate Answer (graph solved on the CPU), a Score request (one prefill,
argmax over the option letters after `prefix`) or a Generate request (decode up to
`max_tokens`; the server also applies the client's cap). `finish` turns the replica's output
into the response text; for a reasoning MCQ without a valid letter it returns the Score
request to fall back on. A Generate whose task is "graph" is a graph-looking prompt the
solver could not parse: the server logs and counts it.
"""

from __future__ import annotations

from dataclasses import dataclass

from shortcuts import graph, mcq
from shortcuts.profiles import get_profile
from shortcuts.router import Route, route
from shortcuts.text import split_infobench, strip_think, task_text

Message = dict[str, str]

OPEN_SYSTEM = (
    "Follow the instruction exactly and meet every requirement it states (content, format, "
    "length, structure). Give a complete, well-structured answer that is concise: no preamble, "
    "no repetition, no closing remarks."
)
MCQ_SYSTEM = "You are a medical expert. Answer multiple-choice questions accurately."
ANSWER_PREFIX = "The answer is ("


@dataclass(frozen=True)
class Answer:
    """Answered without the model."""

    task: Route
    text: str


@dataclass(frozen=True)
class Score:
    """Pick one of `choices` by its next-token logit after chat(messages) + prefix."""

    task: Route
    messages: list[Message]
    prefix: str
    choices: list[str]


@dataclass(frozen=True)
class Generate:
    """Decode an assistant turn for chat(messages), at most `max_tokens` tokens."""

    task: Route
    messages: list[Message]
    max_tokens: int
    fallback: Score | None = None


Plan = Answer | Score | Generate


def plan(prompt: str, profile: str) -> Plan:
    """What to do with one prompt under one profile (throughput, balanced, accuracy)."""
    limits = get_profile(profile)
    text = task_text(prompt)
    task = route(prompt)
    if task == "graph":
        parsed = graph.parse_graph(text)
        if parsed is not None:
            return Answer(task, graph.solve(parsed))
        return Generate(task, _open_messages(text), limits.open_cap)
    if task == "mcq":
        score = _score_request(text)
        if limits.mcq_reasoning_cap is None:
            return score
        return Generate(
            task, _reasoning_messages(text, score.choices), limits.mcq_reasoning_cap, score
        )
    return Generate(task, _open_messages(text), limits.open_cap)


def plan_unshaped(prompt: str, profile: str) -> Generate:
    """The prompt as it stands, for the model: the fallback when planning fails or runs too
    long (no parsing at all, so it cannot fail or stall the same way)."""
    messages = [{"role": "system", "content": OPEN_SYSTEM}, {"role": "user", "content": prompt}]
    return Generate("open", messages, get_profile(profile).open_cap)


def finish(request: Score | Generate, output: str) -> str | Score:
    """Final text from a Score's chosen letter or a Generate's text; a Score means: run it."""
    if isinstance(request, Score):
        if output not in request.choices:
            raise ValueError(f"chosen {output!r} is not one of {request.choices}")
        return mcq.answer_line(output)
    text = strip_think(output)
    if request.fallback is None:
        return text
    letter = mcq.chosen_letter(text, request.fallback.choices)
    return request.fallback if letter is None else mcq.answer_line(letter)


def _letters_hint(letters: list[str]) -> str:
    return ", ".join(letters[:-1]) + f" or {letters[-1]}"


def _score_request(text: str) -> Score:
    letters = mcq.option_letters(text)
    user = (
        f"{mcq.question_text(text)}\n\n"
        f'Reply with "The answer is (X)", where X is {_letters_hint(letters)}.'
    )
    messages = [{"role": "system", "content": MCQ_SYSTEM}, {"role": "user", "content": user}]
    return Score("mcq", messages, ANSWER_PREFIX, letters)


def _reasoning_messages(text: str, letters: list[str]) -> list[Message]:
    user = (
        f"{mcq.question_text(text)}\n\n"
        "Think it through briefly (a few sentences), then end with exactly one line "
        f'"The answer is (X)." where X is {_letters_hint(letters)}.'
    )
    return [{"role": "system", "content": MCQ_SYSTEM}, {"role": "user", "content": user}]


def _open_messages(text: str) -> list[Message]:
    parts = split_infobench(text)
    user = text if parts is None else "\n\n".join(p for p in parts if p)
    return [{"role": "system", "content": OPEN_SYSTEM}, {"role": "user", "content": user}]
