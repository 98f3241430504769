"""Which path a prompt takes: the exact graph solver, MCQ letter scoring, or open generation."""

from __future__ import annotations

import logging
from typing import Literal

from shortcuts.graph import looks_like_graph, parse_graph
from shortcuts.mcq import looks_like_mcq
from shortcuts.text import split_infobench, task_text

Route = Literal["graph", "mcq", "open"]

log = logging.getLogger(__name__)


def route(prompt: str) -> Route:
    """Classify by content; anything unrecognised (or any surprise) is open. Never raises."""
    try:
        return _classify(task_text(prompt))
    except Exception:  # a router bug must cost one answer's quality, not the request
        log.exception("router failed; routing to open")
        return "open"


def _classify(text: str) -> Route:
    """An InfoBench-wrapped prompt is an open instruction, whatever it quotes (an edge list, an
    A/B list), unless it holds a graph task that actually parses."""
    if split_infobench(text) is not None:
        return "graph" if parse_graph(text) is not None else "open"
    if looks_like_graph(text):
        return "graph"
    return "mcq" if looks_like_mcq(text) else "open"
