"""Counters, gauges and one latency histogram, rendered in the Prometheus text format."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{key}="{value}"' for key, value in pairs) + "}"


class Metrics:
    """Owned by the front end; gauges are read from callbacks at scrape time."""

    def __init__(self) -> None:
        self.counters: dict[str, Counter] = {}
        self.help: dict[str, str] = {}
        self.gauges: dict[str, tuple[str, Callable[[], dict[tuple, float]]]] = {}
        self.latency_counts: dict[str, list[int]] = {}
        self.latency_sum: Counter = Counter()

    def inc(self, name: str, help_text: str, amount: float = 1, **labels: str) -> None:
        self.help.setdefault(name, help_text)
        self.counters.setdefault(name, Counter())[tuple(sorted(labels.items()))] += amount

    def gauge(self, name: str, help_text: str, read: Callable[[], dict[tuple, float]]) -> None:
        """`read()` returns {label pairs: value}; () labels a single unlabelled value."""
        self.gauges[name] = (help_text, read)

    def observe_latency(self, task: str, seconds: float) -> None:
        counts = self.latency_counts.setdefault(task, [0] * (len(LATENCY_BUCKETS_S) + 1))
        for position, bound in enumerate(LATENCY_BUCKETS_S):
            if seconds <= bound:
                counts[position] += 1
        counts[-1] += 1
        self.latency_sum[task] += seconds

    def render(self) -> str:
        lines: list[str] = []
        for name, series in self.counters.items():
            lines += [f"# HELP {name} {self.help[name]}", f"# TYPE {name} counter"]
            lines += [f"{name}{_labels(key)} {value}" for key, value in series.items()]
        for name, (help_text, read) in self.gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            lines += [f"{name}{_labels(key)} {value}" for key, value in read().items()]
        name = "completion_latency_seconds"
        lines += [
            f"# HELP {name} Time from request to answer, per prompt.",
            f"# TYPE {name} histogram",
        ]
        for task, counts in self.latency_counts.items():
            for bound, count in zip((*LATENCY_BUCKETS_S, "+Inf"), counts, strict=True):
                lines.append(f'{name}_bucket{{task="{task}",le="{bound}"}} {count}')
            lines.append(f'{name}_sum{{task="{task}"}} {self.latency_sum[task]}')
            lines.append(f'{name}_count{{task="{task}"}} {counts[-1]}')
        return "\n".join(lines) + "\n"
