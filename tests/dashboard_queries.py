"""The Grafana dashboard's PromQL, with Grafana's variables filled in, for tests.

``panel_queries(path)`` returns one ``(panel title, expr)`` pair per panel target, with the
dashboard variables (``$instance``, ``$vm``) and Grafana's built-ins (``$__rate_interval``,
``$__interval``, ``$__range``) replaced, ready for Prometheus' ``/api/v1/query`` or for
``promtool check rules``.  Both the unit test (syntax, metric names) and the end-to-end test
(every panel returns data against a real Prometheus) use it.

Usable from any test under ``tests/`` (that directory is on ``sys.path``)::

    from dashboard_queries import DASHBOARD, panel_queries
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "kvm-completion-tracer.json"

# The metric names the exporter publishes (tracer/metrics.py), plus what Prometheus and
# prometheus_client add.  The histogram is listed by its series names.
CONTRACT_METRICS: frozenset[str] = frozenset({
    "kvm_completion_violations_total",
    "kvm_completion_sanctioned_total",
    "kvm_completion_snapshots_total",
    "kvm_completion_pending_vcpus",
    "kvm_completion_pending_oldest_seconds",
    "kvm_completion_pending_seconds_bucket",
    "kvm_completion_pending_seconds_sum",
    "kvm_completion_pending_seconds_count",
    "kvm_completion_userspace_exits_total",
    "kvm_completion_guest_exits_total",
    "kvm_completion_completions_total",
    "kvm_completion_vcpus",
    "kvm_completion_vm_info",
    "kvm_completion_build_info",
    "kvm_completion_events_lost_total",
    "kvm_completion_map_full_total",
    "kvm_completion_probes_attached",
    "kvm_completion_probes_expected",
    "kvm_completion_probe_attached",
    "kvm_completion_ringbuf_polls_total",
    "kvm_completion_scrape_errors_total",
    "kvm_completion_last_poll_timestamp_seconds",
    "kvm_completion_untracked_exits_total",
    "kvm_completion_access_read_failed_total",
    "kvm_completion_internal_errors_total",
    "kvm_completion_vcpu_pending",
    "up",
})
ALLOWED_PREFIXES = ("process_",)

# Metrics whose series carry the label ``vm``: a query on them must filter vm=~"$vm".
VM_METRICS: frozenset[str] = frozenset({
    name for name in CONTRACT_METRICS
    if name.startswith("kvm_completion_") and name not in {
        "kvm_completion_build_info", "kvm_completion_events_lost_total",
        "kvm_completion_map_full_total", "kvm_completion_probes_attached",
        "kvm_completion_probes_expected", "kvm_completion_probe_attached",
        "kvm_completion_ringbuf_polls_total", "kvm_completion_scrape_errors_total",
        "kvm_completion_last_poll_timestamp_seconds", "kvm_completion_untracked_exits_total",
        "kvm_completion_access_read_failed_total", "kvm_completion_internal_errors_total",
    }
})

_PROMQL_WORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan", "atan2",
})


def load(path: Path | str = DASHBOARD) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(Path(path).read_text())
    return data


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that is not a row, including panels nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def fill_variables(expr: str, *, instance: str = ".*", vm: str = ".*",
                   interval: str = "1m", range_: str = "1h") -> str:
    """Replace Grafana variables the way Grafana would for a query (values are regexes)."""
    values = {
        "__rate_interval": interval,
        "__interval": interval,
        "__range": range_,
        "instance": instance,
        "vm": vm,
    }

    def sub(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in values:
            raise KeyError(f"unknown dashboard variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", sub, expr)


def panel_queries(path: Path | str = DASHBOARD, *, instance: str = ".*", vm: str = ".*",
                  interval: str = "1m", range_: str = "1h") -> list[tuple[str, str]]:
    """``(panel title, expr with variables filled)`` for every target of every panel."""
    out: list[tuple[str, str]] = []
    for panel in iter_panels(load(path)):
        for target in panel.get("targets", []):
            expr = target.get("expr", "")
            if expr:
                out.append((panel["title"], fill_variables(
                    expr, instance=instance, vm=vm, interval=interval, range_=range_)))
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (a lexical approximation, good enough for
    the dashboard's queries: no metric name inside a string, no ``{__name__=...}``)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)       # strings
    text = re.sub(r"\{[^}]*\}", "", text)                   # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\b\d+(?:\.\d+)?(?:ms|[smhdwy])?\b", "", text)   # numbers, durations
    names: set[str] = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        rest = text[match.end():].lstrip()
        if rest.startswith("("):
            continue                                        # a function call
        if word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


def is_contract_metric(name: str) -> bool:
    return name in CONTRACT_METRICS or name.startswith(ALLOWED_PREFIXES)
