"""The state machine (tracer.model, the spec of bpf/completion.c) feeding the tracker.

Each test is an event sequence as the probes observe it; the assertions are on the alerts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from tracer import abi
from tracer.alerts import MemorySink, ViolationAlert
from tracer.events import EventType, MmioAccess, MsrAccess, PioAccess
from tracer.model import ProbeModel
from tracer.policy import build_policy
from tracer.tracker import Tracker
from tracer.vmident import VmIdentity
from tracer.windows import kind_values

IO, MMIO, HLT = abi.KVM_EXIT_IO, abi.KVM_EXIT_MMIO, 5
RDMSR, WRMSR = abi.KVM_EXIT_X86_RDMSR, abi.KVM_EXIT_X86_WRMSR
GET_REGS = abi.IOCTL_BY_NAME["KVM_GET_REGS"].number
GET_SREGS = abi.IOCTL_BY_NAME["KVM_GET_SREGS"].number
GET_MSRS = abi.IOCTL_BY_NAME["KVM_GET_MSRS"].number
SET_REGS = abi.IOCTL_BY_NAME["KVM_SET_REGS"].number
GET_LAPIC = abi.IOCTL_BY_NAME["KVM_GET_LAPIC"].number
KVM_NMI = abi.IOCTL_BY_NAME["KVM_NMI"].number
SET_SREGS = abi.IOCTL_BY_NAME["KVM_SET_SREGS"].number
KVM_INTERRUPT = abi.IOCTL_BY_NAME["KVM_INTERRUPT"].number
PID, VCPU_TID, OTHER_TID, VM_FD = 100, 101, 102, 4
OUT_3F8 = PioAccess(0x3F8, "out", 1, 1)
IN_60 = PioAccess(0x60, "in", 1, 1)
MMIO_W = MmioAccess(0xD0000000, 4, True)


@dataclass
class FakeProc:
    fds: dict[tuple[int, int], int] = field(default_factory=dict)  # (pid, fd) -> vcpu id
    dead: set[int] = field(default_factory=set)
    restarted: set[int] = field(default_factory=set)  # pid reused by a newer process

    def identify(self, pid: int) -> VmIdentity:
        if pid in self.dead:  # /proc/PID is gone, as vmident.identify_vm then says
            return VmIdentity(name=f"unknown[{pid}]", vmm="other", uuid=None,
                              source="unavailable")
        return VmIdentity(name=f"guest-{pid}", vmm="qemu", uuid=None, source="test")

    def resolve_fd(self, pid: int, fd: int) -> int | None:
        return self.fds.get((pid, fd))

    def run_addr(self, pid: int, vcpu_id: int) -> int | None:
        return 0x7F0000000000

    def start_time(self, pid: int) -> int | None:
        if pid in self.dead:
            return None
        return 2000 if pid in self.restarted else 1000

    def alive(self, pid: int, start_time: int) -> bool:
        return self.start_time(pid) == start_time


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Harness:
    """A process with VMs, observed by the model, judged by the tracker."""

    def __init__(self, **policy: Any) -> None:
        from tracer.policy import PolicyOverrides

        # Strict unless a test asks otherwise: most tests use a lone KVM_GET_REGS as "a save
        # mid-completion"; the register-peek tests below pass inspection="benign".
        policy.setdefault("inspection", "violation")
        self.policy = build_policy(PolicyOverrides(arch="x86_64", **policy))
        self.model = ProbeModel(self.policy.pending_exits, kind_values(self.policy))
        self.sink = MemorySink()
        self.proc = FakeProc()
        self.clock = Clock()
        self.tracker = Tracker(self.policy, self.sink, self.proc, self.model,
                               snapshot_idle_s=1.0, clock=self.clock)

    def flush(self) -> None:
        for event in self.model.drain():
            self.tracker.handle(event)

    def create_vcpu(self, fd: int, vcpu_id: int = 0, pid: int = PID, tid: int = VCPU_TID) -> None:
        self.model.ioctl_enter(pid, tid, VM_FD, abi.KVM_CREATE_VCPU, vcpu_id)
        self.model.ioctl_exit(pid, tid, fd)
        self.flush()

    def run(self, fd: int, exit_reason: int, access: Any = None, errno: int = 0,
            immediate_exit: bool = False, pid: int = PID, tid: int = VCPU_TID) -> None:
        self.model.ioctl_enter(pid, tid, fd, abi.KVM_RUN, immediate_exit=immediate_exit)
        self.model.userspace_exit(tid, exit_reason, errno, access)
        self.flush()

    def ioctl(self, fd: int, cmd: int, pid: int = PID, tid: int = VCPU_TID) -> None:
        self.model.ioctl_enter(pid, tid, fd, cmd)
        self.model.ioctl_exit(pid, tid, 0)
        self.flush()

    def complete(self, fd: int, pid: int = PID, tid: int = VCPU_TID) -> None:
        """An immediate-exit KVM_RUN: completes, returns -EINTR."""
        self.run(fd, 10, errno=abi.EINTR_ERRNO, immediate_exit=True, pid=pid, tid=tid)

    @property
    def violations(self) -> list[ViolationAlert]:
        return self.sink.violations


def test_save_mid_completion_from_the_vcpu_thread() -> None:
    h = Harness()
    h.create_vcpu(fd=5, vcpu_id=2)
    h.run(5, IO, OUT_3F8)
    h.ioctl(5, GET_REGS)
    [v] = h.violations
    assert (v.pid, v.tid, v.vcpu_id, v.vcpu_fd) == (PID, VCPU_TID, 2, 5)
    assert (v.exit_reason, v.ioctl, v.kind) == ("KVM_EXIT_IO", "KVM_GET_REGS", "save")
    assert v.access == {"port": "0x3f8", "direction": "out", "size": 1, "count": 1}
    assert v.vm == f"guest-{PID}" and v.rule == "save-mid-completion" and v.severity == "error"
    assert "replays the port 0x3f8 OUT" in v.reason and v.detected_at == "ioctl_entry"
    assert v.pending_ns > 0


def test_reentry_completes_and_next_exit_decides() -> None:
    h = Harness()
    h.create_vcpu(fd=5)
    h.run(5, IO, OUT_3F8)
    h.run(5, HLT)  # normal re-entry: the OUT completed, the guest ran to a HLT
    h.ioctl(5, GET_REGS)
    assert h.violations == []


def test_eintr_return_leaves_nothing_pending() -> None:
    h = Harness()
    h.create_vcpu(fd=5)
    h.run(5, MMIO, MMIO_W)
    h.complete(5)
    for cmd in (GET_REGS, GET_SREGS, GET_MSRS, SET_REGS):
        h.ioctl(5, cmd)
    assert h.violations == [] and h.sink.snapshots == []


def test_completion_that_causes_a_new_exit_opens_a_new_window() -> None:
    h = Harness()
    h.create_vcpu(fd=5)
    h.run(5, IO, OUT_3F8)
    h.run(5, IO, OUT_3F8, immediate_exit=True)  # string I/O: the completion exits again
    h.ioctl(5, GET_REGS)
    [v] = h.violations
    assert v.window == 2


def test_hlt_needs_no_completion() -> None:
    h = Harness()
    h.create_vcpu(fd=5)
    h.run(5, HLT)
    h.ioctl(5, GET_REGS)
    h.ioctl(5, SET_REGS)
    assert h.violations == [] and h.sink.sanctions == []


def test_other_vcpu_ioctls_are_not_saves() -> None:
    h = Harness()
    h.create_vcpu(fd=5)
    h.run(5, IO, IN_60)
    h.ioctl(5, KVM_INTERRUPT)
    assert h.violations == []


def test_save_from_another_thread_names_that_thread() -> None:
    h = Harness()
    h.create_vcpu(fd=5)
    h.run(5, RDMSR, MsrAccess(0x12345678, False))
    h.ioctl(5, GET_SREGS, tid=OTHER_TID)
    [v] = h.violations
    assert v.tid == OTHER_TID and v.exit_reason == "KVM_EXIT_X86_RDMSR"
    assert "loses the RDMSR 0x12345678 result" in v.reason


def test_save_that_waited_on_a_running_vcpu_is_judged_at_return() -> None:
    h = Harness()
    h.create_vcpu(fd=5)
    h.model.ioctl_enter(PID, VCPU_TID, 5, abi.KVM_RUN)
    h.model.ioctl_enter(PID, OTHER_TID, 5, GET_REGS)  # blocks on the vCPU mutex
    h.model.userspace_exit(VCPU_TID, MMIO, 0, MMIO_W)
    h.model.ioctl_exit(PID, OTHER_TID, 0)  # ran right after the exit
    h.flush()
    [v] = h.violations
    assert v.detected_at == "ioctl_return" and v.tid == OTHER_TID


def test_save_that_waited_on_a_run_ending_in_hlt_is_clean() -> None:
    h = Harness()
    h.create_vcpu(fd=5)
    h.model.ioctl_enter(PID, VCPU_TID, 5, abi.KVM_RUN)
    h.model.ioctl_enter(PID, OTHER_TID, 5, GET_REGS)
    h.model.userspace_exit(VCPU_TID, HLT)
    h.model.ioctl_exit(PID, OTHER_TID, 0)
    h.flush()
    assert h.violations == []


def test_closed_fd_reused_by_a_new_vcpu_inherits_nothing() -> None:
    h = Harness()
    h.create_vcpu(fd=5, vcpu_id=0)
    h.run(5, IO, OUT_3F8)
    h.model.close(PID, VCPU_TID, 5)
    h.flush()
    assert h.tracker.vcpus == {}
    h.create_vcpu(fd=5, vcpu_id=0)  # a new VM's vCPU gets the same fd number
    h.ioctl(5, GET_REGS)
    assert h.violations == []


def test_dup_fd_counts_and_survives_closing_the_original() -> None:
    h = Harness()
    h.create_vcpu(fd=5, vcpu_id=1)
    h.model.dup(PID, VCPU_TID, 5, 9)
    h.run(5, MMIO, MMIO_W)
    h.ioctl(9, GET_REGS)
    h.model.close(PID, VCPU_TID, 5)
    h.flush()
    h.ioctl(9, GET_SREGS)
    assert [(v.vcpu_fd, v.vcpu_id, v.ioctl) for v in h.violations] == [
        (9, 1, "KVM_GET_REGS"), (9, 1, "KVM_GET_SREGS")]
    assert h.tracker.vcpus[1].fds == {9}


def test_dup2_over_a_vcpu_fd_closes_it() -> None:
    h = Harness()
    h.create_vcpu(fd=5, vcpu_id=0)
    h.create_vcpu(fd=6, vcpu_id=1)
    h.model.dup(PID, VCPU_TID, 5, 6)  # dup2(5, 6): vCPU 1 loses its only fd
    h.flush()
    assert sorted(r.vcpu_id for r in h.tracker.vcpus.values()) == [0]


def test_process_exit_forgets_everything_and_a_reused_pid_starts_clean() -> None:
    h = Harness()
    h.create_vcpu(fd=5)
    h.run(5, IO, OUT_3F8)
    h.ioctl(5, GET_REGS)
    h.ioctl(5, GET_SREGS)
    h.model.process_exit(PID)
    h.flush()
    assert h.model.fds == {} and h.model.vcpus == {} and h.tracker.vcpus == {}
    [snap] = h.sink.snapshots
    assert snap.closed_by == "process_exit"
    h.create_vcpu(fd=5)  # a new process with the same pid
    h.ioctl(5, GET_REGS)
    assert len(h.violations) == 2


def test_snapshot_names_every_save_of_the_window_once() -> None:
    h = Harness()
    h.create_vcpu(fd=5, vcpu_id=3)
    h.run(5, IO, IN_60)
    for cmd in (GET_REGS, GET_SREGS, GET_MSRS):
        h.ioctl(5, cmd)
    h.ioctl(5, SET_REGS)  # restores are not part of the snapshot (and PIO: sanctioned)
    assert h.sink.snapshots == []
    h.complete(5)
    [snap] = h.sink.snapshots
    assert snap.ioctls == ["KVM_GET_REGS", "KVM_GET_SREGS", "KVM_GET_MSRS"]
    assert (snap.vcpu_id, snap.window, snap.closed_by, snap.severity) == (
        3, 1, "immediate_exit", "critical")
    h.run(5, HLT)
    assert len(h.sink.snapshots) == 1


def test_one_save_is_no_snapshot() -> None:
    h = Harness()
    h.create_vcpu(fd=5)
    h.run(5, IO, OUT_3F8)
    h.ioctl(5, GET_REGS)
    h.run(5, HLT)
    assert len(h.violations) == 1 and h.sink.snapshots == []


def test_idle_window_is_reported_once() -> None:
    h = Harness()
    h.create_vcpu(fd=5)
    h.run(5, WRMSR, MsrAccess(0x12345678, True))
    h.ioctl(5, GET_REGS)
    h.ioctl(5, GET_MSRS)
    h.clock.now = 0.5
    h.tracker.tick()
    assert h.sink.snapshots == []
    h.clock.now = 1.5
    h.tracker.tick()
    h.tracker.tick()
    h.complete(5)
    [snap] = h.sink.snapshots
    assert snap.closed_by == "idle" and snap.exit_reason == "KVM_EXIT_X86_WRMSR"


def test_port_7e_is_sanctioned_unless_the_quirk_is_disabled() -> None:
    out_7e = PioAccess(0x7E, "out", 2, 1)
    h = Harness()
    h.create_vcpu(fd=5)
    h.run(5, IO, out_7e)
    h.ioctl(5, GET_REGS)
    h.ioctl(5, SET_REGS)
    assert h.violations == []
    assert [a.rule for a in h.sink.sanctions] == ["port-0x7e", "port-0x7e"]
    assert h.tracker.stats.sanctioned[(f"guest-{PID}", "port-0x7e")] == 2

    h2 = Harness()
    h2.model.disable_quirks(PID, VCPU_TID, abi.KVM_X86_QUIRK_OUT_7E_INC_RIP)
    h2.create_vcpu(fd=5)
    h2.run(5, IO, out_7e)
    h2.ioctl(5, GET_REGS)
    assert [v.rule for v in h2.violations] == ["save-mid-completion"]


def test_port_7e_in_is_not_sanctioned() -> None:
    h = Harness()
    h.create_vcpu(fd=5)
    h.run(5, IO, PioAccess(0x7E, "in", 1, 1))
    h.ioctl(5, GET_REGS)
    assert len(h.violations) == 1


def test_operator_can_switch_the_port_7e_sanction_off() -> None:
    h = Harness(disabled_sanctions=["port-0x7e"])
    h.create_vcpu(fd=5)
    h.run(5, IO, PioAccess(0x7E, "out", 2, 1))
    h.ioctl(5, GET_REGS)
    assert len(h.violations) == 1


def test_restore_after_pio_is_tolerated_after_mmio_it_is_critical() -> None:
    h = Harness()
    h.create_vcpu(fd=5)
    h.run(5, IO, OUT_3F8)
    h.ioctl(5, SET_REGS)
    assert h.violations == [] and [a.rule for a in h.sink.sanctions] == [
        "restore-after-pio"]
    h.complete(5)
    h.run(5, MMIO, MMIO_W)
    h.ioctl(5, SET_SREGS)
    [v] = h.violations
    assert (v.kind, v.rule, v.severity, v.ioctl) == (
        "restore", "restore-mid-completion", "critical", "KVM_SET_SREGS")
    assert h.sink.snapshots == []


def test_unknown_fd_is_adopted_from_proc_and_judged_from_then_on() -> None:
    h = Harness()
    h.proc.fds[(PID, 7)] = 0
    h.model.ioctl_enter(PID, VCPU_TID, 7, abi.KVM_RUN)  # a VM older than the probes
    h.model.out.append(_unknown_fd_event(7))
    h.flush()
    assert [r.vcpu_id for r in h.tracker.vcpus.values()] == [0]
    h.run(7, IO, OUT_3F8)
    h.ioctl(7, GET_REGS)
    assert len(h.violations) == 1


def test_sweep_forgets_processes_whose_exit_event_was_lost() -> None:
    h = Harness()
    h.create_vcpu(fd=5)
    h.create_vcpu(fd=5, pid=PID + 1)
    h.tracker.sweep()
    assert len(h.tracker.vcpus) == 2
    h.proc.dead.add(PID)
    h.proc.restarted.add(PID + 1)  # the pid now names a newer process
    h.tracker.sweep()
    assert h.tracker.vcpus == {} and h.model.vcpus == {}


def test_sweep_folds_a_gone_process_the_tracker_never_saw() -> None:
    """The ring dropped every event of a process (its vCPU's creation, its snapshot's reports,
    its exit): the kernel's counts of it are folded by the sweep once it is gone, under its
    name, not kept in mid_counts for good."""
    h = Harness()
    h.model.ioctl_enter(PID, VCPU_TID, VM_FD, abi.KVM_CREATE_VCPU, 0)
    h.model.ioctl_exit(PID, VCPU_TID, 5)
    h.model.ioctl_enter(PID, VCPU_TID, 5, abi.KVM_RUN)
    h.model.userspace_exit(VCPU_TID, IO, 0, OUT_3F8)
    for cmd in (GET_REGS, GET_SREGS):
        h.model.ioctl_enter(PID, VCPU_TID, 5, cmd)
        h.model.ioctl_exit(PID, VCPU_TID, 0)
    h.model.process_exit(PID)
    h.model.drain()  # all lost
    h.tracker.sweep()
    assert h.model.mid_counts()  # alive: its counts stay live
    h.proc.dead.add(PID)
    h.tracker.sweep()
    assert h.model.mid_counts() == {}
    assert h.tracker.unverified() == {f"unknown[{PID}]": 2}


def test_hyperv_synic_exit_is_not_pending() -> None:
    from tracer.events import HypervAccess

    h = Harness()
    h.create_vcpu(fd=5)
    h.run(5, abi.KVM_EXIT_HYPERV, HypervAccess(1))
    h.ioctl(5, GET_REGS)
    assert h.violations == [] and h.tracker.stats.not_pending == 1


@pytest.mark.parametrize("threads", [2, 4])
def test_several_vms_and_vcpus_are_kept_apart(threads: int) -> None:
    h = Harness()
    for n in range(threads):
        h.create_vcpu(fd=10 + n, vcpu_id=n, pid=PID + n, tid=1000 + n)
    for n in range(threads):
        h.run(10 + n, IO if n % 2 else HLT, OUT_3F8, pid=PID + n, tid=1000 + n)
    for n in range(threads):
        h.ioctl(10 + n, GET_REGS, pid=PID + n, tid=1000 + n)
    assert sorted((v.pid, v.vcpu_id) for v in h.violations) == [
        (PID + n, n) for n in range(threads) if n % 2]


def _unknown_fd_event(fd: int) -> Any:
    from tracer.events import EventFlag, KernelEvent

    return KernelEvent(EventType.UNKNOWN_FD, PID, VCPU_TID, 0, fd, 0, 0, EventFlag(0), 0, 0,
                       1, abi.KVM_RUN, 0, None, "vmm")


def test_save_entered_while_idle_is_judged_at_entry_only() -> None:
    """After a HLT exit the vCPU is idle, not running: a save entering then is not re-judged
    when it returns, even if the vCPU thread meanwhile ran into a port exit."""
    h = Harness()
    h.create_vcpu(fd=5)
    h.run(5, HLT)
    h.model.ioctl_enter(PID, OTHER_TID, 5, GET_REGS)
    h.model.ioctl_enter(PID, VCPU_TID, 5, abi.KVM_RUN)
    h.model.userspace_exit(VCPU_TID, IO, 0, OUT_3F8)
    h.model.ioctl_exit(PID, OTHER_TID, 0)
    h.flush()
    assert h.violations == []


def test_close_range_is_reconciled_from_proc_on_the_next_tick() -> None:
    from tracer.events import EventFlag, KernelEvent

    h = Harness()
    h.create_vcpu(fd=5, vcpu_id=0)
    h.create_vcpu(fd=6, vcpu_id=1)
    h.proc.fds[(PID, 6)] = 1  # fd 6 still open after close_range(5, 5)
    h.tracker.handle(KernelEvent(EventType.FD_RANGE_CLOSED, PID, VCPU_TID, 0, 5, 0, 0,
                                 EventFlag(0), 0, 0, 1, 5, 0, None, "vmm"))
    assert len(h.tracker.vcpus) == 2  # not before close_range has returned
    h.tracker.tick()
    assert [r.vcpu_id for r in h.tracker.vcpus.values()] == [1]
    assert h.model.tracked_fds(PID) == {6: 2}


def test_trace_events_become_debug_notices() -> None:
    h = Harness()
    h.create_vcpu(fd=5)
    from tracer.events import EventFlag, KernelEvent, decode_event, encode_event

    # As the C side builds it: ((s64)errno << 32) | reason, through the wire format.
    aux = (-4 << 32) | 10
    ev = KernelEvent(EventType.USERSPACE_EXIT, PID, VCPU_TID, 0, -1, 0, 0, EventFlag(0), 1, 0,
                     1, aux, 1, None, "vmm")
    h.tracker.handle(decode_event(encode_event(ev)))
    event, fields = h.sink.notices[-1]
    assert event == "trace_userspace_exit"
    assert fields["exit_reason"] == "KVM_EXIT_INTR" and fields["errno"] == -4


def test_mirror_follows_the_probes_map_and_the_events() -> None:
    h = Harness()
    h.create_vcpu(fd=5, vcpu_id=4)
    h.create_vcpu(fd=6, vcpu_id=5)
    h.run(5, IO, OUT_3F8)
    h.run(6, HLT, tid=OTHER_TID)
    h.tracker.sweep()
    by_id = {r.vcpu_id: r for r in h.tracker.vcpus.values()}
    assert (by_id[4].state, by_id[4].exit_reason, by_id[4].run_tid) == ("pending", IO, VCPU_TID)
    assert by_id[4].pending_since_ns is not None and by_id[4].window == 1
    assert (by_id[5].state, by_id[5].exit_reason, by_id[5].pending_since_ns) == ("idle", HLT, None)
    assert [r.vcpu_id for r in h.tracker.pending_vcpus()] == [4]
    h.ioctl(5, GET_REGS)
    h.complete(5)  # WINDOW_CLOSED: the re-entry is seen without a sweep
    assert by_id[4].state == "running" and h.tracker.pending_vcpus() == []


# ---- statistics of vCPUs that go (what keeps the exported counters monotonic) -----------------

def _retired(h: Harness) -> dict[str, tuple[int, int, int]]:
    """vm -> (userspace exits, completed windows, reentry completions) of gone vCPUs."""
    return {vm: (c.userspace_exits, c.completed, c.completions[0])
            for vm, c in h.tracker.ledger.retired.items()}


def test_closing_the_last_fd_folds_the_vcpu_counts_into_its_vm() -> None:
    h = Harness()
    h.create_vcpu(fd=5)
    h.run(5, IO, OUT_3F8)
    h.run(5, HLT)  # completes the OUT by re-entry
    h.model.close(PID, VCPU_TID, 5)
    assert [v.state.name for v in h.model.vcpus.values()] == ["CLOSED"]  # until read
    h.flush()
    assert h.model.vcpus == {} and h.tracker.vcpus == {}
    assert _retired(h) == {f"guest-{PID}": (2, 0, 1)}


def test_closed_vcpu_whose_close_event_was_lost_is_released_by_the_sweep() -> None:
    h = Harness()
    h.create_vcpu(fd=5)
    h.run(5, IO, OUT_3F8)
    h.model.close(PID, VCPU_TID, 5)
    h.model.drain()  # the ring buffer dropped VCPU_FD_CLOSED
    assert len(h.tracker.vcpus) == 1
    h.tracker.sweep()
    assert h.model.vcpus == {} and h.tracker.vcpus == {}
    assert _retired(h) == {f"guest-{PID}": (1, 0, 0)}


def test_process_exit_retires_its_vcpus_and_gone_vms_are_pruned_after_retention() -> None:
    h = Harness()
    h.create_vcpu(fd=5)
    h.run(5, IO, OUT_3F8)
    h.ioctl(5, GET_REGS)
    h.model.process_exit(PID)
    h.flush()
    vm = f"guest-{PID}"
    assert _retired(h) == {vm: (1, 0, 0)}
    assert sum(h.tracker.stats.violations.values()) == 1
    h.clock.now = 100.0
    assert h.tracker.prune_gone(retain_s=300) == []
    h.clock.now = 301.0
    assert h.tracker.prune_gone(retain_s=300) == [vm]
    assert h.tracker.ledger.retired == {} and not h.tracker.stats.violations


def test_a_vm_back_under_the_same_name_keeps_its_counts() -> None:
    h = Harness()
    h.create_vcpu(fd=5)
    h.run(5, IO, OUT_3F8)
    h.model.process_exit(PID)
    h.flush()
    h.clock.now = 10.0
    h.create_vcpu(fd=5)  # same pid, hence the same name in FakeProc: the VM is back
    h.clock.now = 1000.0
    assert h.tracker.prune_gone(retain_s=300) == []
    assert _retired(h) == {f"guest-{PID}": (1, 0, 0)}


def test_close_range_retires_the_vcpu_it_closed() -> None:
    from tracer.events import EventFlag, KernelEvent

    h = Harness()
    h.create_vcpu(fd=5)
    h.run(5, HLT)
    h.tracker.handle(KernelEvent(EventType.FD_RANGE_CLOSED, PID, VCPU_TID, 0, 5, 0, 0,
                                 EventFlag(0), 0, 0, 1, 5, 0, None, "vmm"))
    h.tracker.tick()
    assert h.tracker.vcpus == {} and _retired(h) == {f"guest-{PID}": (1, 0, 0)}


# ---- register peeks (policy inspection = "benign", the default) -------------------------------
def peek_harness() -> Harness:
    h = Harness(inspection="benign")
    h.create_vcpu(fd=5, vcpu_id=0)
    return h


def _inspections(h: Harness) -> dict[tuple[str, str, str], int]:
    return dict(h.tracker.inspection_counts())


@pytest.mark.parametrize("immediate", [True, False])
def test_peek_then_completion_is_an_inspection_not_a_violation(immediate: bool) -> None:
    h = peek_harness()
    h.run(5, IO, IN_60)
    h.ioctl(5, GET_REGS)
    h.ioctl(5, GET_REGS)  # reading the same kind twice is still one kind
    assert h.model.out == [] and h.violations == []  # held in the kernel: no event at all
    if immediate:
        h.complete(5)
    else:
        h.run(5, HLT)  # a plain re-entry completes it too
    assert h.violations == [] and h.sink.snapshots == []
    assert _inspections(h) == {(f"guest-{PID}", "KVM_GET_REGS", "KVM_EXIT_IO"): 2}
    assert h.tracker.stats.violations == {}
    assert h.tracker.unverified() == {}


def test_lone_lapic_read_then_completion_is_an_inspection() -> None:
    # kvmtool's NMI injection: KVM_GET_LAPIC, KVM_NMI, re-entry.
    h = peek_harness()
    h.run(5, IO, IN_60)
    h.ioctl(5, GET_LAPIC)
    h.ioctl(5, KVM_NMI)
    h.complete(5)
    assert h.violations == []
    assert _inspections(h) == {(f"guest-{PID}", "KVM_GET_LAPIC", "KVM_EXIT_IO"): 1}


def test_lone_read_then_process_exit_is_an_inspection() -> None:
    h = peek_harness()
    h.run(5, IO, IN_60)
    h.ioctl(5, GET_REGS)
    h.model.process_exit(PID)
    h.flush()
    assert h.violations == []
    assert h.tracker.stats.inspections == {(f"guest-{PID}", "KVM_GET_REGS", "KVM_EXIT_IO"): 1}


def test_lone_read_then_vcpu_closed_is_an_inspection() -> None:
    h = peek_harness()
    h.run(5, IO, IN_60)
    h.ioctl(5, GET_REGS)
    h.model.close(PID, VCPU_TID, 5)
    h.flush()
    assert h.violations == []
    assert _inspections(h) == {(f"guest-{PID}", "KVM_GET_REGS", "KVM_EXIT_IO"): 1}


def test_two_kinds_are_a_snapshot_the_held_read_reported_without_a_stack() -> None:
    h = peek_harness()
    h.run(5, IO, IN_60)
    h.ioctl(5, GET_LAPIC)
    h.ioctl(5, GET_REGS)  # a second kind: the window is a finding, the held read reported
    assert [(v.ioctl, v.judged_on) for v in h.violations] == [
        ("KVM_GET_LAPIC", "snapshot"), ("KVM_GET_REGS", "ioctl")]
    h.ioctl(5, GET_LAPIC)  # later reads of a finding window are reported at once
    assert h.violations[-1].judged_on == "ioctl"
    h.complete(5)
    [snap] = h.sink.snapshots
    assert snap.ioctls == ["KVM_GET_LAPIC", "KVM_GET_REGS", "KVM_GET_LAPIC"]
    assert _inspections(h) == {}


def test_held_reads_of_one_kind_are_reported_as_many() -> None:
    h = peek_harness()
    h.run(5, IO, IN_60)
    h.ioctl(5, GET_REGS)
    h.ioctl(5, GET_REGS)
    h.ioctl(5, GET_SREGS)
    assert [v.ioctl for v in h.violations] == ["KVM_GET_REGS", "KVM_GET_REGS", "KVM_GET_SREGS"]
    # exact against the kernel's count: every read reached the tracker
    assert h.tracker.unverified() == {}


@pytest.mark.parametrize("restore_vcpu", ["same", "other"])
def test_peek_followed_by_a_restore_in_the_process_is_a_violation(restore_vcpu: str) -> None:
    h = peek_harness()
    h.create_vcpu(fd=6, vcpu_id=1)
    h.run(5, MMIO, MMIO_W)
    h.ioctl(5, GET_REGS)
    h.ioctl(5 if restore_vcpu == "same" else 6, SET_REGS)
    if restore_vcpu == "other":
        assert h.violations == []  # judged when the window closes
    h.complete(5)
    peeks = [v for v in h.violations if v.kind == "save"]
    assert [(v.ioctl, v.judged_on) for v in peeks] == [("KVM_GET_REGS", "restore")]
    restores = [v for v in h.violations if v.kind == "restore"]
    # On the pending vCPU the restore is one itself; on an idle one it is fine by itself.
    assert len(restores) == (1 if restore_vcpu == "same" else 0)
    assert _inspections(h) == {}


def test_restore_elsewhere_then_process_exit_is_a_finding() -> None:
    h = peek_harness()
    h.create_vcpu(fd=6, vcpu_id=1)
    h.run(5, MMIO, MMIO_W)
    h.ioctl(5, GET_REGS)
    h.ioctl(6, SET_REGS)
    h.model.process_exit(PID)
    h.flush()
    [v] = h.violations
    assert (v.ioctl, v.judged_on, v.user_stack) == ("KVM_GET_REGS", "restore", None)
    assert h.tracker.stats.inspections == {}


def test_restore_before_the_peek_does_not_count() -> None:
    h = peek_harness()
    h.ioctl(5, SET_REGS)  # nothing pending: a plain restore
    h.run(5, IO, IN_60)
    h.ioctl(5, GET_REGS)
    h.complete(5)
    assert h.violations == [] and sum(_inspections(h).values()) == 1


def test_a_lost_exit_event_leaves_held_reads_unverified_not_findings() -> None:
    h = peek_harness()
    h.run(5, IO, IN_60)
    h.ioctl(5, GET_REGS)
    h.model.process_exit(PID)
    h.model.drain()  # the ring dropped the exit event
    h.proc.dead.add(PID)
    h.tracker.sweep()
    assert h.violations == [] and h.tracker.stats.inspections == {}
    assert h.tracker.unverified() == {f"guest-{PID}": 1}


def test_vcpu_threads_peeking_their_own_vcpus_at_once_are_inspections() -> None:
    h = peek_harness()
    h.create_vcpu(fd=6, vcpu_id=1, tid=VCPU_TID + 1)
    h.run(5, IO, IN_60)
    h.run(6, IO, IN_60, tid=VCPU_TID + 1)
    h.ioctl(5, GET_REGS)
    h.ioctl(6, GET_REGS, tid=VCPU_TID + 1)
    h.complete(5)
    h.complete(6, tid=VCPU_TID + 1)
    assert h.violations == [] and sum(_inspections(h).values()) == 2


def test_strict_policy_reports_every_peek_at_once() -> None:
    h = Harness(inspection="violation")
    h.create_vcpu(fd=5)
    h.run(5, IO, IN_60)
    h.ioctl(5, GET_REGS)
    [v] = h.violations
    assert v.judged_on == "ioctl"
    h.complete(5)
    assert _inspections(h) == {}


def test_peek_ioctls_come_from_the_policy() -> None:
    h = Harness(inspection="benign", peek_ioctls=["KVM_GET_REGS"])
    h.create_vcpu(fd=5)
    h.run(5, IO, IN_60)
    h.ioctl(5, GET_SREGS)  # not a peek here: a finding at once
    assert [v.ioctl for v in h.violations] == ["KVM_GET_SREGS"]
    h.complete(5)
    h.run(5, IO, IN_60)
    h.ioctl(5, GET_REGS)
    h.complete(5)
    assert len(h.violations) == 1 and sum(_inspections(h).values()) == 1


def test_held_peeks_at_shutdown_are_named_not_counted() -> None:
    h = peek_harness()
    h.run(5, IO, IN_60)
    h.ioctl(5, GET_REGS)
    assert h.tracker.unresolved_held() == 1
    assert h.violations == [] and h.sink.notices[-1][0] == "inspections_unresolved"


# ---- VM names of processes already gone --------------------------------------------------------

def test_a_gone_process_is_named_by_the_comm_the_kernel_saw_not_unknown() -> None:
    h = Harness()
    h.proc.dead.add(PID)
    assert h.tracker.identity(PID, "qemu-system-x86").name == f"qemu-system-x86[{PID}]"
    # a later lookup without a comm keeps that name instead of falling back to unknown[PID]
    assert h.tracker.identity(PID).name == f"qemu-system-x86[{PID}]"
    h.proc.dead.add(PID + 1)
    assert h.tracker.identity(PID + 1).name == f"unknown[{PID + 1}]"  # nothing ever seen


def test_a_live_name_wins_over_a_comm_hint() -> None:
    h = Harness()
    assert h.tracker.identity(PID, "CPU 0/KVM").name == f"guest-{PID}"
