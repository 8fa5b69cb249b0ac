"""Per-vCPU mirror of the probes' state, fed by decoded events; turns them into alerts.

The kernel decides *whether* a save/restore ran while a completion was pending (that needs the
true interleaving of threads). The tracker decides what it means: the policy's ruling, the VM's
name, and the grouping of several saves in one pending window into a snapshot alert. It also
keeps the probes' maps clean (process exit, fds closed by close_range, vCPUs that predate us).

Pure Python: no bcc. The probes are reached through :class:`ProbeControl`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from tracer import abi, vmident
from tracer.alerts import AlertSink, SnapshotAlert, ViolationAlert
from tracer.counters import RunState, VcpuCounters, VmLedger
from tracer.events import (
    EventFlag,
    EventType,
    KernelEvent,
    PendingAccess,
    UserCapture,
    split_exit_aux,
)
from tracer.handover import AdoptState, Relearner
from tracer.midcounts import LostWindow, MidKey, key_of_event
from tracer.policy import CompletionPolicy, Kind, Verdict
from tracer.vmident import DiscoveredVcpu, VmIdentity


class ProbeControl(Protocol):
    """What the tracker needs from the loaded probes (implemented by tracer.probes.Probes)."""

    def adopt_vcpu(self, pid: int, fd: int, vcpu_id: int, run_addr: int | None,
                   uid: int | None = None, start: AdoptState | None = None) -> int | None: ...

    def forget_process(self, pid: int, uids: set[int]) -> dict[int, VcpuCounters]: ...

    def release_vcpus(self, uids: set[int]) -> dict[int, VcpuCounters]: ...

    def forget_fd(self, pid: int, fd: int) -> VcpuCounters | None: ...

    def tracked_fds(self, pid: int) -> dict[int, int]: ...

    def vcpu_states(self) -> list[dict[str, int]]: ...

    def vcpu_comms(self) -> dict[int, str]: ...

    def mid_counts(self) -> dict[MidKey, int]: ...

    def take_mid_counts(self, pid: int) -> dict[MidKey, int]: ...

    def lost_windows(self) -> list[LostWindow]: ...

    def take_lost_window(self, vcpu_uid: int, seq: int) -> LostWindow | None: ...


class StackResolver(Protocol):
    """User stacks of reported ioctls (tracer.daemon.ProbeStacks: the probes' stack map and
    tracer.symbolize). ``remember`` is called while a VMM surely lives (its first vCPU), so a
    stack can still be symbolized after the process is gone."""

    def take(self, stack_id: int) -> list[Any] | None: ...

    def symbolize(self, pid: int, frames: list[Any],
                  capture: UserCapture | None = None) -> dict[str, Any]: ...

    def remember(self, pid: int) -> None: ...

    def index_binary(self, pid: int, path: str) -> None: ...

    def forget(self, pid: int) -> None: ...


class ProcView(Protocol):
    """What the tracker reads from /proc (tracer.vmident; fakes in unit tests)."""

    def identify(self, pid: int) -> VmIdentity: ...

    def resolve_fd(self, pid: int, fd: int) -> int | None: ...

    def run_addr(self, pid: int, vcpu_id: int) -> int | None: ...

    def start_time(self, pid: int) -> int | None:
        """The process's start time (clock ticks since boot), None once it is gone."""

    def alive(self, pid: int, start_time: int) -> bool:
        """Whether ``pid`` is still the process that started at ``start_time``."""


RUN_STATES = tuple(s.name.lower() for s in RunState)  # VcpuRecord.state values, by number


@dataclass
class VcpuRecord:
    """Python's mirror of one vCPU. Exact for fds; the run state is refreshed from the probes'
    map on every sweep and from the events that carry it in between."""

    uid: int
    pid: int
    vcpu_id: int
    fds: set[int] = field(default_factory=set)
    state: str = "idle"  # one of RUN_STATES
    exit_reason: int | None = None  # of the last exit to userspace
    pending_since_ns: int | None = None  # set while a completion is pending
    run_tid: int | None = None  # the thread that last entered KVM_RUN
    window: int = 0

    def pending(self, exit_reason: int, since_ns: int, window: int) -> None:
        self.state, self.exit_reason = "pending", exit_reason
        self.pending_since_ns, self.window = since_ns, window

    def running(self, tid: int) -> None:
        self.state, self.run_tid, self.pending_since_ns = "running", tid, None


