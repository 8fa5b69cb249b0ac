"""selftest's verdict comparison: every miss and every extra must show."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tracer.selftest import alert_key, compare, expected_snapshots
from tracer.vmm.report import ExpectedViolation, ScenarioReport


def expected(ioctl: str, since: int = 1, tid: int = 11, rule: str | None = None,
             kind: str = "save") -> ExpectedViolation:
    return ExpectedViolation(tid=tid, vcpu_id=0, vcpu_fd=5, vm_fd=4, exit_reason="KVM_EXIT_IO",
                             ioctl=ioctl, kind=kind, port=0x3F8, gpa=None, msr_index=None,
                             direction="out", size=1, ts_ns=since + 5, pending_since_ns=since,
                             rule=rule)


def alert(e: ExpectedViolation, **changes: Any) -> dict[str, Any]:
    base = {"tid": e.tid, "vcpu_id": e.vcpu_id, "vcpu_fd": e.vcpu_fd,
            "exit_reason": e.exit_reason, "ioctl": e.ioctl, "kind": e.kind,
            "access": {"port": f"0x{e.port:x}", "direction": "out", "size": 1, "count": 1},
            "rule": e.rule or "save-mid-completion"}
    return {**base, **changes}


def report(violations: list[ExpectedViolation],
           sanctioned: list[ExpectedViolation] = []) -> ScenarioReport:  # noqa: B006
    return ScenarioReport(scenario="t", pid=1, iterations=1, violations=violations,
                          sanctioned=sanctioned, exits={}, completions=0, vcpus=[],
                          pending_at_end=[], started_ns=0, finished_ns=1)


def test_exact_match_is_clean() -> None:
    want = [expected("KVM_GET_REGS"), expected("KVM_GET_SREGS")]
    assert compare(report(want), [alert(e) for e in want], [], 1) == []


def test_missed_extra_and_wrong_fields_are_each_reported() -> None:
    want = [expected("KVM_GET_REGS"), expected("KVM_GET_SREGS")]
    got = [alert(want[0], tid=99), alert(want[1], access={"port": "0x80"})]
    problems = compare(report(want), got, [], 1)
    assert sum(p.startswith("missed violation") for p in problems) == 2
    assert sum(p.startswith("unexpected violation") for p in problems) == 2


def test_duplicates_count() -> None:
    want = [expected("KVM_GET_REGS")]
    assert compare(report(want), [alert(want[0])] * 2, [], 0) == [
        f"unexpected violation {alert_key(alert(want[0]))}"]


def test_sanctioned_cases_and_rules_must_match() -> None:
    san = [expected("KVM_SET_REGS", rule="restore-after-pio", kind="restore")]
    assert compare(report([], san), [], [alert(san[0])], 0) == []
    problems = compare(report([], san), [], [alert(san[0], rule="port-0x7e")], 0)
    assert len(problems) == 2


def test_snapshots_are_windows_with_two_saves() -> None:
    want = [expected("KVM_GET_REGS", since=1), expected("KVM_GET_SREGS", since=1),
            expected("KVM_GET_REGS", since=2),
            replace(expected("KVM_SET_REGS", since=3), kind="restore"),
            replace(expected("KVM_SET_SREGS", since=3), kind="restore")]
    assert expected_snapshots(report(want)) == 1
    assert compare(report(want), [alert(e) for e in want], [], 2) == [
        "2 snapshot alerts, expected 1"]
