"""One PNG per run: throughput over time (is the server keeping up?) and latency per task."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on CI and GPU boxes without a display

import matplotlib.pyplot as plt
import numpy as np

from loadtest.client import BatchResult
from loadtest.workload import TASKS

BINS = 60


def plot_run(results: list[BatchResult], path: Path, title: str, window_s: float) -> None:
    """Left: answered prompts/s and HTTP requests/s in time bins, with the window's end marked.
    Right: latency ECDF per task on a log time axis (the tail is what p99 reads)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    ok = [r for r in results if r.ok]
    end = max((r.done_s for r in results), default=1.0)
    edges = np.linspace(0.0, end, BINS + 1)
    done = [r.done_s for r in ok for _ in r.prompts]
    counts, _ = np.histogram(done, bins=edges)
    left.stairs(counts / np.diff(edges), edges, label="prompts answered")
    requests, _ = np.histogram([r.done_s for r in ok], bins=edges)
    left.stairs(requests / np.diff(edges), edges, label="HTTP requests answered")
    failed = [r.done_s for r in results if not r.ok for _ in r.prompts]
    if failed:
        errors, _ = np.histogram(failed, bins=edges)
        left.stairs(errors / np.diff(edges), edges, color="red", label="prompts failed")
    left.axvline(window_s, color="gray", linestyle="--", label="end of window")
    left.set(xlabel="time since start (s)", ylabel="per second", title="Throughput")
    left.legend()
    for task in TASKS:
        latencies = np.sort([r.duration_s for r in ok for p in r.prompts if p.task == task])
        if latencies.size:
            ecdf = np.arange(latencies.size + 1) / latencies.size
            xs = np.concatenate([latencies[:1], latencies])
            right.step(xs, ecdf, where="post", label=f"{task} (n={latencies.size})")
    right.set(xlabel="latency (s)", ylabel="fraction of prompts ≤ latency", title="Latency")
    right.set_xscale("log")
    right.grid(True, which="both", alpha=0.3)
    right.legend(loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