@dataclass
class Window:
    """The violations of one pending-completion window of one vCPU."""

    uid: int
    seq: int
    pid: int
    vcpu_id: int
    exit_reason: int
    access: PendingAccess | None
    pending_since_ns: int
    saves: list[str] = field(default_factory=list)
    tids: list[int] = field(default_factory=list)
    last_ts_ns: int = 0
    touched_at: float = 0.0  # tracker clock, for the idle flush
    # Register peeks (policy.peek_ioctls) held until the window shows what they were part of.
    held: list[ViolationAlert] = field(default_factory=list)
    peek_tids: set[int] = field(default_factory=set)
    tainted: str | None = None  # why later peeks of this window are violations at once


@dataclass
class TrackerStats:
    # (vm, kind, ioctl, exit_reason, severity)
    violations: Counter[tuple[str, str, str, str, str]] = field(default_factory=Counter)
    sanctioned: Counter[tuple[str, str]] = field(default_factory=Counter)  # (vm, rule)
    # (vm, ioctl, exit_reason): register peeks completed before anything else touched the vCPU
    inspections: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    snapshots: Counter[str] = field(default_factory=Counter)  # vm
    # Reports of live processes that reached the tracker, under the key the kernel counts them
    # by in mid_counts. The kernel's count minus this is what the ring buffer dropped
    # (tracer.metrics judges those like the others: violations and sanctioned stay exact).
    reported: Counter[MidKey] = field(default_factory=Counter)
    # The same difference for processes gone (folded at their exit): (vm, key with pid 0).
    unseen: Counter[tuple[str, MidKey]] = field(default_factory=Counter)
    # Snapshots counted from the kernel's lost_windows that the tracker alone would have missed
    snapshots_from_kernel: int = 0
    not_pending: int = 0
    malformed_events: int = 0
    internal_errors: int = 0


CLOSED_BY_FLAGS = {True: "immediate_exit", False: "reentry"}
# Bound of Tracker._counted: far more windows than can be open at once.
MAX_COUNTED_WINDOWS = 65536
COMPLETED_BY = frozenset(CLOSED_BY_FLAGS.values())


