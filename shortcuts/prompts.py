"""Prompt shaping: turn a routed prompt into its plan (shortcuts.plans), under a profile's caps
and the client's `max_tokens`.

A solved graph is an Answer; an MCQ is a Score (one prefill, argmax over the option letters
after `prefix`) or, under the accuracy profile, a Generate that reasons first with the Score as
its fallback (a model that thinks scores the letters after its thoughts instead, voting:
`with_settings` sets how many); anything else is a Generate. A graph-shaped prompt the solver cannot take is an
UnsolvedGraph: the model answers it as open text.
"""

from __future__ import annotations

from replica.wire.messages import Chat
from shortcuts import graph, mcq
from shortcuts.plans import Answer, Generate, Plan, Score, UnsolvedGraph
from shortcuts.profiles import get_profile
from shortcuts.router import GraphPrompt, McqPrompt, routed

OPEN_SYSTEM = (
    "Follow the instruction exactly and meet every requirement it states (content, format, "
    "length, structure). Give a complete, well-structured answer that is concise: no preamble, "
    "no repetition, no closing remarks."
)
MCQ_SYSTEM = "You are a medical expert. Answer multiple-choice questions accurately."
ANSWER_PREFIX = "The answer is ("


def plan(prompt: str, profile: str, max_tokens: int | None = None) -> Plan:
    """What to do with one prompt under one profile (throughput, balanced, accuracy);
    `max_tokens` is the client's cap on generated tokens, if any."""
    limits = get_profile(profile)
    open_cap = _capped(limits.open_cap, max_tokens)
    found = routed(prompt)
    if isinstance(found, GraphPrompt):
        if found.graph is None:
            return UnsolvedGraph("graph", _open_messages(found.text, None), open_cap)
        return Answer("graph", graph.solve(found.graph))
    if isinstance(found, McqPrompt):
        score = _score_request(found.text, found.letters)
        if limits.mcq_reasoning_cap is None:
            return score
        reasoning = _reasoning_messages(found.text, found.letters)
        return Generate("mcq", reasoning, _capped(limits.mcq_reasoning_cap, max_tokens), score)
    return Generate("open", _open_messages(found.text, found.infobench), open_cap)


def plan_unshaped(prompt: str, profile: str, max_tokens: int | None = None) -> Generate:
    """The prompt as it stands, for the model: the fallback when planning fails or runs too
    long (no parsing at all, so it cannot fail or stall the same way)."""
    messages = [{"role": "system", "content": OPEN_SYSTEM}, {"role": "user", "content": prompt}]
    return Generate("open", messages, _capped(get_profile(profile).open_cap, max_tokens))


def _capped(cap: int, max_tokens: int | None) -> int:
    return cap if max_tokens is None else min(cap, max_tokens)


def _letters_hint(letters: list[str]) -> str:
    return ", ".join(letters[:-1]) + f" or {letters[-1]}"


def _score_request(text: str, letters: list[str]) -> Score:
    user = (
        f"{mcq.question_text(text)}\n\n"
        f'Reply with "The answer is (X)", where X is {_letters_hint(letters)}.'
    )
    messages = [{"role": "system", "content": MCQ_SYSTEM}, {"role": "user", "content": user}]
    return Score("mcq", messages, ANSWER_PREFIX, letters)


def _reasoning_messages(text: str, letters: list[str]) -> Chat:
    user = (
        f"{mcq.question_text(text)}\n\n"
        "Think it through briefly (a few sentences), then end with exactly one line "
        f'"The answer is (X)." where X is {_letters_hint(letters)}.'
    )
    return [{"role": "system", "content": MCQ_SYSTEM}, {"role": "user", "content": user}]


def _open_messages(text: str, infobench: tuple[str, str] | None) -> Chat:
    user = text if infobench is None else "\n\n".join(part for part in infobench if part)
    return [{"role": "system", "content": OPEN_SYSTEM}, {"role": "user", "content": user}]
