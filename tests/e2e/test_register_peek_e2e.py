"""Register peeks on real KVM under the daemon: read one register set to decode an exit, then
complete it, is correct use of the ABI (an inspection); the same read followed by a snapshot, a
restore, a second vCPU's state, the vCPU's close or the process's exit, or left pending past the
idle time, is the race (a violation). Each VMM's own record is the expectation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import requires_kvm_bpf
from daemon_proc import SNAPSHOT_IDLE_S, DaemonProcess, run_vmm

from tracer.selftest import compare

pytestmark = [pytest.mark.e2e, requires_kvm_bpf]


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    d = DaemonProcess()
    yield d
    assert d.stop() == 0
    d.cleanup()


def _exact(d: DaemonProcess, scenario: str, iterations: int = 3) -> tuple[list[dict[str, object]],
                                                                         list[dict[str, object]]]:
    report = run_vmm(scenario, iterations)
    d.settle()
    violations = d.for_pid(report.pid, "completion_violation")
    inspections = d.for_pid(report.pid, "completion_inspection")
    assert compare(report, violations, d.for_pid(report.pid, "completion_sanctioned"),
                   len(d.for_pid(report.pid, "completion_snapshot")), inspections) == []
    return violations, inspections


@pytest.mark.parametrize("scenario", ["peek-io", "peek-mmio"])
def test_peek_then_complete_is_an_inspection(daemon: DaemonProcess, scenario: str) -> None:
    violations, inspections = _exact(daemon, scenario)
    assert violations == []
    assert len(inspections) == 3
    for line in inspections:
        assert line["level"] == "debug" and line["rule"] == "register-peek"
        assert line["ioctl"] == "KVM_GET_REGS" and line["judged_on"] == "immediate_exit"


@pytest.mark.parametrize(("scenario", "judged_on"), [
    ("peek-then-snapshot", {"snapshot", "ioctl"}),
    ("peek-then-restore", {"restore", "ioctl"}),
    ("peek-then-close", {"vcpu_closed"}),
    ("peek-two-vcpus", {"second_vcpu"}),
])
def test_peek_that_is_part_of_the_race_is_a_violation(daemon: DaemonProcess, scenario: str,
                                                      judged_on: set[str]) -> None:
    violations, inspections = _exact(daemon, scenario)
    assert violations and inspections == []
    peeks = [v for v in violations if v["ioctl"] == "KVM_GET_REGS"]
    assert peeks and {v["judged_on"] for v in violations} == judged_on
    assert all(v["level"] in ("error", "critical") for v in violations)


def test_peek_then_process_exit_is_a_violation(daemon: DaemonProcess) -> None:
    violations, inspections = _exact(daemon, "peek-then-exit")
    assert [v["judged_on"] for v in violations] == ["process_exit"]
    assert len(inspections) == 2  # the earlier iterations completed their peeks


def test_peek_left_pending_past_the_idle_time_is_a_violation(daemon: DaemonProcess) -> None:
    report = run_vmm("peek-idle", 1)
    daemon.settle()
    [violation] = daemon.for_pid(report.pid, "completion_violation")
    assert violation["judged_on"] == "idle" and violation["ioctl"] == "KVM_GET_REGS"
    assert daemon.for_pid(report.pid, "completion_inspection") == []
    assert float(report.facts["held_s"]) > SNAPSHOT_IDLE_S


def test_strict_policy_alerts_every_peek() -> None:
    d = DaemonProcess("--inspection", "violation")
    try:
        report = run_vmm("peek-io", 2)
        d.settle()
        violations = d.for_pid(report.pid, "completion_violation")
        assert [(v["ioctl"], v["judged_on"]) for v in violations] == [
            ("KVM_GET_REGS", "ioctl")] * 2
        assert d.for_pid(report.pid, "completion_inspection") == []
        ready = next(e for e in d.lines() if e["event"] == "ready")
        assert ready["policy"]["inspection"] == "violation"
    finally:
        d.stop()
        d.cleanup()
