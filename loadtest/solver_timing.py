"""Time the graph shortcut (parse + exact top-P solve) on the dev prompts and on worst-case
complete graphs: `python -m loadtest.solver_timing`."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from shortcuts import graph
from shortcuts.text import task_text

DATA = Path(__file__).resolve().parent.parent / "vendor" / "data"


def solve_seconds(prompt: str) -> float:
    started = time.perf_counter()
    parsed = graph.parse_graph(task_text(prompt))
    assert parsed is not None, prompt[:200]
    graph.solve(parsed)
    return time.perf_counter() - started


def complete_graph_prompt(nodes: int, paths: int, max_weight: int, rng: random.Random) -> str:
    edges = "\n".join(
        f"{a} -> {b}, weight: {rng.randint(1, max_weight)}"
        for a in range(nodes)
        for b in range(nodes)
        if a != b
    )
    return (
        f"You are given a directed graph with {nodes} nodes (numbered 0 to {nodes - 1}) and the "
        f"following edges:\n\nEdges (source -> target, weight):\n{edges}\n\n"
        f"Find the top {paths} shortest paths from node 0 to node {nodes - 1}."
    )


def main() -> None:
    prompts = [
        row["prompt"]
        for name in ("dev_requests_gold.jsonl", "dev_combined.jsonl")
        for row in map(json.loads, (DATA / name).read_text().splitlines())
        if row["task"] == "graph"
    ]
    dev = sorted(solve_seconds(prompt) for prompt in prompts for _ in range(3))
    median, worst_dev = dev[len(dev) // 2] * 1e3, dev[-1] * 1e3
    print(
        f"dev graphs ({len(prompts)} prompts x 3): median {median:.2f} ms, worst {worst_dev:.2f} ms"
    )
    rng = random.Random(0)
    worst = max(
        solve_seconds(complete_graph_prompt(30, 10, 3 if trial % 2 else 1000, rng))
        for trial in range(20)
    )
    print(f"complete graphs N=30, P=10 (20, weights 1..3 and 1..1000): worst {worst * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
