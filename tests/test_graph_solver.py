"""The exact top-P path solver: course-grader score on dev, brute force, parsing, speed."""

from __future__ import annotations

import random
import time

import pytest

from shortcuts.grading import grade, parse_submission
from shortcuts.graph import GraphTask, parse_graph, solve
from shortcuts.paths import Digraph
from tests.shortcuts_dev_data import rows_of


def graph_prompt(n: int, edges, p: int, source: int = 0, target: int | None = None) -> str:
    """A prompt in the course's wording."""
    target = n - 1 if target is None else target
    lines = "".join(f"{u} -> {v}, weight: {w}\n" for u, v, w in edges)
    return (
        f"You are given a directed graph with {n} nodes (numbered 0 to {n - 1}) and the following"
        f" edges:\n\nEdges (source -> target, weight):\n{lines}\nFind the top {p} shortest "
        f"path{'s' if p > 1 else ''} from node {source} to node {target}.\n\nReturn your answer "
        "by calling the submit_paths function with:\n- paths: A list of paths\n\nFor example, if"
        " the shortest path is [0, 2, 4] with weight 10, call:\n"
        "submit_paths(paths=[[0, 2, 4]], weights=[10])\n"
    )


def brute_force(n, edges, source, target, k):
    """Every simple path, sorted by (cost, sequence): the definition of the gold."""
    succ: dict[int, dict[int, int]] = {u: {} for u in range(n)}
    for u, v, w in edges:
        if u != v:
            succ[u][v] = min(w, succ[u].get(v, w))
    found = []

    def walk(path, cost):
        if path[-1] == target:
            found.append((cost, tuple(path)))
            return
        for v, w in succ[path[-1]].items():
            if v not in path:
                walk([*path, v], cost + w)

    walk([source], 0)
    return sorted(found)[:k]


@pytest.mark.parametrize("row", rows_of("graph"), ids=lambda r: f"{r['file']}:{r['task']}")
def test_dev_graphs_score_one(row):
    parsed = parse_graph(row["prompt"])
    assert parsed is not None
    assert grade("graph", solve(parsed), row["gold_answer"]) == 1.0


def test_matches_brute_force_on_random_small_graphs():
    rng = random.Random(1664)
    for case in range(600):
        n = rng.randint(1, 8)
        density = rng.choice([0.2, 0.5, 0.9])
        max_w = rng.choice([1, 2, 3, 20])  # small ranges force cost ties
        edges = [
            (u, v, rng.randint(1, max_w))
            for u in range(n)
            for v in range(n)
            if u != v and rng.random() < density
        ]
        source, target = rng.randrange(n), rng.randrange(n)
        k = rng.choice([1, 2, 3, 5, 10, 50, 1000])  # often more than the paths that exist
        got = Digraph(n, edges).top_paths(source, target, k)
        assert got == brute_force(n, edges, source, target, k), (case, n, edges, source, target)


def test_answer_format_and_unreachable_target():
    task = GraphTask(
        n=4, edges=((0, 1, 2), (1, 3, 5), (0, 3, 7), (2, 0, 1)), p=3, source=0, target=3
    )
    assert solve(task) == "submit_paths(paths=[[0, 1, 3], [0, 3]], weights=[7, 7])"
    unreachable = GraphTask(n=3, edges=((0, 1, 1),), p=2, source=0, target=2)
    assert solve(unreachable) == "submit_paths(paths=[], weights=[])"


def test_source_target_and_p_come_from_the_words():
    edges = [(0, 1, 1), (1, 2, 1), (2, 0, 1), (2, 1, 5)]
    parsed = parse_graph(graph_prompt(3, edges, 2, source=2, target=1))
    assert parsed == GraphTask(3, tuple(edges), 2, 2, 1)
    assert parse_submission(solve(parsed)) == {((2, 0, 1), 2), ((2, 1), 5)}
    single = graph_prompt(3, edges, 1).replace("top 1 shortest path", "the shortest path")
    assert parse_graph(single) == GraphTask(3, tuple(edges), 1, 0, 2)


@pytest.mark.parametrize(
    "broken",
    [
        lambda p: p.replace("from node 0 to node 4", "between the ends"),  # no endpoints
        lambda p: p.replace("with 5 nodes", "with many nodes").replace("numbered 0 to 4", "x"),
        lambda p: p.replace("weight: 3", "weight: -3"),  # negative weight
        lambda p: p.replace("weight: 3", "weight: 3.5"),  # non-integer weight
        lambda p: p.replace("1 -> 4", "1 -> 9"),  # node out of range
        lambda p: p.replace("top 2 shortest", "top 0 shortest"),
        lambda p: p.replace("top 2 shortest paths", "some paths"),  # no P
    ],
)
def test_unparsable_graph_prompts_return_none(broken):
    prompt = graph_prompt(5, [(0, 1, 3), (1, 4, 2), (0, 4, 9)], 2)
    assert parse_graph(prompt) is not None
    assert parse_graph(broken(prompt)) is None


def test_complete_graph_n30_p10_under_50ms():
    rng = random.Random(7)
    worst = 0.0
    for max_w in (1, 3, 100):  # all-equal weights is the tie-heaviest case
        edges = [(u, v, rng.randint(1, max_w)) for u in range(30) for v in range(30) if u != v]
        prompt = graph_prompt(30, edges, 10)
        start = time.perf_counter()
        answer = solve(parse_graph(prompt))
        worst = max(worst, time.perf_counter() - start)
        assert len(parse_submission(answer)) == 10
    assert worst < 0.050, f"{worst * 1000:.1f} ms"
