"""The front end's Prometheus metrics, kept and rendered by prometheus_client (escaping, HELP
and TYPE lines are the library's)."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector


class Metrics:
    """One registry per front end, not the library's process-wide default: each component
    declares its own counters here, and gauges come from collectors read at scrape time."""

    CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what `render` writes

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

    def counter(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(name, help_text, labels, registry=self.registry)

    def histogram(
        self, name: str, help_text: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> Histogram:
        return Histogram(name, help_text, labels, buckets=buckets, registry=self.registry)

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def render(self) -> str:
        """Every metric in the Prometheus text format."""
        return generate_latest(self.registry).decode()
