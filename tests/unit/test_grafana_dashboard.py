"""The Grafana dashboard: importable, filtered by the template variables, queries valid PromQL on
the exporter's metric names only, and counter panels that count a series born mid-range.

PromQL syntax is checked offline: every query becomes a recording rule in a temporary rules file
that ``promtool check rules`` parses; the counter panels are evaluated by ``promtool test rules``
against a series that appears mid-range (both skipped without promtool, failed under CI without
it).
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
    NEW_SERIES_COUNTERS,
    VM_METRICS,
    fill_variables,
    grafana_regex_values,
    is_contract_metric,
    iter_panels,
    load,
    metric_names,
    new_series_increase,
    panel_queries,
    plain_counter_functions,
    variable_queries,
    variable_query_text,
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
    assert variable_query_text(v["instance"]) == "label_values(kvm_completion_build_info, instance)"
    # every VM the daemon counts, exited ones too: kvm_completion_vcpus would offer only the VMs
    # alive at some scrape, not one that ran, misbehaved and exited within a second
    assert (variable_query_text(v["vm"])
            == 'label_values(kvm_completion_pending_seconds_count{instance=~"$instance"}, vm)')
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


def test_variable_queries_helper() -> None:
    assert [(q.name, q.label) for q in variable_queries(dashboard())] == [
        ("instance", "instance"), ("vm", "vm")]
    with pytest.raises(ValueError, match="not label_values"):
        variable_queries({"templating": {"list": [
            {"name": "x", "type": "query", "query": "query_result(up)"}]}})


def test_grafana_regex_values() -> None:
    # Grafana regex-escapes multi-value selections; a PromQL string doubles the backslash
    assert grafana_regex_values("127.0.0.1:9110") == "127\\\\.0\\\\.0\\\\.1:9110"
    assert grafana_regex_values("python[42]", "web-1") == "(python\\\\[42\\\\]|web-1)"
    with pytest.raises(ValueError):
        grafana_regex_values()


def test_new_series_counters_are_contract_counters() -> None:
    assert NEW_SERIES_COUNTERS <= CONTRACT_METRICS
    for name in NEW_SERIES_COUNTERS:
        assert name.endswith(("_total", "_bucket")), name


@pytest.mark.parametrize(("title", "target"), all_targets(),
                         ids=[f"{t}:{x['refId']}" for t, x in all_targets()])
def test_counter_panels_count_new_series(title: str, target: dict[str, Any]) -> None:
    # these counters' series appear already counted: plain increase()/rate() shows 0 for them
    plain = plain_counter_functions(target["expr"])
    assert not plain, (
        f"{title}: {plain} misses a series created at its first increment (a one-off violation "
        f"never shows); write new_series_increase(selector, window) instead, e.g. "
        f"{new_series_increase('c{...}', '$__rate_interval')}")


def test_plain_counter_functions_helper() -> None:
    sel = 'kvm_completion_violations_total{job="j", vm=~"$vm"}'
    assert plain_counter_functions(f"sum by (vm) (increase({sel}[$__rate_interval]))") == [
        f"increase({sel}[$__rate_interval])"]
    assert plain_counter_functions(f"sum(rate({sel}[5m]))") == [f"rate({sel}[5m])"]
    # The obvious form, `increase(c[w]) or (c unless c offset w)`, fails: once a new series
    # has two samples, increase() returns 0 and masks the right-hand side; so it is plain.
    naive = f"increase({sel}[1m]) or ({sel} unless {sel} offset 1m)"
    assert plain_counter_functions(naive) == [f"increase({sel}[1m])"]
    assert plain_counter_functions(f"sum by (vm) ({new_series_increase(sel, '1m')})") == []
    # a safe form for one window does not cover a call with another
    mixed = f"{new_series_increase(sel, '1m')} + increase({sel}[5m])"
    assert plain_counter_functions(mixed) == [f"increase({sel}[5m])"]
    # activity counters keep rate(); plain totals (no function) are fine
    assert plain_counter_functions(
        'rate(kvm_completion_userspace_exits_total{job="j"}[1m])') == []
    assert plain_counter_functions(sel) == []


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
    for var in variable_queries(dashboard()):
        queries.append((f"variable {var.name}", fill_variables(var.selector)))
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


def _promtool_test(tmp_path: Path, tests: list[dict[str, Any]]) -> None:
    """Run ``promtool test rules`` on promql_expr_test cases (no rules needed)."""
    promtool = _promtool()
    (tmp_path / "empty.rules.yml").write_text("groups: []\n")
    path = tmp_path / "dashboard_test.yml"
    path.write_text(yaml.safe_dump({"rule_files": ["empty.rules.yml"],
                                    "evaluation_interval": "15s", "tests": tests}))
    res = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True,
                         timeout=120, check=False, cwd=tmp_path)
    assert res.returncode == 0, f"promtool test rules:\n{res.stdout}{res.stderr}"


def test_new_series_increase_counts_a_series_born_mid_range(tmp_path: Path) -> None:
    expr = f"sum by (vm) ({new_series_increase('c', '1m')})"

    def at(time: str, new: float, old: float) -> dict[str, Any]:
        return {"expr": expr, "eval_time": time, "exp_samples": [
            {"labels": '{vm="new"}', "value": new}, {"labels": '{vm="old"}', "value": old}]}

    _promtool_test(tmp_path, [{
        "interval": "15s",
        "input_series": [
            # created at its first increment: absent until 2m, then 1, then 3 from 3m45s
            {"series": 'c{vm="new"}', "values": "_x8 1x7 3x10"},
            # exported from 0, one increment at 1m45s
            {"series": 'c{vm="old"}', "values": "0x7 1x17"},
        ],
        "promql_expr_test": [
            at("2m", new=1, old=1),      # new: its whole value (it started from 0)
            at("2m30s", new=1, old=1),   # still: plain increase() would give 0 here
            at("3m", new=0, old=0),      # a window later the new series is an old one
            at("4m", new=2, old=0),      # ... whose increments count as usual
        ],
    }])


def _born_mid_range_inputs(expr: str) -> list[dict[str, str]]:
    """One series for each NEW_SERIES_COUNTERS metric that ``expr`` takes an increase or rate
    of (not a plain total), absent for 5 minutes and then at 3 (two buckets for the histogram,
    so histogram_quantile has a finite answer)."""
    out = []
    for name in sorted(metric_names(expr) & NEW_SERIES_COUNTERS):
        if not re.search(rf"\b(?:i?rate|increase|i?delta)\(\s*{name}\{{", expr):
            continue
        labels = 'job="kvm-completion-tracer",instance="host1:9110"'
        if name in VM_METRICS:
            labels += ',vm="web-1"'
        for le in (['le="0.001",', 'le="+Inf",'] if name.endswith("_bucket") else [""]):
            out.append({"series": f"{name}{{{le}{labels}}}", "values": "_x20 3x40"})
    return out


def test_counter_panels_show_a_series_born_mid_range(tmp_path: Path) -> None:
    # Each panel query on those counters, as the dashboard has it, against a series born at 5m:
    # 30 s later (three samples: a plain increase() says 0) it must show a value above 0, and
    # once the series is older than the window and unchanged, 0 (not its full value again).
    cases = []
    for title, expr in panel_queries(interval="1m"):
        inputs = _born_mid_range_inputs(expr)
        if not inputs:
            continue
        probe = f"sum({expr}) > bool 0"
        cases.append({"name": title, "interval": "15s", "input_series": inputs,
                      "promql_expr_test": [
                          {"expr": probe, "eval_time": "5m30s",
                           "exp_samples": [{"labels": "{}", "value": 1}]},
                          {"expr": probe, "eval_time": "8m",
                           "exp_samples": [{"labels": "{}", "value": 0}]}]})
    covered = {c["name"] for c in cases}
    for title in ("Violations by VM, ioctl and exit reason", "Snapshots mid-completion",
                  "Sanctioned mid-completion saves/restores", "Events lost / maps full"):
        assert title in covered, f"no counter query in panel {title!r}"
    _promtool_test(tmp_path, cases)
