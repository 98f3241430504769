"""Which path a prompt takes: the exact graph solver, MCQ letter scoring, or open generation."""

from __future__ import annotations

import logging
from typing import Literal

from shortcuts.graph import looks_like_graph
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
    if looks_like_graph(text):
        return "graph"
    if split_infobench(text) is None and looks_like_mcq(text):
        return "mcq"
    return "open"
