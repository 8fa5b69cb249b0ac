"""Prometheus exporter: a custom collector that reads the probes' maps and the tracker at scrape
time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

DEFAULT_METRICS_PORT: Final = 9149  # placeholder, see README "Metrics port"


@dataclass(frozen=True)
class MetricsOptions:
    addr: str | None = f"127.0.0.1:{DEFAULT_METRICS_PORT}"  # None: no exporter
    per_vcpu: bool = False  # per-vCPU series (label vcpu), capped by max_vcpu_series
    max_vcpu_series: int = 256
    retain_gone_s: float = 900.0  # keep a gone VM's series this long (Prometheus sees the last)
