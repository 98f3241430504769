"""The graph task: recognise it, parse it from the prompt's own words, answer it exactly."""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import chain, islice

from shortcuts.paths import Digraph

# Caps bound the exact solve (slowest accepted graph about 70 ms: `python -m
# loadtest.solver_timing`). Yen's work is at most P x (path length <= N) x (one Dijkstra over the
# edges); the dev graphs reach N = 20, 200 edges, P = 3 and N x edges x P = 8000. Beyond any cap
# the prompt goes to the model, as an unparsable one.
MAX_NODES = 100
MAX_EDGES = 2000
MAX_PATHS = 20
MAX_WORK = 1_000_000  # N x edges x P: 125x the dev maximum
MAX_DIGITS = 9  # longer numbers are nonsense here (and past 4300 digits int() raises)

# No two adjacent quantifiers match the same characters (`\s*,?\s*` would rescan a whitespace
# run once per split: quadratic), so every pattern here runs in linear time.
_EDGE = re.compile(
    r"(?<![\d.-])(\d+)\s*->\s*(\d+)\s*(?:,\s*)?weight\s*(?:[:=]\s*)?(-?\d+(?:\.\d+)?)", re.I
)
_NODES = re.compile(r"\bgraph\s+with\s+(\d+)\s+nodes\b", re.I)
_NUMBERED = re.compile(r"\bnumbered\s+0\s+to\s+(\d+)\b", re.I)
_PATHS = r"(?:shortest|cheapest)\s+path(?:s|\(s\))?"
# The question: "Find the top P shortest paths from node s to node t" (or "the shortest path").
# P, s and t all come from this one sentence.
_QUERY = re.compile(
    rf"\b(?:top[\s-]+(\d+)|the)\s+{_PATHS}\s+from\s+node\s+(\d+)\s+to\s+node\s+(\d+)\b", re.I
)
_DIRECTED = re.compile(r"\bdirected\s+graph\b", re.I)


@dataclass(frozen=True)
class GraphTask:
    """A parsed top-P shortest-paths question."""

    n: int
    edges: tuple[tuple[int, int, int], ...]
    p: int
    source: int
    target: int


def looks_like_graph(text: str) -> bool:
    """The course's task shape (a directed graph, an edge list, the top-P question), parsable
    or not: an open instruction that merely mentions shortest paths does not qualify."""
    return all(r.search(text) for r in (_DIRECTED, _EDGE, _QUERY))


def parse_graph(text: str) -> GraphTask | None:
    """Every number from the text itself; None when anything is missing, ambiguous, out of
    range or over the caps. Never raises."""
    queries = set(_QUERY.findall(text))
    nodes, numbered = _NODES.search(text), _NUMBERED.search(text)
    raw = list(islice(_EDGE.finditer(text), MAX_EDGES + 1))
    if len(queries) != 1 or not (nodes or numbered) or not 0 < len(raw) <= MAX_EDGES:
        return None
    [(top, source, target)] = queries
    header = [top or "1", source, target, *(m.group(1) for m in (nodes, numbered) if m)]
    try:  # int() in C over every number: a fractional weight (or > 4300 digits) raises
        numbers = list(map(int, chain(header, chain.from_iterable(m.groups() for m in raw))))
    except ValueError:
        return None
    if max(numbers) >= 10**MAX_DIGITS:
        return None
    p, s, t, *counts = numbers[: len(header)]
    n = counts[0] + (0 if nodes else 1)
    if nodes and numbered and counts[1] != n - 1:
        return None
    flat = numbers[len(header) :]
    edges = tuple(zip(flat[0::3], flat[1::3], flat[2::3], strict=True))
    if not 0 < n <= MAX_NODES or not 0 < p <= MAX_PATHS or n * len(edges) * p > MAX_WORK:
        return None
    if not (s < n and t < n) or max(flat[0::3] + flat[1::3]) >= n or min(flat[2::3]) <= 0:
        return None
    return GraphTask(n, edges, p, s, t)


def solve(task: GraphTask) -> str:
    """The answer text the grader parses: `submit_paths(paths=[[0, 3, 9]], weights=[25])`."""
    found = Digraph(task.n, task.edges).top_paths(task.source, task.target, task.p)
    return f"submit_paths(paths={[list(p) for _, p in found]}, weights={[c for c, _ in found]})"
