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
from dataclasses import dataclass, field
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
from tracer.windows import HeldRead, InspectionKey, judge_at_exit, split_held_aux


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

    def inspections(self) -> dict[InspectionKey, int]: ...

    def take_inspections(self, pid: int) -> dict[InspectionKey, int]: ...

    def held_reads(self, pid: int) -> list[HeldRead]: ...


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


@dataclass
class TrackerStats:
    # (vm, kind, ioctl, exit_reason, severity)
    violations: Counter[tuple[str, str, str, str, str]] = field(default_factory=Counter)
    sanctioned: Counter[tuple[str, str]] = field(default_factory=Counter)  # (vm, rule)
    # (vm, ioctl, exit_reason): lone reads of one kind, no restore (tracer.windows), of gone
    # processes and judged at their exit; the live ones are in the kernel's `inspections` map
    inspections: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    # vm -> reads held in windows whose process's exit event was lost: not judged
    unverified_held: Counter[str] = field(default_factory=Counter)
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
# Names of processes already forgotten, for their events still in the ring buffer (a stalled
# reader): the same name, not a second one from a thread's comm. Oldest dropped first.
MAX_GONE_NAMES = 4096


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
        self._gone_names: dict[int, VmIdentity] = {}  # pid -> name, oldest first
        self._started: dict[int, int | None] = {}  # pid -> start time when first seen
        self._rescan: set[int] = set()
        # Windows whose snapshot was counted and that may show again ((vcpu uid, seq), oldest
        # first): never counted twice when the kernel's lost_windows and the tracker's own
        # window both hold it, or a window flushed idle gets more saves. Only windows that
        # lost events or went idle are kept, so it stays empty in normal operation.
        self._counted: dict[tuple[int, int], None] = {}

    # ---- naming --------------------------------------------------------------------------------
    def identity(self, pid: int, comm_hint: str = "") -> VmIdentity:
        """The VM's name: the one naming function of alerts and of every metric family.

        Resolved from /proc once and kept while the process lives. A process already gone is
        ``<comm>[<pid>]``: the comm the kernel kept in its vCPU entry at creation, else
        ``comm_hint`` (an event's comm), else ``unknown[<pid>]``. Once given, a name is not
        changed by a later comm (one name per process in every family, whichever path named
        it first), nor after the process is forgotten (its late events keep it); a pid that
        is alive again is a new process and gets its own name."""
        known = self._names.get(pid)
        if known is not None and known.source != vmident.SOURCE_UNAVAILABLE:
            return known
        ident = self.proc.identify(pid)
        if ident.source == vmident.SOURCE_UNAVAILABLE:
            if known is not None:
                return known
            gone = self._gone_names.get(pid)
            if gone is not None:
                return gone
            ident = vmident.unavailable_identity(pid, self._kernel_comm(pid) or comm_hint)
        self._names[pid] = ident
        self._gone_names.pop(pid, None)
        self.ledger.mark_alive(ident.name)
        return ident

    def _kernel_comm(self, pid: int) -> str:
        """The comm the kernel kept at the creation of one of ``pid``'s vCPUs (a map read: only
        when a gone process is named for the first time)."""
        return self.control.vcpu_comms().get(pid, "") if self.control is not None else ""

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
        held = bool(ev.flags & EventFlag.HELD)
        self._forget_process(ev.tgid, ev.aux if held else None, judge_held=held,
                             comm_hint=ev.comm)

    def _forget_process(self, pid: int, final_gen: int | None = None,
                        judge_held: bool = True, comm_hint: str = "") -> None:
        """``final_gen``: the process's restore generation at its exit (its exit event's), None
        when that event was lost; ``judge_held``: whether its windows may hold reads."""
        # Named before its vCPU entries (and the comm the kernel kept in them) are released:
        # the snapshots, retired counters and lost counts below all go under this name.
        self.identity(pid, comm_hint)
        self._close_windows(lambda w: w.pid == pid, "process_exit")
        uids = {uid for uid, rec in self.vcpus.items() if rec.pid == pid}
        for uid in uids:
            del self.vcpus[uid]
        if self.control is not None:
            inspected: Counter[tuple[str, str]] = Counter()
            if judge_held:
                for held in self.control.held_reads(pid):
                    self._judge_held(held, final_gen, inspected)
            self._retire(pid, self.control.forget_process(pid, uids))
            self._fold_mid_counts(pid, self.control.take_mid_counts(pid))
            self._fold_inspections(pid, self.control.take_inspections(pid), inspected)
            self._count_lost_windows(lambda lw: lw.pid == pid)
        for key in [k for k in self._counted if k[0] in uids]:
            del self._counted[key]
        if self.stacks is not None:
            self.stacks.forget(pid)
        ident = self._names.pop(pid, None)
        if ident is not None:
            self._gone_names[pid] = ident
            while len(self._gone_names) > MAX_GONE_NAMES:
                del self._gone_names[next(iter(self._gone_names))]
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
        """The binary a process runs (watch: at its exec; run: at its first vCPU): indexed
        while it is there, for the stacks of a process gone before its /proc was read."""
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
        why, reads = (split_held_aux(ev.aux) if ev.flags & EventFlag.HELD else (None, 1))
        self.stats.reported[key_of_event(ev)] += reads
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
            self.stats.not_pending += reads
            return
        ident = self.identity(ev.tgid, ev.comm)
        sanctioned = ruling.verdict is Verdict.SANCTIONED
        # Symbolized once per distinct kernel stack (tracer.daemon.ProbeStacks caches those);
        # a captured user stack (registers and stack bytes) is unwound each time.
        user_stack = (self.stacks.symbolize(ev.tgid, addresses or [], ev.capture)
                      if (addresses is not None or ev.capture is not None)
                      and self.stacks is not None and not sanctioned else None)
        alert = ViolationAlert(
            pid=ev.tgid, tid=ev.tid, comm=ev.comm, vm=ident.name, vmm=ident.vmm,
            vcpu_id=ev.vcpu_id, vcpu_fd=ev.fd, exit_reason=abi.exit_reason_name(ev.exit_reason),
            access=ev.access.describe() if ev.access else {}, ioctl=ioctl.name, kind=kind.value,
            pending_ns=ev.pending_ns, rule=ruling.rule, severity=ruling.severity.value,
            reason=ruling.reason,
            detected_at="ioctl_return" if ev.flags & EventFlag.AT_RETURN else "ioctl_entry",
            window=ev.seq, sanctioned=sanctioned,
            judged_on=why.judged_on if why is not None else "ioctl", user_stack=user_stack)
        if sanctioned:
            self.stats.sanctioned[(ident.name, ruling.rule)] += reads
            for _ in range(reads):
                self.sink.sanctioned(alert)
            return
        for _ in range(reads):
            self._report(alert)
        if kind is Kind.SAVE:
            window = self._window(ev)
            for _ in range(reads):
                self._add_save(window, alert, ev.ts_ns)

    def _on_state_ioctl(self, ev: KernelEvent) -> None:
        """--trace-exits: a save or restore with nothing pending on its vCPU."""
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

    def _judge_held(self, held: HeldRead, final_gen: int | None,
                    inspected: Counter[tuple[str, str]]) -> None:
        """A window still holding a read when its process ended (tracer.windows): an
        inspection, a restore finding (reported without a stack: the kernel takes none for a
        held read), or unverified when the exit event that tells was lost."""
        ident = self.identity(held.pid)
        ioctl = abi.ioctl_name(held.cmd)
        exit_name = abi.exit_reason_name(held.exit_reason)
        verdict = judge_at_exit(held, final_gen)
        if verdict == "inspection":
            inspected[(ioctl, exit_name)] += held.reads
            return
        if verdict == "unverified":
            self.stats.unverified_held[ident.name] += held.reads
            return
        # The access is gone with the process; the quirk too: judged as a plain save.
        ruling = self.policy.judge(Kind.SAVE, held.exit_reason, None, False, ioctl)
        if ruling.verdict is not Verdict.VIOLATION:
            return
        alert = ViolationAlert(
            pid=held.pid, tid=held.tid, comm="", vm=ident.name, vmm=ident.vmm,
            vcpu_id=held.vcpu_id, vcpu_fd=held.fd, exit_reason=exit_name, access={},
            ioctl=ioctl, kind=Kind.SAVE.value,
            pending_ns=max(0, held.ts_ns - held.pending_since_ns), rule=ruling.rule,
            severity=ruling.severity.value, reason=ruling.reason, detected_at="ioctl_entry",
            window=held.seq, judged_on="restore")
        for _ in range(held.reads):
            self._report(alert)

    def _fold_inspections(self, pid: int, counted: dict[InspectionKey, int],
                          inspected: Counter[tuple[str, str]]) -> None:
        """A gone process's inspections (the kernel's, and those judged at its exit) into
        the VM's totals, and one debug notice with them (selftest compares it per process)."""
        for key, n in counted.items():
            inspected[(abi.ioctl_name(key.cmd), abi.exit_reason_name(key.exit_reason))] += n
        if not inspected:
            return
        vm = self.identity(pid).name
        for (ioctl, exit_name), n in inspected.items():
            self.stats.inspections[(vm, ioctl, exit_name)] += n
        self.sink.notice("inspections", "debug", pid=pid, vm=vm, counts=[
            {"ioctl": ioctl, "exit_reason": exit_name, "count": n}
            for (ioctl, exit_name), n in sorted(inspected.items())])

    def inspection_counts(self) -> Counter[tuple[str, str, str]]:
        """kvm_completion_inspections_total: gone processes' and the kernel's live counts."""
        out = Counter(self.stats.inspections)
        if self.control is not None:
            for key, n in self.control.inspections().items():
                out[(self.identity(key.pid).name, abi.ioctl_name(key.cmd),
                     abi.exit_reason_name(key.exit_reason))] += n
        return out

    def unverified(self) -> Counter[str]:
        """Findings the kernel counted whose report never reached the tracker (the ring buffer
        dropped it), and reads whose window could not be judged, by VM name (a test VMM's is
        comm[pid]): no call site, no detail, only that they happened."""
        missed: Counter[tuple[str, MidKey]] = Counter(self.stats.unseen)
        if self.control is not None:
            for key, n in self.control.mid_counts().items():
                d = n - self.stats.reported.get(key, 0)
                if d > 0:
                    missed[(self.identity(key.pid).name, key._replace(pid=0))] += d
        out = Counter(self.stats.unverified_held)
        for (vm, key), n in missed.items():
            ioctl = abi.IOCTLS.get(key.cmd)
            if ioctl is None or ioctl.kind not in (abi.IoctlKind.SAVE, abi.IoctlKind.RESTORE):
                continue
            kind = Kind.SAVE if ioctl.kind is abi.IoctlKind.SAVE else Kind.RESTORE
            ruling = self.policy.judge(kind, key.exit_reason, key.access(),
                                       key.quirk_7e_disabled, ioctl.name)
            if ruling.verdict is Verdict.VIOLATION:
                out[vm] += n
        return out

    # ---- windows -------------------------------------------------------------------------------
    def _close_windows(self, match: Callable[[Window], bool], closed_by: str) -> None:
        for key in [k for k, w in self.windows.items() if match(w)]:
            window = self.windows.pop(key)
            lost = (self.control.take_lost_window(window.uid, window.seq)
                    if self.control is not None else None)
            saves = len(set(window.saves))  # kinds: the same one read again is still one
            if lost is not None:
                saves = max(saves, self._lost_saves(lost))
            if saves >= 2 and key not in self._counted:
                if lost is not None or closed_by == "idle":
                    # Its events may still come (in flight, or the window was only idle):
                    # remembered so it is never counted twice. A window the kernel closed
                    # with nothing lost gets no more events.
                    self._count_snapshot(key)
                if len(set(window.saves)) < 2:
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
                    reason=f"{saves} kinds of state read while {exit_name} was pending: a "
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
        """Every open window, judged now (``watch`` at the end of its command)."""
        self._close_windows(lambda w: True, closed_by)
        self._count_lost_windows(lambda lw: True)

    def unresolved_held(self) -> int:
        """At shutdown: reads still held in windows of live processes (their window never
        closed while we watched: neither inspections nor findings); said in a notice."""
        if self.control is None:
            return 0
        pids = {rec.pid for rec in self.vcpus.values()}
        held = sum(h.reads for pid in pids for h in self.control.held_reads(pid))
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
                self._forget_process(pid)  # its exit event was lost: held reads unverified
        if self.control is not None:
            # A process the tracker never tracked (the ring buffer dropped its vCPU's creation
            # event as well as its exit event) still has the kernel's counts of its reports:
            # folded once it is gone, or they would stay in mid_counts and inspections for good.
            counted = {k.pid for k in self.control.mid_counts()} | \
                {k.pid for k in self.control.inspections()}
            for pid in counted - {rec.pid for rec in self.vcpus.values()}:
                if self.proc.start_time(pid) is None:
                    self._forget_process(pid)
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