class Tracker:
    def __init__(self, policy: CompletionPolicy, sink: AlertSink, proc: ProcView,
                 control: ProbeControl | None = None, snapshot_idle_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 stacks: StackResolver | None = None) -> None:
        self.policy = policy
        self.stacks = stacks
        self.sink = sink
        self.proc = proc
        self.control = control
        self.snapshot_idle_s = snapshot_idle_s
        self.clock = clock
        self.vcpus: dict[int, VcpuRecord] = {}
        self.windows: dict[tuple[int, int], Window] = {}
        self.stats = TrackerStats()
        self.ledger = VmLedger()  # statistics of vCPUs that are gone, per VM name
        self._names: dict[int, VmIdentity] = {}
        self._started: dict[int, int | None] = {}  # pid -> start time when first seen
        self._rescan: set[int] = set()
        # Windows whose snapshot was counted and that may show again ((vcpu uid, seq), oldest
        # first): never counted twice when the kernel's lost_windows and the tracker's own
        # window both hold it, or a window flushed idle gets more saves. Only windows that
        # lost events or went idle are kept, so it stays empty in normal operation.
        self._counted: dict[tuple[int, int], None] = {}

    # ---- naming --------------------------------------------------------------------------------
    def identity(self, pid: int, comm_hint: str = "") -> VmIdentity:
        """The VM's name, resolved from /proc once and kept while the process lives. A process
        already gone is ``<comm>[<pid>]`` with the comm the kernel saw (``comm_hint``: an
        event's, or the vCPU entry's from its creation), not ``unknown[<pid>]``."""
        known = self._names.get(pid)
        if known is not None and known.source != vmident.SOURCE_UNAVAILABLE:
            return known
        ident = self.proc.identify(pid)
        if ident.source == vmident.SOURCE_UNAVAILABLE:
            if comm_hint:
                ident = vmident.unavailable_identity(pid, comm_hint)
            elif known is not None:
                return known  # the name a probe's comm gave earlier beats unknown[PID]
        self._names[pid] = ident
        self.ledger.mark_alive(ident.name)
        return ident

    # ---- events --------------------------------------------------------------------------------
    def handle(self, ev: KernelEvent) -> None:
        handler = _HANDLERS.get(ev.type)
        if handler is not None:
            handler(self, ev)

    def _track(self, uid: int, pid: int, vcpu_id: int) -> VcpuRecord:
        if pid not in self._started:
            self._started[pid] = self.proc.start_time(pid)
            if self.stacks is not None:
                self.stacks.remember(pid)
        return self.vcpus.setdefault(uid, VcpuRecord(uid, pid, vcpu_id))

    def _on_created(self, ev: KernelEvent) -> None:
        self._track(ev.vcpu_uid, ev.tgid, ev.vcpu_id).fds.add(ev.fd)
        ident = self.identity(ev.tgid, ev.comm)
        self.sink.notice("vcpu_created", "debug", pid=ev.tgid, vm=ident.name, vcpu_id=ev.vcpu_id,
                         vcpu_fd=ev.fd, vm_fd=ev.aux)

    def _on_dup(self, ev: KernelEvent) -> None:
        rec = self.vcpus.get(ev.vcpu_uid)
        if rec is not None:
            rec.fds.add(ev.fd)

    def _on_fd_closed(self, ev: KernelEvent) -> None:
        rec = self.vcpus.get(ev.vcpu_uid)
        if ev.aux == 0 and self.control is not None:
            # The vCPU's last fd: the probes keep its entry (closed) until its counts are read.
            self._retire(ev.tgid, self.control.release_vcpus({ev.vcpu_uid}))
        if rec is None:
            return
        rec.fds.discard(ev.fd)
        if ev.aux == 0:  # nothing can reach this vCPU any more
            self._drop_vcpu(ev.vcpu_uid, "vcpu_closed")
            self.sink.notice("vcpu_closed", "debug", pid=ev.tgid, vcpu_id=ev.vcpu_id)

    def _drop_vcpu(self, uid: int, closed_by: str) -> None:
        self._close_windows(lambda w: w.uid == uid, closed_by)
        self.vcpus.pop(uid, None)

    def _retire(self, pid: int, released: dict[int, VcpuCounters], comm_hint: str = "") -> None:
        if released:
            vm = self.identity(pid, comm_hint).name
            for counters in released.values():
                self.ledger.retire(vm, counters)

    def _fold_mid_counts(self, pid: int, counted: dict[MidKey, int]) -> None:
        """A gone process: what the kernel counted and the tracker never saw stays counted,
        under the VM's name; its live keys go."""
        seen = {k: n for k, n in self.stats.reported.items() if k.pid == pid}
        for key in seen:
            del self.stats.reported[key]
        if not counted:
            return
        vm = self.identity(pid).name
        for key, n in counted.items():
            missed = n - seen.get(key, 0)
            if missed > 0:
                self.stats.unseen[(vm, key._replace(pid=0))] += missed

    def _on_process_exit(self, ev: KernelEvent) -> None:
        self._forget_process(ev.tgid)

    def _forget_process(self, pid: int) -> None:
        self._close_windows(lambda w: w.pid == pid, "process_exit")
        uids = {uid for uid, rec in self.vcpus.items() if rec.pid == pid}
        for uid in uids:
            del self.vcpus[uid]
        if self.control is not None:
            self._retire(pid, self.control.forget_process(pid, uids))
            self._fold_mid_counts(pid, self.control.take_mid_counts(pid))
            self._count_lost_windows(lambda lw: lw.pid == pid)
        for key in [k for k in self._counted if k[0] in uids]:
            del self._counted[key]
        if self.stacks is not None:
            self.stacks.forget(pid)
        ident = self._names.pop(pid, None)
        if ident is not None and not any(i.name == ident.name for i in self._names.values()):
            self.ledger.mark_gone(ident.name, self.clock())
        self._started.pop(pid, None)
        self._rescan.discard(pid)
        if uids:
            self.sink.notice("process_exit", "debug", pid=pid, vcpus=len(uids))

    def _on_window_closed(self, ev: KernelEvent) -> None:
        rec = self.vcpus.get(ev.vcpu_uid)
        if rec is not None:
            rec.running(ev.tid)
        closed_by = CLOSED_BY_FLAGS[bool(ev.flags & EventFlag.IMMEDIATE_EXIT)]
        self._close_windows(lambda w: w.uid == ev.vcpu_uid and w.seq == ev.seq, closed_by)

    def _on_unknown_fd(self, ev: KernelEvent) -> None:
        """A vCPU ioctl on an fd we never saw created: a VM older than us, or an fd passed in."""
        vcpu_id = self.proc.resolve_fd(ev.tgid, ev.fd)
        if vcpu_id is None or self.control is None:
            return
        same = [r for r in self.vcpus.values() if r.pid == ev.tgid and r.vcpu_id == vcpu_id]
        uid = self.control.adopt_vcpu(ev.tgid, ev.fd, vcpu_id,
                                      self.proc.run_addr(ev.tgid, vcpu_id),
                                      same[0].uid if len(same) == 1 else None)
        if uid is None:
            return
        self._track(uid, ev.tgid, vcpu_id).fds.add(ev.fd)
        self.sink.notice("vcpu_adopted", "info", pid=ev.tgid, vm=self.identity(ev.tgid).name,
                         vcpu_id=vcpu_id, vcpu_fd=ev.fd,
                         why=f"{abi.ioctl_name(ev.aux)} on an fd created before the probes")

    def _on_exec(self, ev: KernelEvent) -> None:
        """watch: a process of the tree runs a new binary; index it while it is there."""
        if self.stacks is not None and ev.path:
            self.stacks.index_binary(ev.tgid, ev.path)

    def _on_quirks(self, ev: KernelEvent) -> None:
        self.sink.notice("quirks_disabled", "info", pid=ev.tgid, vm=self.identity(ev.tgid).name,
                         quirks=f"0x{ev.aux:x}",
                         out_7e_inc_rip=bool(ev.aux & abi.KVM_X86_QUIRK_OUT_7E_INC_RIP))

    def _on_fd_range_closed(self, ev: KernelEvent) -> None:
        self._rescan.add(ev.tgid)  # after close_range returns: checked on the next tick

    def _on_trace(self, ev: KernelEvent) -> None:
        """--trace-exits: every re-entry, exit and clean state ioctl, at debug level."""
        fields: dict[str, object] = {"pid": ev.tgid, "tid": ev.tid, "vcpu_id": ev.vcpu_id,
                                     "window": ev.seq}
        rec = self.vcpus.get(ev.vcpu_uid)
        if ev.type is EventType.USERSPACE_EXIT:
            reason, errno = split_exit_aux(ev.aux)
            fields.update(exit_reason=abi.exit_reason_name(reason), errno=errno)
            if rec is not None:
                if errno == 0 and self.policy.leaves_pending(reason):
                    rec.pending(reason, ev.ts_ns, ev.seq)
                else:
                    rec.state, rec.pending_since_ns = "idle", None
                    rec.exit_reason = reason if errno == 0 else rec.exit_reason
        elif ev.type is EventType.RUN_ENTER:
            if rec is not None:
                rec.running(ev.tid)
            fields.update(vcpu_fd=ev.fd,
                          immediate_exit=bool(ev.flags & EventFlag.IMMEDIATE_EXIT))
        else:
            fields.update(vcpu_fd=ev.fd, ioctl=abi.ioctl_name(ev.cmd))
        self.sink.notice(f"trace_{ev.type.name.lower()}", "debug", **fields)

    def _on_violation(self, ev: KernelEvent) -> None:
        self.stats.reported[key_of_event(ev)] += 1
        rec = self.vcpus.get(ev.vcpu_uid)
        if rec is not None:
            rec.pending(ev.exit_reason, ev.pending_since_ns, ev.seq)
        # Taken whatever the verdict: it frees the stack's bucket in the probes' map.
        addresses = (self.stacks.take(ev.stack_id)
                     if self.stacks is not None and ev.stack_id >= 0 else None)
        ioctl = abi.IOCTLS.get(ev.cmd)
        if ioctl is None or ioctl.kind not in (abi.IoctlKind.SAVE, abi.IoctlKind.RESTORE):
            return
        kind = Kind.SAVE if ioctl.kind is abi.IoctlKind.SAVE else Kind.RESTORE
        ruling = self.policy.judge(kind, ev.exit_reason, ev.access,
                                   bool(ev.flags & EventFlag.QUIRK_7E_DISABLED), ioctl.name)
        if ruling.verdict is Verdict.NOT_PENDING:
            self.stats.not_pending += 1
            return
        ident = self.identity(ev.tgid, ev.comm)
        alert = ViolationAlert(
            pid=ev.tgid, tid=ev.tid, comm=ev.comm, vm=ident.name, vmm=ident.vmm,
            vcpu_id=ev.vcpu_id, vcpu_fd=ev.fd, exit_reason=abi.exit_reason_name(ev.exit_reason),
            access=ev.access.describe() if ev.access else {}, ioctl=ioctl.name, kind=kind.value,
            pending_ns=ev.pending_ns, rule=ruling.rule, severity=ruling.severity.value,
            reason=ruling.reason,
            detected_at="ioctl_return" if ev.flags & EventFlag.AT_RETURN else "ioctl_entry",
            window=ev.seq, sanctioned=ruling.verdict is Verdict.SANCTIONED)
        if alert.sanctioned:
            self.stats.sanctioned[(ident.name, ruling.rule)] += 1
            self.sink.sanctioned(alert)
            return
        if (addresses is not None or ev.capture is not None) and self.stacks is not None:
            alert = replace(alert, user_stack=self.stacks.symbolize(ev.tgid, addresses or [],
                                                                    ev.capture))
        if kind is Kind.RESTORE:
            # State written in the process: every peek it holds was read to be restored.
            self._release_held(lambda w: w.pid == ev.tgid, "restore")
            self._report(alert)
            return
        window = self._window(ev)
        # One thread reading several vCPUs' state is saving the VM, not decoding a request.
        crossed = [w for w in self.windows.values()
                   if w.pid == ev.tgid and w.uid != ev.vcpu_uid and ev.tid in w.peek_tids]
        for other in crossed:
            self._release(other, "second_vcpu")
        if crossed:
            window.tainted = window.tainted or "second_vcpu"
        if self.policy.is_peek(ioctl.name):
            if window.tainted is None:
                window.held.append(alert)  # judged when the window shows what it was
                window.peek_tids.add(ev.tid)
                window.touched_at = self.clock()
                return
            alert = replace(alert, judged_on=window.tainted)
        else:
            self._release(window, "snapshot")  # more than the registers: a snapshot
            window.tainted = window.tainted or "snapshot"
        self._report(alert)
        self._add_save(window, alert, ev.ts_ns)

    def _on_state_ioctl(self, ev: KernelEvent) -> None:
        """A save or restore with nothing pending on its vCPU, sent while the process has a
        window with reports open (and for every state ioctl with --trace-exits): it may tell
        what a held register peek was part of."""
        ioctl = abi.IOCTLS.get(ev.cmd)
        if ioctl is not None and any(w.held for w in self.windows.values()
                                     if w.pid == ev.tgid):
            if ioctl.kind is abi.IoctlKind.RESTORE:
                self._release_held(lambda w: w.pid == ev.tgid, "restore")
            elif ioctl.kind is abi.IoctlKind.SAVE:
                self._release_held(lambda w: w.pid == ev.tgid and w.uid != ev.vcpu_uid
                                   and ev.tid in w.peek_tids, "second_vcpu")
        if not ev.flags & EventFlag.WINDOW_OPEN:  # sent for --trace-exits
            self._on_trace(ev)

    def _window(self, ev: KernelEvent) -> Window:
        key = (ev.vcpu_uid, ev.seq)
        window = self.windows.get(key)
        if window is None:
            window = Window(ev.vcpu_uid, ev.seq, ev.tgid, ev.vcpu_id, ev.exit_reason, ev.access,
                            ev.pending_since_ns)
            self.windows[key] = window
        return window

    def _report(self, alert: ViolationAlert) -> None:
        self.stats.violations[(alert.vm, alert.kind, alert.ioctl, alert.exit_reason,
                               alert.severity)] += 1
        self.sink.violation(alert)

    def _add_save(self, window: Window, alert: ViolationAlert, ts_ns: int) -> None:
        window.touched_at = self.clock()
        window.saves.append(alert.ioctl)
        if alert.tid not in window.tids:
            window.tids.append(alert.tid)
        window.last_ts_ns = max(window.last_ts_ns, window.pending_since_ns + alert.pending_ns,
                                ts_ns)

    def _release_held(self, match: Callable[[Window], bool], judged_on: str) -> None:
        """The held peeks of the matching open windows turn out to be part of a snapshot, a
        restore or a VM-wide save: report them now, as violations."""
        for window in [w for w in self.windows.values() if w.held and match(w)]:
            self._release(window, judged_on)

    def _release(self, window: Window, judged_on: str) -> None:
        if window.held:
            held, window.held = window.held, []
            window.tainted = window.tainted or judged_on
            for alert in held:
                alert = replace(alert, judged_on=judged_on)
                self._report(alert)
                self._add_save(window, alert, 0)

    def _inspected(self, window: Window, closed_by: str) -> None:
        """The window closed by completion with only register peeks in it: inspections."""
        for alert in window.held:
            self.stats.inspections[(alert.vm, alert.ioctl, alert.exit_reason)] += 1
            self.sink.inspection(replace(
                alert, rule="register-peek", severity="info", judged_on=closed_by,
                reason=f"{alert.ioctl} read vCPU state while {alert.exit_reason} was pending, "
                       f"then the exit was completed ({closed_by}) with no other state read "
                       "or written in between: the state read was not kept, so nothing is "
                       "replayed or lost"))
        window.held = []

    # ---- windows -------------------------------------------------------------------------------
    def _close_windows(self, match: Callable[[Window], bool], closed_by: str) -> None:
        for key in [k for k, w in self.windows.items() if match(w)]:
            window = self.windows.pop(key)
            lost = (self.control.take_lost_window(window.uid, window.seq)
                    if self.control is not None else None)
            if window.held:
                if lost is not None:  # more was read or written in it: the ring dropped it
                    self._release(window, "events_lost")
                elif closed_by in COMPLETED_BY:
                    self._inspected(window, closed_by)
                else:  # abandoned, or pending past the idle time: still a violation
                    self._release(window, closed_by)
            saves = len(window.saves)
            if lost is not None:
                saves = max(saves, self._lost_saves(lost))
            if saves >= 2 and key not in self._counted:
                if lost is not None or closed_by == "idle":
                    # Its events may still come (in flight, or the window was only idle):
                    # remembered so it is never counted twice. A window the kernel closed
                    # with nothing lost gets no more events.
                    self._count_snapshot(key)
                if len(window.saves) < 2:
                    self.stats.snapshots_from_kernel += 1
                ident = self.identity(window.pid)
                exit_name = abi.exit_reason_name(window.exit_reason)
                self.stats.snapshots[ident.name] += 1
                self.sink.snapshot(SnapshotAlert(
                    pid=window.pid, vm=ident.name, vmm=ident.vmm, vcpu_id=window.vcpu_id,
                    exit_reason=exit_name,
                    access=window.access.describe() if window.access else {},
                    ioctls=window.saves, tids=window.tids, window=window.seq,
                    pending_ns=max(0, window.last_ts_ns - window.pending_since_ns),
                    closed_by=closed_by, events_lost=lost is not None,
                    reason=f"{saves} state reads while {exit_name} was pending: a "
                           "snapshot taken mid-completion replays or loses that operation when "
                           "restored"))

    def _count_snapshot(self, key: tuple[int, int]) -> None:
        self._counted[key] = None
        while len(self._counted) > MAX_COUNTED_WINDOWS:
            del self._counted[next(iter(self._counted))]

    def _lost_saves(self, lost: LostWindow) -> int:
        """The saves of a window that lost events, as far as they are violations: none when
        the policy sanctions a save in that window (port 0x7e) or nothing is pending."""
        ruling = self.policy.judge(Kind.SAVE, lost.exit_reason, lost.access(),
                                   lost.quirk_7e_disabled, "KVM_GET_REGS")
        return lost.saves if ruling.verdict is Verdict.VIOLATION else 0

    def _count_lost_windows(self, match: Callable[[LostWindow], bool]) -> None:
        """Windows that lost events and that the tracker holds no window for (it never saw
        them, or only what it does not keep): counted from the kernel's lost_windows."""
        if self.control is None:
            return
        for lw in self.control.lost_windows():
            if lw.key in self.windows or not match(lw):
                continue
            taken = self.control.take_lost_window(lw.vcpu_uid, lw.seq)
            if taken is None:
                continue
            saves = self._lost_saves(taken)
            if saves < 2 or taken.key in self._counted:
                continue
            self._count_snapshot(taken.key)
            self.stats.snapshots_from_kernel += 1
            ident = self.identity(taken.pid)
            exit_name = abi.exit_reason_name(taken.exit_reason)
            access = taken.access()
            self.stats.snapshots[ident.name] += 1
            self.sink.snapshot(SnapshotAlert(
                pid=taken.pid, vm=ident.name, vmm=ident.vmm, vcpu_id=taken.vcpu_id,
                exit_reason=exit_name, access=access.describe() if access else {},
                ioctls=[], tids=[], window=taken.seq, pending_ns=0, closed_by="events_lost",
                events_lost=True,
                reason=f"{saves} state reads while {exit_name} was pending (counted in the "
                       "kernel; the ring buffer dropped their events): a snapshot taken "
                       "mid-completion replays or loses that operation when restored"))

    def close_all(self, closed_by: str) -> None:
        """Every open window, judged now (``watch`` at the end of its command): held peeks of
        processes still alive stay unresolved (see :meth:`flush_held`)."""
        open_keys = {k for k, w in self.windows.items() if not w.held}
        self._close_windows(lambda w: (w.uid, w.seq) in open_keys, closed_by)
        self._count_lost_windows(lambda lw: True)

    def flush_held(self) -> int:
        """At shutdown: peeks whose window is still open cannot be judged; say how many."""
        held = sum(len(w.held) for w in self.windows.values())
        if held:
            self.sink.notice("inspections_unresolved", "info", peeks=held,
                             why="their windows were still open when the tracer stopped")
        return held

    # ---- housekeeping --------------------------------------------------------------------------
    def tick(self) -> None:
        """Flush idle windows, reconcile fds after close_range, drop processes that are gone."""
        now = self.clock()
        self._close_windows(lambda w: now - w.touched_at >= self.snapshot_idle_s, "idle")
        for pid in list(self._rescan):
            self._rescan.discard(pid)
            self._reconcile_fds(pid)

    def sweep(self) -> None:
        """Slow path (every few seconds): processes whose exit event was lost (gone, or the pid
        now belongs to a newer process), and the run state refreshed from the probes' map."""
        for pid in {rec.pid for rec in self.vcpus.values()}:
            started = self._started.get(pid)
            if started is None or not self.proc.alive(pid, started):
                self._forget_process(pid)
        if self.control is not None:
            states = self.control.vcpu_states()
            self.sync(states, self.control.vcpu_comms())
            # A lost window is counted here once the kernel has closed it (a new window, or
            # the vCPU gone): until then its events may still be on their way.
            open_now = {(st["uid"], st["seq"]) for st in states
                        if st["state"] == RunState.PENDING}
            self._count_lost_windows(lambda lw: lw.key not in open_now)

    def sync(self, states: Iterable[dict[str, int]], comms: dict[int, str] | None = None) -> None:
        closed: dict[int, set[int]] = {}  # pid -> uids whose close event was lost
        for st in states:
            if st["state"] == RunState.CLOSED:
                closed.setdefault(st["pid"], set()).add(st["uid"])
                continue
            rec = self.vcpus.get(st["uid"])
            if rec is None:
                continue
            rec.state = RUN_STATES[st["state"]] if st["state"] < len(RUN_STATES) else "idle"
            rec.exit_reason = st["exit_reason"]
            rec.run_tid = st["run_tid"] or None
            rec.window = st["seq"]
            rec.pending_since_ns = st["pending_since_ns"] if rec.state == "pending" else None
        for pid, uids in closed.items():
            if self.control is not None:
                self._retire(pid, self.control.release_vcpus(uids), (comms or {}).get(pid, ""))
            for uid in uids:
                if uid in self.vcpus:
                    self._drop_vcpu(uid, "vcpu_closed")

    def prune_gone(self, retain_s: float) -> list[str]:
        """Forget the counts of VMs gone for ``retain_s`` (bounded memory over months of VM
        churn; Prometheus has scraped their last values by then). Returns their names."""
        expired = [vm for vm in self.ledger.expired(self.clock(), retain_s)
                   if not any(i.name == vm for i in self._names.values())]
        for vm in expired:
            self.ledger.drop(vm)
            self.stats.snapshots.pop(vm, None)
            for key in [k for k in self.stats.violations if k[0] == vm]:
                del self.stats.violations[key]
            for skey in [k for k in self.stats.sanctioned if k[0] == vm]:
                del self.stats.sanctioned[skey]
            for ikey in [k for k in self.stats.inspections if k[0] == vm]:
                del self.stats.inspections[ikey]
            for ukey in [k for k in self.stats.unseen if k[0] == vm]:
                del self.stats.unseen[ukey]
        return expired

    def pending_vcpus(self) -> list[VcpuRecord]:
        return [rec for rec in self.vcpus.values() if rec.state == "pending"]

    def _reconcile_fds(self, pid: int) -> None:
        if self.control is None:
            return
        for fd, uid in self.control.tracked_fds(pid).items():
            if self.proc.resolve_fd(pid, fd) is None:
                released = self.control.forget_fd(pid, fd)
                if released is not None:
                    self._retire(pid, {uid: released})
                rec = self.vcpus.get(uid)
                if rec is not None:
                    rec.fds.discard(fd)
                    if not rec.fds:
                        self._drop_vcpu(uid, "vcpu_closed")

    def adopt_existing(self, found: Iterable[DiscoveredVcpu],
                       relearner: Relearner | None = None) -> int:
        """vCPUs that were running before the probes attached (from a /proc scan), starting
        in the state ``relearner`` re-learns for them (tracer.handover), else idle."""
        if self.control is None:
            return 0
        adopted = 0
        uid_of: dict[tuple[int, int], int] = {}
        for vcpu in found:
            key = (vcpu.pid, vcpu.vcpu_id)
            start = None
            if relearner is not None and key not in uid_of:
                if vcpu.pid not in self._started:  # read once per process (and kept)
                    self._started[vcpu.pid] = self.proc.start_time(vcpu.pid)
                start = relearner.state_of(vcpu.pid, vcpu.fd, vcpu.vcpu_id, vcpu.run_addr,
                                           self._started[vcpu.pid])
            uid = self.control.adopt_vcpu(vcpu.pid, vcpu.fd, vcpu.vcpu_id, vcpu.run_addr,
                                          uid_of.get(key), start)
            if uid is None:
                continue  # created after the probes attached: the kernel tracks it already
            uid_of[key] = uid
            rec = self._track(uid, vcpu.pid, vcpu.vcpu_id)
            rec.fds.add(vcpu.fd)
            if start is not None and start.state:
                rec.state = RUN_STATES[start.state]
                rec.run_tid = start.run_tid or None
                if start.state == RunState.PENDING:
                    rec.pending(start.exit_reason, start.pending_since_ns, 1)
            adopted += 1
        return adopted


_HANDLERS: dict[EventType, Callable[[Tracker, KernelEvent], None]] = {
    EventType.VIOLATION: Tracker._on_violation,
    EventType.VCPU_CREATED: Tracker._on_created,
    EventType.VCPU_FD_DUP: Tracker._on_dup,
    EventType.VCPU_FD_CLOSED: Tracker._on_fd_closed,
    EventType.PROCESS_EXIT: Tracker._on_process_exit,
    EventType.WINDOW_CLOSED: Tracker._on_window_closed,
    EventType.UNKNOWN_FD: Tracker._on_unknown_fd,
    EventType.QUIRKS_DISABLED: Tracker._on_quirks,
    EventType.FD_RANGE_CLOSED: Tracker._on_fd_range_closed,
    EventType.RUN_ENTER: Tracker._on_trace,
    EventType.USERSPACE_EXIT: Tracker._on_trace,
    EventType.STATE_IOCTL: Tracker._on_state_ioctl,
    EventType.EXEC: Tracker._on_exec,
}
