"""Scraping a test daemon's Prometheus endpoint, and picking one VM's series out of it."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]


def scrape(url: str) -> Samples:
    """Every sample at ``url`` by (name, sorted labels); the parser raises on a bad exposition."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def series(samples: Samples, name: str, **labels: str) -> dict[Labels, float]:
    """The samples of ``name`` whose labels include ``labels``."""
    want = labels.items()
    return {k[1]: v for k, v in samples.items() if k[0] == name and want <= dict(k[1]).items()}
