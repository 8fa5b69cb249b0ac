"""The loaded probes themselves: attachment, the vCPU map the tracker mirrors, cleanup."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import requires_kvm_bpf

from tracer import abi
from tracer.alerts import MemorySink
from tracer.daemon import Daemon, DaemonOptions
from tracer.policy import build_policy
from tracer.probes import expected_probes
from tracer.vmm.report import ScenarioReport

pytestmark = [pytest.mark.e2e, requires_kvm_bpf]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    d = Daemon(DaemonOptions(policy=build_policy()), sink=MemorySink())
    d.start()
    yield d
    d.close()


def poll_until(d: Daemon, done: object, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not callable(done) or not done():
        assert time.monotonic() < deadline, "timed out"
        d.poll_once(20)


def test_every_probe_is_attached(daemon: Daemon) -> None:
    assert daemon.probes.missing() == []
    assert set(expected_probes(daemon.probes.config.syscall_probes)) <= set(
        daemon.probes.attached())


def test_pending_vcpu_is_mirrored_then_cleaned_up_at_process_exit(daemon: Daemon) -> None:
    before = daemon.probes.counters()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "report.json"
        vmm = subprocess.Popen([sys.executable, "-m", "tracer.vmm", "process-exit",
                                "--iterations", "1", "--report", str(path),
                                "--hold-before-exit", "2"], cwd=REPO)
        poll_until(daemon, lambda: path.exists() and path.stat().st_size > 0)
        report = ScenarioReport.from_json(path.read_text())
        daemon.poll_once(50)
        daemon.tracker.sweep()  # refresh the mirror from the probes' map
        pending = [r for r in daemon.tracker.pending_vcpus() if r.pid == report.pid]
        want = {(p.vcpu_id, p.exit_reason) for p in report.pending_at_end}
        assert want and {(r.vcpu_id, abi.exit_reason_name(r.exit_reason or 0))
                         for r in pending} == want
        assert all(r.pending_since_ns and r.run_tid for r in pending)
        assert daemon.probes.tracked_fds(report.pid)
        assert vmm.wait(timeout=30) == 0
    poll_until(daemon, lambda: not any(r.pid == report.pid
                                       for r in daemon.tracker.vcpus.values()))
    assert daemon.probes.tracked_fds(report.pid) == {}
    assert [s for s in daemon.probes.vcpu_states() if s["pid"] == report.pid] == []
    after = daemon.probes.counters()
    assert after["events_lost"] == before["events_lost"]
    # The vCPUs' statistics outlive their map entries, under the VM's name.
    retired = daemon.tracker.ledger.retired[f"python[{report.pid}]"]
    reasons = {abi.exit_reason_name(r) for r, n in enumerate(retired.exits[:abi.MAX_EXIT_REASON])
               if n}
    assert {p.exit_reason for p in report.pending_at_end} <= reasons
    assert retired.pending_exits(daemon.options.policy.pending_exits) >= len(want)


def test_a_tracker_failure_is_a_counted_notice_not_a_lost_traceback(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    from tracer.events import EventFlag, EventType, KernelEvent, encode_event

    def broken(_ev: KernelEvent) -> None:
        raise KeyError("boom")

    monkeypatch.setattr(daemon.tracker, "handle", broken)
    ev = KernelEvent(EventType.VCPU_CREATED, 1, 1, 0, 5, 0, 0, EventFlag(0), 0, 0, 1, 4, 1,
                     None, "vmm")
    daemon._on_raw_event(encode_event(ev))
    daemon._on_raw_event(b"short")
    assert isinstance(daemon.sink, MemorySink)
    names = [name for name, _ in daemon.sink.notices[-2:]]
    assert names == ["internal_error", "malformed_event"]
    assert daemon.tracker.stats.internal_errors == 1
    assert daemon.tracker.stats.malformed_events == 1


def test_guest_exit_probes_can_be_turned_off() -> None:
    """probes.guest_exits = false: no kvm_exit/kvm_entry program, and none is expected (so the
    probes-missing alert stays quiet), while the completion probes are all there."""
    from tracer.probes import GUEST_EXIT_PROBES, ProbeConfig

    d = Daemon(DaemonOptions(policy=build_policy(),
                             probe_config=ProbeConfig(guest_exits=False, max_vcpus=64)),
               sink=MemorySink())
    d.start()
    try:
        attached = set(d.probes.attached())
        assert not attached & set(GUEST_EXIT_PROBES)
        assert d.probes.missing() == []
        assert set(d.probes.expected()) == set(expected_probes(guest_exits=False))
        assert set(expected_probes(guest_exits=False)) <= attached
    finally:
        d.close()
