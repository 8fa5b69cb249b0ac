"""The Grafana dashboard: importable, filtered by the template variables, queries valid PromQL on
the exporter's metric names only.

PromQL syntax is checked offline: every query becomes a recording rule in a temporary rules file
that ``promtool check rules`` parses (skipped without promtool, failed under CI without it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from dashboard_queries import (
    CONTRACT_METRICS,
    DASHBOARD,
    VM_METRICS,
    fill_variables,
    is_contract_metric,
    iter_panels,
    load,
    metric_names,
    panel_queries,
)

JOB_MATCHER = 'job="kvm-completion-tracer"'

# The panels the dashboard must have, by title (case-insensitive), and their type.
REQUIRED_PANELS = {
    "violations by vm, ioctl and exit reason": "timeseries",
    "snapshots mid-completion": "timeseries",
    "violations since daemon start, by ioctl and exit reason": "table",
    "pending vcpus": "timeseries",
    "pending duration (exit to completion)": "heatmap",
    "userspace exits by reason": "timeseries",
    "guest exits by reason": "timeseries",
    "completion paths": "timeseries",
    "vcpus per vm": "timeseries",
    "up": "stat",
    "events lost / maps full": "timeseries",
    "probes attached vs expected": "timeseries",
    "last ring-buffer poll age": "timeseries",
    "errors": "timeseries",
    "daemon memory and cpu": "timeseries",
}


def dashboard() -> dict[str, Any]:
    return load(DASHBOARD)


def variables() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard()["templating"]["list"]}


def panels() -> list[dict[str, Any]]:
    return list(iter_panels(dashboard()))


def all_targets() -> list[tuple[str, dict[str, Any]]]:
    return [(p["title"], t) for p in panels() for t in p.get("targets", [])]


def _query_text(var: dict[str, Any]) -> str:
    query = var.get("query", "")
    return str(query.get("query", "")) if isinstance(query, dict) else str(query)


def test_loads_and_is_importable() -> None:
    d = dashboard()
    assert d["title"] and d["uid"]
    assert isinstance(d.get("schemaVersion"), int)
    # importable on any Grafana: either an __inputs datasource or a datasource variable
    inputs = [i for i in d.get("__inputs", []) if i.get("pluginId") == "prometheus"]
    ds_vars = [v for v in d["templating"]["list"]
               if v.get("type") == "datasource" and v.get("query") == "prometheus"]
    assert inputs or ds_vars
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


def test_template_variables() -> None:
    v = variables()
    assert v["DS"]["type"] == "datasource" and v["DS"]["query"] == "prometheus"
    assert _query_text(v["instance"]) == "label_values(kvm_completion_build_info, instance)"
    assert (_query_text(v["vm"])
            == 'label_values(kvm_completion_vcpus{instance=~"$instance"}, vm)')
    for name in ("instance", "vm"):
        assert v[name]["type"] == "query"
        assert v[name]["multi"] is True and v[name]["includeAll"] is True
        assert v[name]["allValue"] == ".*"
        assert v[name]["datasource"]["uid"] == "${DS}"


def test_required_panels() -> None:
    by_title = {p["title"].lower(): p["type"] for p in panels()}
    for title, ptype in REQUIRED_PANELS.items():
        assert by_title.get(title) == ptype, f"panel {title!r} ({ptype}) missing"


def test_heatmap_reads_the_pending_histogram() -> None:
    heatmaps = [p for p in panels() if p["type"] == "heatmap"]
    assert heatmaps
    for p in heatmaps:
        for t in p["targets"]:
            assert t.get("format") == "heatmap"
            assert "kvm_completion_pending_seconds_bucket" in t["expr"]
            assert "sum by (le)" in t["expr"]


def test_violation_legend_names_ioctl_and_exit() -> None:
    p = next(p for p in panels() if p["title"].lower() == "violations by vm, ioctl and exit reason")
    legend = p["targets"][0]["legendFormat"]
    for label in ("{{vm}}", "{{ioctl}}", "{{exit_reason}}"):
        assert label in legend


@pytest.mark.parametrize("panel", panels(), ids=lambda p: p["title"])
def test_panel_has_targets_on_the_ds_variable(panel: dict[str, Any]) -> None:
    assert panel.get("targets"), f"{panel['title']}: no targets"
    assert panel["datasource"]["uid"] == "${DS}"
    for t in panel["targets"]:
        assert t["datasource"]["uid"] == "${DS}", f"{panel['title']}: target not on ${{DS}}"
        assert t.get("expr"), f"{panel['title']}: empty expr"


@pytest.mark.parametrize(("title", "target"), all_targets(),
                         ids=[f"{t}:{x['refId']}" for t, x in all_targets()])
def test_target_uses_contract_metrics_and_filters(title: str, target: dict[str, Any]) -> None:
    expr = target["expr"]
    names = metric_names(fill_variables(expr))
    assert names, f"{title}: no metric in {expr!r}"
    unknown = {n for n in names if not is_contract_metric(n)}
    assert not unknown, f"{title}: metrics not in the exporter's contract: {sorted(unknown)}"
    # every selector filters the job and the instance variable, and the vm variable when the
    # metric has a vm label
    for selector in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\{([^}]*)\}", expr):
        metric, matchers = selector.group(1), selector.group(2)
        assert JOB_MATCHER in matchers, f"{title}: {metric} without {JOB_MATCHER}"
        assert 'instance=~"$instance"' in matchers, f"{title}: {metric} without $instance"
        if metric in VM_METRICS:
            assert 'vm=~"$vm"' in matchers, f"{title}: {metric} without $vm"
    # no bare selector (a metric without braces would ignore the variables)
    for name in names:
        assert re.search(rf"\b{re.escape(name)}\{{", expr), f"{title}: bare {name}"


def test_metric_names_helper() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (le, vm) (rate(kvm_completion_pending_seconds_bucket'
        '{job="x", vm=~".*"}[1m])))') == {"kvm_completion_pending_seconds_bucket"}
    assert metric_names("time() - kvm_completion_last_poll_timestamp_seconds{a=\"b\"}") == {
        "kvm_completion_last_poll_timestamp_seconds"}
    assert metric_names("up offset 5m or process_cpu_seconds_total") == {
        "up", "process_cpu_seconds_total"}
    assert "kvm_completion_pending_seconds_bucket" in CONTRACT_METRICS


def test_panel_queries_fill_every_variable() -> None:
    queries = panel_queries(instance="host1:9110", vm="web-1")
    assert len(queries) == len(all_targets())
    for title, expr in queries:
        assert "$" not in expr and "[[" not in expr, f"{title}: unfilled variable in {expr!r}"
    assert any('vm=~"web-1"' in expr for _, expr in queries)
    assert fill_variables("x[$__rate_interval] ${vm} [[instance]]", vm="a", instance="b") == (
        "x[1m] a b")


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}:
            pytest.fail("promtool not found under CI: scripts/setup-host.sh test installs it "
                        "(Debian package prometheus)")
        pytest.skip("promtool not installed (apt-get install prometheus, or "
                    "scripts/setup-host.sh test)")
    return path


def test_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = _promtool()
    queries = panel_queries()
    # the variables' own selectors must be valid too
    for name in ("instance", "vm"):
        inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", _query_text(variables()[name]))
        assert inner, name
        queries.append((f"variable {name}", fill_variables(inner.group(1))))
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(queries)
    ]}]}
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    res = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                         text=True, timeout=60, check=False)
    if res.returncode != 0:
        # name the panel of each failing query
        detail = "\n".join(f"  query_{i} ({title}): {expr}" for i, (title, expr)
                           in enumerate(queries) if f"query_{i}" in res.stdout + res.stderr)
        pytest.fail(f"promtool rejected dashboard queries:\n{res.stdout}{res.stderr}\n{detail}")
