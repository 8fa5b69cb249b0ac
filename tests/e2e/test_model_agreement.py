"""The BPF state machine and its Python specification (tracer.model) agree on real guests.

The probes run with TRACE_EXITS, so every KVM_RUN entry, exit to userspace and state ioctl
reaches Python. Replayed in ring order through :class:`tracer.model.ProbeModel`, they must give
exactly the verdicts (violations, windows closed) the kernel gave.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import requires_kvm_bpf

from tracer import abi
from tracer.alerts import MemorySink
from tracer.daemon import Daemon, DaemonOptions
from tracer.events import EventFlag, EventType, KernelEvent, split_exit_aux
from tracer.model import ProbeModel
from tracer.policy import build_policy
from tracer.probes import ProbeConfig
from tracer.selftest import SELFTEST_SCENARIOS, run_vmm
from tracer.windows import kind_values

pytestmark = [pytest.mark.e2e, requires_kvm_bpf]

VerdictKey = tuple[object, ...]


def replay(events: list[KernelEvent], model: ProbeModel) -> None:
    """Feed what the probes observed into the model, in the order the ring delivered it."""
    uids: dict[int, set[int]] = {}
    for ev in events:
        pid, tid = ev.tgid, ev.tid
        if ev.type is EventType.VCPU_CREATED:
            model.ioctl_enter(pid, tid, ev.aux, abi.KVM_CREATE_VCPU, ev.vcpu_id)
            model.ioctl_exit(pid, tid, ev.fd)
            uids.setdefault(pid, set()).add(model.fds[(pid, ev.fd)])
        elif ev.type is EventType.VCPU_FD_DUP:
            model.dup(pid, tid, ev.aux, ev.fd)
        elif ev.type is EventType.VCPU_FD_CLOSED:
            model.close(pid, tid, ev.fd)
        elif ev.type is EventType.PROCESS_EXIT:
            model.process_exit(pid)
            model.forget_process(pid, uids.pop(pid, set()))
        elif ev.type is EventType.QUIRKS_DISABLED:
            model.disable_quirks(pid, tid, ev.aux)
        elif ev.type is EventType.RUN_ENTER:
            model.ioctl_enter(pid, tid, ev.fd, abi.KVM_RUN,
                              immediate_exit=bool(ev.flags & EventFlag.IMMEDIATE_EXIT))
        elif ev.type is EventType.USERSPACE_EXIT:
            model.userspace_exit(tid, *split_exit_aux(ev.aux))
        elif ev.type is EventType.STATE_IOCTL:
            if ev.flags & EventFlag.HELD and ev.flags & EventFlag.AT_RETURN:
                model.ioctl_exit(pid, tid, 0)  # a read held when it returned
            else:
                model.ioctl_enter(pid, tid, ev.fd, ev.cmd)
        elif ev.type is EventType.VIOLATION:
            if ev.flags & EventFlag.HELD:
                continue  # reported for a later ioctl or the window's end: the model does too
            if ev.flags & EventFlag.AT_RETURN:
                model.ioctl_exit(pid, tid, 0)
            else:
                model.ioctl_enter(pid, tid, ev.fd, ev.cmd)


def verdicts(events: list[KernelEvent]) -> list[VerdictKey]:
    keep = EventFlag.AT_RETURN | EventFlag.QUIRK_7E_DISABLED
    out: list[VerdictKey] = []
    for ev in events:
        if ev.type is EventType.VIOLATION:
            out.append(("violation", ev.tgid, ev.tid, ev.fd, ev.cmd, ev.vcpu_id, ev.exit_reason,
                        ev.seq, ev.flags & keep))
        elif ev.type is EventType.WINDOW_CLOSED:
            out.append(("window_closed", ev.tgid, ev.vcpu_id, ev.seq, ev.aux,
                        ev.flags & EventFlag.IMMEDIATE_EXIT))
    return out


def by_vcpu(events: list[KernelEvent]) -> dict[tuple[int, int], list[VerdictKey]]:
    """The verdicts of each vCPU thread, in order. Across threads the ring's order is not the
    model's to keep: one program run reserves a held read's report, then its trace event (the
    model reports it at that event), and another CPU's event can come between the two. (By
    thread, not vcpu_id: the multi scenario has two VMs, each with a vCPU 1.)"""
    out: dict[tuple[int, int], list[VerdictKey]] = {}
    for ev in events:
        out.setdefault((ev.tgid, ev.tid), []).extend(verdicts([ev]))
    return {k: v for k, v in out.items() if v}


@pytest.fixture(scope="module")
def traced() -> Iterator[tuple[Daemon, list[KernelEvent]]]:
    policy = build_policy()
    # 4 MiB of ring: every exit is an event in this mode. Only the scenarios' processes
    # (run_vmm puts them in the watched map): other VMs on a busy host neither flood the ring
    # nor reach the replay.
    config = ProbeConfig(trace_exits=True, ringbuf_pages=1024, watch=True)
    daemon = Daemon(DaemonOptions(policy=policy, probe_config=config), sink=MemorySink())
    seen: list[KernelEvent] = []
    handle = daemon.tracker.handle

    def record(ev: KernelEvent) -> None:
        seen.append(ev)
        handle(ev)

    daemon.tracker.handle = record  # type: ignore[method-assign]
    daemon.start(adopt=False)
    yield daemon, seen
    daemon.close()


@pytest.mark.parametrize("scenario", SELFTEST_SCENARIOS)
def test_kernel_and_model_agree(traced: tuple[Daemon, list[KernelEvent]],
                                scenario: str) -> None:
    daemon, seen = traced
    seen.clear()
    lost_before = daemon.probes.counters()["events_lost"]
    report = run_vmm(scenario, 3, daemon)
    # A lost event would make the replay meaningless (only this test's VMMs are traced).
    assert daemon.probes.counters()["events_lost"] == lost_before
    mine = [ev for ev in seen if ev.tgid == report.pid]
    assert any(ev.type is EventType.USERSPACE_EXIT for ev in mine), "no trace events"
    model = ProbeModel(daemon.options.policy.pending_exits, kind_values(daemon.options.policy))
    replay(mine, model)
    assert by_vcpu(model.drain()) == by_vcpu(mine)
