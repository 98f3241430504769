"""The graph task: recognise it, parse it from the prompt's own words, answer it exactly."""

from __future__ import annotations

import re
from dataclasses import dataclass

from shortcuts.paths import Digraph

MAX_NODES = 2000  # beyond these the front end would stall: such prompts go to the model
MAX_PATHS = 100

_EDGE = re.compile(r"(?<![\d.-])(\d+)\s*->\s*(\d+)\s*,?\s*weight\s*[:=]?\s*(-?\d+(?:\.\d+)?)", re.I)
_NODES = re.compile(r"\bgraph\s+with\s+(\d+)\s+nodes\b", re.I)
_NUMBERED = re.compile(r"\bnumbered\s+0\s+to\s+(\d+)\b", re.I)
_TOP = re.compile(r"\btop[\s-]+(\d+)\s+(?:shortest|cheapest)\s+paths?\b", re.I)
_THE = re.compile(r"\bthe\s+(?:shortest|cheapest)\s+path\s+from\s+node\b", re.I)
_ENDS = re.compile(r"\bfrom\s+node\s+(\d+)\s+to\s+node\s+(\d+)\b", re.I)
_LOOKS = (re.compile(r"\bdirected\s+graph\b", re.I), re.compile(r"\bshortest\s+paths?\b", re.I))


@dataclass(frozen=True)
class GraphTask:
    """A parsed top-P shortest-paths question."""

    n: int
    edges: tuple[tuple[int, int, int], ...]
    p: int
    source: int
    target: int


def looks_like_graph(text: str) -> bool:
    """A directed-graph shortest-path question with an edge list (parsable or not)."""
    return all(p.search(text) for p in _LOOKS) and _EDGE.search(text) is not None


def parse_graph(text: str) -> GraphTask | None:
    """Every number from the text itself; None when anything is missing or out of range."""
    nodes, numbered = _NODES.search(text), _NUMBERED.search(text)
    ends = _ENDS.findall(text)
    top = _TOP.search(text)
    if not ends or not (nodes or numbered) or not (top or _THE.search(text)):
        return None
    n = int(nodes.group(1)) if nodes else int(numbered.group(1)) + 1
    if nodes and numbered and int(numbered.group(1)) != n - 1:
        return None
    source, target = map(int, ends[-1])
    p = int(top.group(1)) if top else 1
    raw = _EDGE.findall(text)
    if any("." in w for _, _, w in raw):
        return None
    edges = tuple((int(u), int(v), int(w)) for u, v, w in raw)
    if not 0 < n <= MAX_NODES or not 0 < p <= MAX_PATHS or not edges:
        return None
    if not (source < n and target < n) or any(u >= n or v >= n or w <= 0 for u, v, w in edges):
        return None
    return GraphTask(n, edges, p, source, target)


def solve(task: GraphTask) -> str:
    """The answer text the grader parses: `submit_paths(paths=[[0, 3, 9]], weights=[25])`."""
    found = Digraph(task.n, task.edges).top_paths(task.source, task.target, task.p)
    return f"submit_paths(paths={[list(p) for _, p in found]}, weights={[c for c, _ in found]})"
