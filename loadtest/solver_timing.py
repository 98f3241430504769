"""Time the graph shortcut (parse + exact top-P solve) on the dev prompts and on the slowest
graphs the parser accepts: `python -m loadtest.solver_timing`. The prompt builder and the
worst cases are shared with tests/test_graph_solver.py."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence

from shortcuts import graph
from shortcuts.data import dev_rows
from shortcuts.text import task_text

Edges = Sequence[tuple[int, int, int]]


def graph_prompt(n: int, edges: Edges, p: int, source: int = 0, target: int | None = None) -> str:
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


def complete_graph(n: int, max_weight: int, rng: random.Random) -> list[tuple[int, int, int]]:
    """Every edge u -> v; weights 1..max_weight (1 makes every path of a length tie)."""
    return [(u, v, rng.randint(1, max_weight)) for u in range(n) for v in range(n) if u != v]


def ladder(n: int, n_edges: int, rng: random.Random) -> list[tuple[int, int, int]]:
    """i -> i+1 and i -> i+2, all weight 1, padded with backward edges: the slowest family
    found for Yen's algorithm (many long tied paths: about n/2 spur searches per path, each
    over every edge)."""
    forward = [(i, i + k, 1) for k in (1, 2) for i in range(n - k)]
    backward = [(u, v, 1) for u in range(n) for v in range(u)]
    rng.shuffle(backward)
    return (forward + backward)[:n_edges]


def worst_cases() -> Iterator[tuple[str, str]]:
    """(label, prompt) of accepted graphs at the parser's caps (N, edges, P and their product)."""
    rng = random.Random(0)
    work, nodes, paths = graph.MAX_WORK, graph.MAX_NODES, graph.MAX_PATHS
    for n_edges in (nodes * 2 - 3, work // (nodes * paths), graph.MAX_EDGES // 2, graph.MAX_EDGES):
        p = min(paths, work // (nodes * n_edges))
        label = f"ladder N={nodes} edges={n_edges} P={p}"
        yield label, graph_prompt(nodes, ladder(nodes, n_edges, rng), p)
    n = max(k for k in range(2, nodes + 1) if k * k * (k - 1) * paths <= work)
    for max_weight in (1, 100):
        label = f"complete N={n} P={paths} weights 1..{max_weight}"
        yield label, graph_prompt(n, complete_graph(n, max_weight, rng), paths)


def solve_seconds(prompt: str) -> float:
    started = time.perf_counter()
    parsed = graph.parse_graph(task_text(prompt))
    assert parsed is not None, prompt[:200]
    graph.solve(parsed)
    return time.perf_counter() - started


def main() -> None:
    prompts = [row["prompt"] for row in dev_rows() if row["task"] == "graph"]
    dev = sorted(solve_seconds(prompt) for prompt in prompts for _ in range(3))
    median, worst_dev = dev[len(dev) // 2] * 1e3, dev[-1] * 1e3
    print(
        f"dev graphs ({len(prompts)} prompts x 3): median {median:.2f} ms, worst {worst_dev:.2f} ms"
    )
    rng = random.Random(0)
    worst = max(
        solve_seconds(graph_prompt(30, complete_graph(30, 3 if trial % 2 else 1000, rng), 10))
        for trial in range(20)
    )
    print(f"complete graphs N=30, P=10 (20, weights 1..3 and 1..1000): worst {worst * 1e3:.1f} ms")
    for label, prompt in worst_cases():
        best = min(solve_seconds(prompt) for _ in range(3))
        print(f"at the caps, {label}: {best * 1e3:.1f} ms (best of 3)")


if __name__ == "__main__":
    main()
