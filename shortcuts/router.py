"""Which path a prompt takes: the exact graph solver, MCQ letter scoring, or open generation.

Routing reads the prompt once: what it found on the way (the task text without wrappers, the
InfoBench parts, the option letters, the parsed graph) travels on in the routed prompt, so
prompt shaping never parses again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Literal

from shortcuts.graph import GraphTask, looks_like_graph, parse_graph
from shortcuts.mcq import offered_letters
from shortcuts.text import split_infobench, task_text

Route = Literal["graph", "mcq", "open"]  # what `route` finds in a prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GraphPrompt:
    """The course's graph task; `graph` is None when the solver cannot take it (unparsable, or
    over its caps)."""

    task: ClassVar[Route] = "graph"
    text: str
    graph: GraphTask | None


@dataclass(frozen=True)
class McqPrompt:
    """A multiple-choice question offering `letters` (two or more, from A)."""

    task: ClassVar[Route] = "mcq"
    text: str
    letters: list[str]


@dataclass(frozen=True)
class OpenPrompt:
    """Anything else; `infobench` is (instruction, input) when the course's wrapper held it."""

    task: ClassVar[Route] = "open"
    text: str
    infobench: tuple[str, str] | None = None


Routed = GraphPrompt | McqPrompt | OpenPrompt


def route(prompt: str) -> Route:
    """Classify by content; anything unrecognised (or any surprise) is open. Never raises."""
    return routed(prompt).task


def routed(prompt: str) -> Routed:
    """The prompt's route and what routing parsed. A router bug must cost one answer's
    quality, not the request: it is logged and the prompt is open."""
    text = prompt
    try:
        text = task_text(prompt)
        return _classify(text)
    except Exception:
        log.exception("router failed; routing to open")
        return OpenPrompt(text)


def _classify(text: str) -> Routed:
    """An InfoBench-wrapped prompt is an open instruction, whatever it quotes (an edge list, an
    A/B list), unless it holds a graph task that actually parses."""
    infobench = split_infobench(text)
    if infobench is not None:
        graph = parse_graph(text)
        return OpenPrompt(text, infobench) if graph is None else GraphPrompt(text, graph)
    if looks_like_graph(text):
        return GraphPrompt(text, parse_graph(text))
    letters = offered_letters(text)
    return McqPrompt(text, letters) if letters else OpenPrompt(text)
