"""Register peeks on real KVM under the daemon. The kernel judges each pending window
(tracer.windows): a read of one kind of state with nothing restored is an inspection, counted
in the kernel and never sent, whatever ends the window (completion, the vCPU closed, the
process exiting, however long it stayed open); a second kind read in the window is a snapshot,
a restore is a restore, and the held read is then reported with the window. Each VMM's own
record is the expectation."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
from conftest import requires_kvm_bpf
from daemon_proc import DaemonProcess, run_vmm

from tracer.selftest import compare

pytestmark = [pytest.mark.e2e, requires_kvm_bpf]


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    d = DaemonProcess()
    yield d
    assert d.stop() == 0
    d.cleanup()


def _inspections(d: DaemonProcess, pid: int) -> Counter[tuple[str, str]]:
    out: Counter[tuple[str, str]] = Counter()
    for line in d.for_pid(pid, "inspections"):
        assert line["level"] == "debug"
        for row in line["counts"]:
            out[(row["ioctl"], row["exit_reason"])] += row["count"]
    return out


def _exact(d: DaemonProcess, scenario: str, iterations: int = 3
           ) -> tuple[list[dict[str, object]], Counter[tuple[str, str]]]:
    report = run_vmm(scenario, iterations)
    d.settle()
    violations = d.for_pid(report.pid, "completion_violation")
    inspections = _inspections(d, report.pid)
    assert compare(report, violations, d.for_pid(report.pid, "completion_sanctioned"),
                   len(d.for_pid(report.pid, "completion_snapshot")), inspections) == []
    return violations, inspections


@pytest.mark.parametrize(("scenario", "exit_reason"), [
    ("peek-io", "KVM_EXIT_IO"), ("peek-mmio", "KVM_EXIT_MMIO"),
    ("peek-then-close", "KVM_EXIT_IO"),  # the window ends with the vCPU
    ("peek-two-vcpus", "KVM_EXIT_IO"),  # one kind per window, whoever reads it
    ("peek-then-exit", "KVM_EXIT_IO"),  # the last window ends with the process
    ("peek-events", "KVM_EXIT_IO"),  # one kind other than the registers
])
def test_a_lone_read_of_one_kind_is_an_inspection(daemon: DaemonProcess, scenario: str,
                                                  exit_reason: str) -> None:
    violations, inspections = _exact(daemon, scenario)
    assert violations == []
    per_window = 2 if scenario == "peek-two-vcpus" else 1
    ioctl = "KVM_GET_VCPU_EVENTS" if scenario == "peek-events" else "KVM_GET_REGS"
    assert inspections == {(ioctl, exit_reason): 3 * per_window}


def test_a_window_left_open_past_the_idle_time_is_still_an_inspection(
        daemon: DaemonProcess) -> None:
    report = run_vmm("peek-idle", 1)
    daemon.settle()
    assert daemon.for_pid(report.pid, "completion_violation") == []
    assert _inspections(daemon, report.pid) == {("KVM_GET_REGS", "KVM_EXIT_IO"): 1}


@pytest.mark.parametrize(("scenario", "judged_on"), [
    ("peek-then-snapshot", {"snapshot", "ioctl"}),
    ("peek-then-restore", {"restore", "ioctl"}),
])
def test_a_read_that_is_part_of_the_race_is_reported_with_its_window(
        daemon: DaemonProcess, scenario: str, judged_on: set[str]) -> None:
    violations, inspections = _exact(daemon, scenario)
    assert violations and inspections == {}
    peeks = [v for v in violations if v["ioctl"] == "KVM_GET_REGS"]
    assert peeks and {v["judged_on"] for v in violations} == judged_on
    # the held read carries the stack of the ioctl that made its window a finding
    assert all("user_stack" in v for v in violations)
    assert all(v["level"] in ("error", "critical") for v in violations)


def test_strict_policy_alerts_every_peek() -> None:
    d = DaemonProcess("--inspection", "violation")
    try:
        report = run_vmm("peek-io", 2)
        d.settle()
        violations = d.for_pid(report.pid, "completion_violation")
        assert [(v["ioctl"], v["judged_on"]) for v in violations] == [
            ("KVM_GET_REGS", "ioctl")] * 2
        assert _inspections(d, report.pid) == {}
        ready = next(e for e in d.lines() if e["event"] == "ready")
        assert ready["policy"]["inspection"] == "violation"
    finally:
        d.stop()
        d.cleanup()
