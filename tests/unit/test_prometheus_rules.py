"""The Prometheus alert rules: valid (promtool check), unit-tested (promtool test), documented.

promtool comes with Debian's ``prometheus`` package (``scripts/setup-host.sh test``).  Without it
these tests skip, except under CI, where a missing promtool fails them.
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

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "kvm-completion-tracer.rules.yml"
RULE_TESTS_DIR = REPO / "deploy" / "prometheus" / "tests"
EXAMPLE_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.example.yml"
RUNBOOK = REPO / "docs" / "runbook.md"

JOB = "kvm-completion-tracer"
RUNBOOK_PREFIX = "docs/runbook.md#"
RUNBOOK_SECTIONS = ("Meaning", "Impact", "Diagnosis", "Mitigation")


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if _ci():
            pytest.fail("promtool not found under CI: scripts/setup-host.sh test installs it "
                        "(Debian package prometheus)")
        pytest.skip("promtool not installed (apt-get install prometheus, or "
                    "scripts/setup-host.sh test)")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    doc = load_yaml(RULES)
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def rule_test_files() -> list[Path]:
    return sorted(RULE_TESTS_DIR.glob("*.yml"))


def github_anchor(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) derive from a heading's text."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def runbook_anchors() -> set[str]:
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    in_code = False
    for line in RUNBOOK.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code:
            continue
        match = re.match(r"^#{1,6}\s+(.*)$", line)
        if match:
            base = github_anchor(match.group(1))
            n = counts.get(base, 0)
            counts[base] = n + 1
            anchors.add(base if n == 0 else f"{base}-{n}")
    return anchors


def runbook_section(alert: str) -> str:
    """The text of the runbook's ``## <alert>`` section."""
    text = RUNBOOK.read_text()
    match = re.search(rf"^## {re.escape(alert)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"docs/runbook.md has no '## {alert}' section"
    return match.group(1)


# --- promtool ------------------------------------------------------------------------------------

def test_promtool_check_rules() -> None:
    res = run_promtool("check", "rules", str(RULES))
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_test_rules() -> None:
    files = rule_test_files()
    assert files, f"no promtool rule tests in {RULE_TESTS_DIR}"
    res = run_promtool("test", "rules", *(str(f) for f in files))
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_check_example_config() -> None:
    res = run_promtool("check", "config", str(EXAMPLE_CONFIG))
    assert res.returncode == 0, res.stdout + res.stderr


# --- the rules file itself -----------------------------------------------------------------------

def test_rules_exist() -> None:
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)), f"duplicate alert names: {names}"
    for expected in ("KvmCompletionViolation", "KvmCompletionSnapshotMidCompletion",
                     "KvmCompletionPendingStuck", "KvmCompletionTracerDown",
                     "KvmCompletionTracerAbsent", "KvmCompletionTracerEventsLost",
                     "KvmCompletionTracerMapFull", "KvmCompletionTracerProbesMissing",
                     "KvmCompletionTracerLoopStalled"):
        assert expected in names


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_is_documented(rule: dict[str, Any]) -> None:
    name = rule["alert"]
    severity = rule.get("labels", {}).get("severity", "")
    assert severity, f"{name}: no labels.severity"
    if "{{" not in severity:
        assert severity in {"warning", "critical"}, f"{name}: severity {severity!r}"
    annotations = rule.get("annotations", {})
    for key in ("summary", "description", "runbook_url"):
        assert str(annotations.get(key, "")).strip(), f"{name}: no annotations.{key}"
    url = annotations["runbook_url"]
    assert RUNBOOK_PREFIX in url, f"{name}: runbook_url {url!r} does not point at docs/runbook.md"
    anchor = url.split("#", 1)[1]
    assert anchor in runbook_anchors(), f"{name}: anchor #{anchor} not in docs/runbook.md"
    assert anchor == github_anchor(name)
    section = runbook_section(name)
    for part in RUNBOOK_SECTIONS:
        assert re.search(rf"^### {part}\b", section, re.M), f"runbook {name}: no '{part}'"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_selects_the_job(rule: dict[str, Any]) -> None:
    assert f'job="{JOB}"' in rule["expr"], f"{rule['alert']}: expr does not select job={JOB}"


def test_violation_severity_follows_policy() -> None:
    rule = next(r for r in alert_rules() if r["alert"] == "KvmCompletionViolation")
    assert "critical" in rule["labels"]["severity"] and "warning" in rule["labels"]["severity"]


# --- the promtool unit tests cover every alert, firing and not firing ----------------------------

def _coverage() -> dict[str, dict[str, int]]:
    seen: dict[str, dict[str, int]] = {}
    for path in rule_test_files():
        doc = load_yaml(path)
        rule_files = [(path.parent / f).resolve() for f in doc.get("rule_files", [])]
        assert RULES.resolve() in rule_files, f"{path.name}: rule_files does not load {RULES}"
        for test in doc.get("tests", []):
            for case in test.get("alert_rule_test", []):
                counts = seen.setdefault(case["alertname"], {"firing": 0, "quiet": 0})
                counts["firing" if case.get("exp_alerts") else "quiet"] += 1
    return seen


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_every_alert_has_firing_and_quiet_cases(rule: dict[str, Any]) -> None:
    counts = _coverage().get(rule["alert"], {"firing": 0, "quiet": 0})
    assert counts["firing"] > 0, f"{rule['alert']}: no promtool case where it fires"
    assert counts["quiet"] > 0, f"{rule['alert']}: no promtool case where it stays quiet"


def test_tests_name_only_existing_alerts() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    unknown = set(_coverage()) - names
    assert not unknown, f"promtool tests name unknown alerts: {sorted(unknown)}"


def test_runbook_anchor_slugs() -> None:
    assert github_anchor("KvmCompletionViolation") == "kvmcompletionviolation"
    assert github_anchor("Metrics port") == "metrics-port"
