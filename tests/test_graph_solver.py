"""The exact top-P path solver: course-grader score on dev, brute force, parsing, speed."""

from __future__ import annotations

import random
import re
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loadtest.solver_timing import complete_graph, graph_prompt, solve_seconds, worst_cases
from shortcuts import graph
from shortcuts.grading import grade, parse_submission
from shortcuts.graph import GraphTask, parse_graph, solve
from shortcuts.paths import Digraph
from tests.shortcuts_dev_data import rows_of


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
    covered = {"cost ties": 0, "unreachable": 0, "P > paths": 0}
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
        expected = brute_force(n, edges, source, target, k)
        assert got == expected, (case, n, edges, source, target)
        costs = [cost for cost, _ in expected]
        covered["cost ties"] += len(set(costs)) < len(costs)
        covered["unreachable"] += not expected
        covered["P > paths"] += 0 < len(expected) < k
    assert min(covered.values()) >= 30, covered


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
    cheapest = graph_prompt(3, edges, 2).replace("top 2 shortest paths", "top 2 cheapest path(s)")
    assert parse_graph(cheapest) == GraphTask(3, tuple(edges), 2, 0, 2)


def test_p_source_and_target_come_from_one_sentence():
    edges = [(0, 1, 1), (1, 2, 1), (0, 2, 5)]
    prompt = graph_prompt(3, edges, 2)
    noted = prompt.replace(
        "Find the", "A walk from node 1 to node 0 is not allowed; top 3 hops. Find the"
    )
    assert parse_graph(noted + "Going from node 2 to node 1 costs extra.") == parse_graph(prompt)
    twice = prompt + "Also find the top 1 shortest path from node 1 to node 2."
    assert parse_graph(twice) is None  # two different questions: ambiguous, so the model answers


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
        prompt = graph_prompt(30, complete_graph(30, max_w, rng), 10)
        start = time.perf_counter()
        answer = solve(parse_graph(prompt))
        worst = max(worst, time.perf_counter() - start)
        assert len(parse_submission(answer)) == 10
    assert worst < 0.050, f"{worst * 1000:.1f} ms"


def test_slowest_accepted_graphs_at_the_caps_under_200ms():
    """About 70 ms measured on the dev machine (ladder, N=100, 500 edges, P=20): 3x headroom
    for a loaded CI box. Best of 3 runs, so one preemption does not fail it."""
    times = {label: min(solve_seconds(prompt) for _ in range(3)) for label, prompt in worst_cases()}
    assert len(times) >= 5
    assert max(times.values()) < 0.200, {k: f"{v * 1000:.0f} ms" for k, v in times.items()}


def test_dev_graphs_are_far_inside_the_caps():
    for row in rows_of("graph"):
        task = parse_graph(row["prompt"])
        assert task.n * 5 <= graph.MAX_NODES and len(task.edges) * 10 <= graph.MAX_EDGES
        assert (
            task.p * 6 <= graph.MAX_PATHS
            and task.n * len(task.edges) * task.p * 100 <= graph.MAX_WORK
        )


@pytest.mark.parametrize(
    ("n", "edges", "p"),
    [
        (graph.MAX_NODES + 1, [(0, 1, 1)], 1),
        (3, [(0, 1, 1)] * (graph.MAX_EDGES + 1), 1),
        (3, [(0, 1, 1)], graph.MAX_PATHS + 1),
        (graph.MAX_NODES, [(0, 1, 1)] * 600, graph.MAX_PATHS),  # N x edges x P over MAX_WORK
        (2000, [(u, v, 1) for u in range(40) for v in range(40) if u != v], 100),
    ],
)
def test_graphs_over_the_caps_are_unparsable_and_rejected_fast(n, edges, p):
    prompt = graph_prompt(n, edges, p, target=2)
    start = time.perf_counter()
    assert parse_graph(prompt) is None
    assert time.perf_counter() - start < 0.050


@pytest.mark.parametrize("digits", [10, 5000])
@pytest.mark.parametrize("where", ["top 2", "node 4.", "weight: 3", "with 5 nodes", "1 -> 4"])
def test_absurdly_long_numbers_are_unparsable_not_errors(digits, where):
    prompt = graph_prompt(5, [(0, 1, 3), (1, 4, 2), (0, 4, 9)], 2)
    big = "9" * digits
    broken = prompt.replace(where, re.sub(r"\d+", big, where, count=1))
    assert broken != prompt and parse_graph(broken) is None


@given(st.text(alphabet="0123456789 ->,weightnodsfrmtp:\n.", max_size=300))
def test_parse_never_raises(noise):
    prompt = graph_prompt(5, [(0, 1, 3), (1, 4, 2), (0, 4, 9)], 2)
    for text in (noise, prompt + noise, noise + prompt):
        assert parse_graph(text) is None or isinstance(parse_graph(text), GraphTask)
