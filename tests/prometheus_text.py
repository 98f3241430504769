"""Read one sample's value out of Prometheus text, as a scraper would."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def sample(text: str, name: str, **labels: str) -> float:
    """The value of sample `name` with exactly these labels; 0 when it is absent (a labelled
    counter has no sample until first counted)."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return 0.0
