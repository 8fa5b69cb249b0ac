"""The Grafana dashboard's PromQL, with Grafana's variables filled in, for tests.

``panel_queries(path)`` returns one ``(panel title, expr)`` pair per panel target, with the
dashboard variables (``$instance``, ``$vm``) and Grafana's built-ins (``$__rate_interval``,
``$__interval``, ``$__range``) replaced, ready for Prometheus' ``/api/v1/query`` or for
``promtool check rules``; ``panel_targets`` adds whether Grafana runs the target as an instant
query.  ``variable_queries`` gives the ``label_values(selector, label)`` of each query variable and
``grafana_regex_values`` what Grafana writes for selected values of a multi-value variable.  Both
the unit test (syntax, metric names, new-series-safe counters) and the end-to-end test (every
panel and variable against a real Prometheus) use them.

Usable from any test under ``tests/`` (that directory is on ``sys.path``)::

    from dashboard_queries import DASHBOARD, panel_queries
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

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

# Counters whose series the exporter creates already counted -- at their first increment
# (violations, snapshots, sanctioned, events lost, map full, untracked exits, read failures), or
# with a VM that may have come and gone within one scrape (the pending-duration histogram), or
# carrying whatever happened before the first scrape (scrape and internal errors) -- and where
# one increment matters on a panel.  A plain increase()/rate() needs two samples of a series, so
# over a new series it returns 0 (or nothing) and a one-off violation never shows: their panels
# use new_series_increase().  The activity counters (userspace/guest exits, completions, polls)
# keep rate(): Grafana 10.0 has no interval in seconds to turn a new series' first value into a
# rate, and those panels show activity, not single events.
NEW_SERIES_COUNTERS: frozenset[str] = frozenset({
    "kvm_completion_violations_total",
    "kvm_completion_snapshots_total",
    "kvm_completion_sanctioned_total",
    "kvm_completion_events_lost_total",
    "kvm_completion_map_full_total",
    "kvm_completion_untracked_exits_total",
    "kvm_completion_access_read_failed_total",
    "kvm_completion_scrape_errors_total",
    "kvm_completion_internal_errors_total",
    "kvm_completion_pending_seconds_bucket",
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


class PanelTarget(NamedTuple):
    title: str
    ref_id: str
    expr: str  # variables filled
    instant: bool  # Grafana runs it at the end of the time range only (tables), else over it


def panel_targets(path: Path | str = DASHBOARD, *, instance: str = ".*", vm: str = ".*",
                  interval: str = "1m", range_: str = "1h") -> list[PanelTarget]:
    """Every target of every panel, its variables filled."""
    out: list[PanelTarget] = []
    for panel in iter_panels(load(path)):
        for target in panel.get("targets", []):
            expr = target.get("expr", "")
            if expr:
                out.append(PanelTarget(
                    panel["title"], str(target.get("refId", "")),
                    fill_variables(expr, instance=instance, vm=vm, interval=interval,
                                   range_=range_),
                    bool(target.get("instant")) and not target.get("range")))
    return out


def panel_queries(path: Path | str = DASHBOARD, *, instance: str = ".*", vm: str = ".*",
                  interval: str = "1m", range_: str = "1h") -> list[tuple[str, str]]:
    """``(panel title, expr with variables filled)`` for every target of every panel."""
    return [(t.title, t.expr) for t in panel_targets(
        path, instance=instance, vm=vm, interval=interval, range_=range_)]


# What Grafana's Prometheus data source escapes in a value of a multi-value (or include-all)
# variable, which it substitutes into a regex matcher: regex metacharacters get a backslash,
# doubled because the value lands inside a PromQL string.  VM names like "python3[4242]" need it.
_GRAFANA_REGEX_SPECIAL = re.compile(r"[$^*{}\[\]'+?.()|]")


def grafana_regex_values(*values: str) -> str:
    """The text Grafana puts in place of a multi-value variable with ``values`` selected."""
    if not values:
        raise ValueError("no value selected")
    escaped = [_GRAFANA_REGEX_SPECIAL.sub(lambda m: "\\\\" + m.group(0),
                                          v.replace("\\", "\\\\\\\\"))
               for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


class VariableQuery(NamedTuple):
    name: str
    selector: str  # the series selector, with dashboard variables (fill_variables)
    label: str  # whose values the variable offers


def variable_query_text(var: Mapping[str, Any]) -> str:
    query = var.get("query", "")
    return str(query.get("query", "")) if isinstance(query, dict) else str(query)


def variable_queries(dashboard: Mapping[str, Any]) -> list[VariableQuery]:
    """``label_values(selector, label)`` of every query variable (ValueError for another form:
    the tests know how to run only that one)."""
    out: list[VariableQuery] = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        text = variable_query_text(var)
        match = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", text)
        if match is None:
            raise ValueError(f"variable {var.get('name')}: not label_values(selector, label): "
                             f"{text!r}")
        out.append(VariableQuery(str(var["name"]), match.group(1).strip(), match.group(2)))
    return out


def new_series_increase(selector: str, window: str) -> str:
    """``increase(selector[window])`` that also counts a series born inside the window.

    A series that existed ``window`` ago gets its increase; one that did not is new, created at
    its first increment, and its whole value is the increase (it started from 0).  The plain
    ``increase(c[w]) or (c unless c offset w)`` is not enough: once a new series has two samples
    in the window, increase() returns 0 for it and ``or`` drops the right-hand side.
    """
    return (f"(increase({selector}[{window}]) and {selector} offset {window})"
            f" or ({selector} unless {selector} offset {window})")


_COUNTER_FUNCTION = re.compile(
    r"\b(rate|irate|increase|delta|idelta)\(\s*([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?"
    r"\[([^\]]+)\]\s*\)")


def plain_counter_functions(expr: str,
                            metrics: frozenset[str] = NEW_SERIES_COUNTERS) -> list[str]:
    """The ``rate(...)``/``increase(...)`` calls over ``metrics`` in ``expr`` that are not inside
    :func:`new_series_increase` (written exactly as it writes it): each misses new series."""
    safe_spans: list[tuple[int, int]] = []
    for match in _COUNTER_FUNCTION.finditer(expr):
        selector = match.group(2) + (match.group(3) or "")
        safe = new_series_increase(selector, match.group(4))
        start = expr.find(safe)
        while start != -1:
            safe_spans.append((start, start + len(safe)))
            start = expr.find(safe, start + 1)
    return [match.group(0) for match in _COUNTER_FUNCTION.finditer(expr)
            if match.group(2) in metrics
            and not any(lo <= match.start() and match.end() <= hi for lo, hi in safe_spans)]


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
