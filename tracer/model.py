"""An executable specification of the probes' state machine (bpf/completion.c) in Python.

It consumes what the probes observe (syscalls and the kvm_userspace_exit tracepoint) and
produces the :class:`~tracer.events.KernelEvent` stream the probes would. Unit tests drive it
with event sequences to pin the semantics down without a kernel; the end-to-end suite runs the
real probes with ``--trace-exits`` and checks they reach the same verdicts as this model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tracer import abi
from tracer.counters import EXIT_SLOT_ERROR, EXIT_SLOT_OTHER, RunState, VcpuCounters
from tracer.events import EventFlag, EventType, KernelEvent, PendingAccess
from tracer.handover import AdoptState
from tracer.midcounts import LostWindow, MidKey, key_of_event
from tracer.windows import (
    KIND_BIT_SHIFT,
    KIND_HOLD,
    KIND_RESTORE,
    KIND_SAVE,
    HeldRead,
    HeldWhy,
    InspectionKey,
)

NO_FLAGS = EventFlag(0)


@dataclass
class ModelVcpu:
    uid: int
    pid: int
    vcpu_id: int
    fd_refs: int = 1
    state: RunState = RunState.IDLE
    seq: int = 0
    pending_since: int = 0
    exit_reason: int = 0
    access: PendingAccess | None = None
    window_reports: int = 0
    window_kinds: int = 0
    window_finding: bool = False
    held: HeldRead | None = None
    held_flags: EventFlag = NO_FLAGS  # AT_RETURN of the held read
    run_tid: int = 0
    counters: VcpuCounters = field(default_factory=VcpuCounters)
    completing: bool = False


@dataclass
class _Inflight:
    op: str  # "create" | "state_while_running"
    fd: int
    cmd: int = 0
    uid: int = 0
    seq: int = 0
    vcpu_id: int = 0


@dataclass
class ProbeModel:
    pending_exits: frozenset[int]
    # ioctl_kinds (tracer.windows.kind_values); None: every save held, as the default policy
    kinds: dict[int, int] | None = None
    now: int = 0
    fds: dict[tuple[int, int], int] = field(default_factory=dict)  # (pid, fd) -> uid
    vcpus: dict[int, ModelVcpu] = field(default_factory=dict)
    run_threads: dict[int, int] = field(default_factory=dict)  # tid -> uid
    inflight: dict[int, _Inflight] = field(default_factory=dict)
    quirks_disabled: dict[int, int] = field(default_factory=dict)  # pid -> mask
    procs: set[int] = field(default_factory=set)
    restore_gen: dict[int, int] = field(default_factory=dict)  # pid -> restores so far
    held_windows: dict[int, int] = field(default_factory=dict)  # pid -> windows holding a read
    inspected: dict[InspectionKey, int] = field(default_factory=dict)  # `inspections`
    # mid_counts: reports by tracer.midcounts.MidKey, counted before the event is sent (the
    # model's ring never drops one, so lost_windows stays empty)
    mid: dict[MidKey, int] = field(default_factory=dict)
    out: list[KernelEvent] = field(default_factory=list)
    _next_uid: int = 0

    # ---- helpers -------------------------------------------------------------------------------
    def _tick(self) -> int:
        self.now += 1000
        return self.now

    def _emit(self, etype: EventType, pid: int, tid: int, *, fd: int = -1, cmd: int = 0,
              vcpu: ModelVcpu | None = None, flags: EventFlag = NO_FLAGS, aux: int = 0,
              vcpu_id: int = 0, uid: int = 0) -> None:
        access = vcpu.access if vcpu and etype is EventType.VIOLATION else None
        if access is not None:
            flags |= EventFlag.ACCESS_VALID
        self.out.append(KernelEvent(
            type=etype, tgid=pid, tid=tid, vcpu_id=vcpu.vcpu_id if vcpu else vcpu_id, fd=fd,
            cmd=cmd, exit_reason=vcpu.exit_reason if vcpu else 0, flags=flags,
            seq=vcpu.seq if vcpu else 0, pending_since_ns=vcpu.pending_since if vcpu else 0,
            ts_ns=self._tick(), aux=aux, vcpu_uid=vcpu.uid if vcpu else uid, access=access,
            comm="vmm"))

    def _forget_fd(self, pid: int, tid: int, fd: int) -> None:
        uid = self.fds.pop((pid, fd), None)
        if uid is None:
            return
        vcpu = self.vcpus.get(uid)
        left = 0
        vcpu_id = vcpu.vcpu_id if vcpu else 0
        if vcpu is not None:
            if vcpu.fd_refs > 1:
                vcpu.fd_refs -= 1
                left = vcpu.fd_refs
            else:
                if vcpu.state is RunState.PENDING and vcpu.held is not None:
                    self._close_held(pid, vcpu)
                vcpu.fd_refs, vcpu.state = 0, RunState.CLOSED
        self._emit(EventType.VCPU_FD_CLOSED, pid, tid, fd=fd, aux=left, vcpu_id=vcpu_id,
                   uid=uid)

    def _held_add(self, pid: int, delta: int) -> None:
        if pid in self.procs and (delta > 0 or self.held_windows.get(pid, 0) > 0):
            self.held_windows[pid] = self.held_windows.get(pid, 0) + delta

    def _kind(self, cmd: int) -> int:
        if self.kinds is not None:
            return self.kinds.get(cmd, 0)
        if cmd in abi.RESTORE_IOCTLS:
            return KIND_RESTORE
        if cmd in abi.SAVE_IOCTLS:
            return KIND_SAVE | sorted(abi.SAVE_IOCTLS).index(cmd) << KIND_BIT_SHIFT | KIND_HOLD
        return 0

    def _report(self, pid: int, tid: int, fd: int, cmd: int, vcpu: ModelVcpu,
                extra: EventFlag = NO_FLAGS, reads: int = 1, aux: int = 0) -> None:
        vcpu.window_reports += reads
        if self.quirks_disabled.get(pid, 0) & abi.KVM_X86_QUIRK_OUT_7E_INC_RIP:
            extra |= EventFlag.QUIRK_7E_DISABLED
        self._emit(EventType.VIOLATION, pid, tid, fd=fd, cmd=cmd, vcpu=vcpu, flags=extra,
                   aux=aux)
        key = key_of_event(self.out[-1])
        self.mid[key] = self.mid.get(key, 0) + reads

    def _report_held(self, pid: int, vcpu: ModelVcpu, why: HeldWhy) -> None:
        held, vcpu.held = vcpu.held, None
        if held is None:
            return
        self._held_add(pid, -1)
        self._report(pid, held.tid, held.fd, held.cmd, vcpu, EventFlag.HELD | vcpu.held_flags,
                     held.reads, int(why) | held.reads << 8)

    def _state_ioctl_mid(self, pid: int, tid: int, fd: int, cmd: int, vcpu: ModelVcpu,
                         extra: EventFlag = NO_FLAGS) -> None:
        """bpf/completion.c state_ioctl_mid: hold a lone read of one kind, else a finding."""
        kv = self._kind(cmd)
        save = kv & 0xFF == KIND_SAVE
        if save:
            vcpu.window_kinds |= 1 << ((kv >> KIND_BIT_SHIFT) & 31)
        if not vcpu.window_finding:
            if save and kv & KIND_HOLD:
                if vcpu.held is None:
                    vcpu.held = HeldRead(vcpu.uid, pid, vcpu.vcpu_id, tid, fd, cmd, 1,
                                         vcpu.exit_reason, vcpu.seq, vcpu.pending_since,
                                         self._tick(), self.restore_gen.get(pid, 0))
                    vcpu.held_flags = extra
                    self._held_add(pid, 1)
                    return
                if vcpu.held.cmd == cmd:
                    vcpu.held = replace(vcpu.held, reads=vcpu.held.reads + 1)
                    return
            vcpu.window_finding = True
            self._report_held(pid, vcpu, HeldWhy.SNAPSHOT if save else HeldWhy.RESTORE)
        self._report(pid, tid, fd, cmd, vcpu, extra)

    def _close_held(self, pid: int, vcpu: ModelVcpu) -> None:
        held = vcpu.held
        if held is None:
            return
        if pid in self.procs and self.restore_gen.get(pid, 0) != held.restore_gen:
            vcpu.window_finding = True
            self._report_held(pid, vcpu, HeldWhy.RESTORE)
            return
        key = InspectionKey(pid, held.cmd, vcpu.exit_reason)
        self.inspected[key] = self.inspected.get(key, 0) + held.reads
        vcpu.held = None
        self._held_add(pid, -1)

    # ---- observations --------------------------------------------------------------------------
    def ioctl_enter(self, pid: int, tid: int, fd: int, cmd: int, arg: int = 0,
                    immediate_exit: bool = False) -> None:
        """sys_enter_ioctl; ``immediate_exit`` is kvm_run->immediate_exit at a KVM_RUN."""
        uid = self.fds.get((pid, fd))
        if uid is None:
            if cmd == abi.KVM_CREATE_VCPU:
                self.inflight[tid] = _Inflight("create", fd, vcpu_id=arg)
            elif cmd == abi.KVM_RUN:
                self.run_threads.pop(tid, None)
            return
        vcpu = self.vcpus.get(uid)
        if vcpu is None:
            return
        if cmd == abi.KVM_RUN:
            if vcpu.state is RunState.PENDING:
                vcpu.completing = True  # the path is counted when this KVM_RUN returns
            if vcpu.state is RunState.PENDING and (vcpu.held or vcpu.window_finding):
                self._close_held(pid, vcpu)
                vcpu.window_kinds, vcpu.window_finding = 0, False
            if vcpu.state is RunState.PENDING and vcpu.window_reports:
                self._emit(EventType.WINDOW_CLOSED, pid, tid, vcpu=vcpu,
                           aux=vcpu.window_reports,
                           flags=EventFlag.IMMEDIATE_EXIT if immediate_exit else NO_FLAGS)
            vcpu.state = RunState.RUNNING
            vcpu.run_tid = tid
            self.run_threads[tid] = uid
            return
        if cmd not in abi.SAVE_IOCTLS and cmd not in abi.RESTORE_IOCTLS:
            return
        if cmd in abi.RESTORE_IOCTLS and pid in self.procs:
            self.restore_gen[pid] = self.restore_gen.get(pid, 0) + 1
        if vcpu.state is RunState.PENDING:
            self._state_ioctl_mid(pid, tid, fd, cmd, vcpu)
            return
        if vcpu.state is RunState.RUNNING:
            self.inflight[tid] = _Inflight("state_while_running", fd, cmd, uid, vcpu.seq)

    def ioctl_exit(self, pid: int, tid: int, ret: int) -> None:
        inf = self.inflight.pop(tid, None)
        if inf is None:
            return
        if inf.op == "create" and ret >= 0:
            self._forget_fd(pid, tid, ret)
            self._next_uid += 1
            uid = self._next_uid
            self.fds[(pid, ret)] = uid
            self.vcpus[uid] = ModelVcpu(uid, pid, inf.vcpu_id)
            self.procs.add(pid)
            self._emit(EventType.VCPU_CREATED, pid, tid, fd=ret, vcpu_id=inf.vcpu_id, uid=uid,
                       aux=inf.fd)
        elif inf.op == "state_while_running":
            vcpu = self.vcpus.get(inf.uid)
            if vcpu and vcpu.state is RunState.PENDING and vcpu.seq != inf.seq:
                self._state_ioctl_mid(pid, tid, inf.fd, inf.cmd, vcpu, EventFlag.AT_RETURN)

    def userspace_exit(self, tid: int, reason: int, errno: int = 0,
                       access: PendingAccess | None = None) -> None:
        """The raw tracepoint kvm_userspace_exit(reason, errno) in the vCPU thread."""
        uid = self.run_threads.get(tid)
        vcpu = self.vcpus.get(uid) if uid is not None else None
        if vcpu is None:
            return
        slot = EXIT_SLOT_ERROR if errno else reason if reason < abi.MAX_EXIT_REASON \
            else EXIT_SLOT_OTHER
        vcpu.counters.exits[slot] += 1
        if vcpu.completing:
            vcpu.completing = False
            vcpu.counters.completions[1 if errno == abi.EINTR_ERRNO else 0] += 1
        if vcpu.state is RunState.CLOSED:
            return
        if errno == 0:
            vcpu.exit_reason = reason
        if errno == 0 and reason in self.pending_exits:
            vcpu.seq += 1
            vcpu.pending_since = self._tick()
            vcpu.window_reports = 0
            vcpu.access = access
            vcpu.state = RunState.PENDING
        else:
            vcpu.state = RunState.IDLE

    def dup(self, pid: int, tid: int, oldfd: int, newfd: int) -> None:
        """A successful dup/dup2/dup3/fcntl(F_DUPFD) that returned ``newfd``."""
        if newfd == oldfd:
            return
        self._forget_fd(pid, tid, newfd)
        uid = self.fds.get((pid, oldfd))
        vcpu = self.vcpus.get(uid) if uid is not None else None
        if uid is None or vcpu is None:
            return
        self.fds[(pid, newfd)] = uid
        vcpu.fd_refs += 1
        self._emit(EventType.VCPU_FD_DUP, pid, tid, fd=newfd, vcpu_id=vcpu.vcpu_id, uid=uid,
                   aux=oldfd)

    def close(self, pid: int, tid: int, fd: int) -> None:
        self._forget_fd(pid, tid, fd)

    def disable_quirks(self, pid: int, tid: int, mask: int) -> None:
        self.quirks_disabled[pid] = self.quirks_disabled.get(pid, 0) | mask
        self.procs.add(pid)
        self._emit(EventType.QUIRKS_DISABLED, pid, tid, aux=mask)

    def thread_exit(self, tid: int) -> None:
        self.run_threads.pop(tid, None)
        self.inflight.pop(tid, None)

    def process_exit(self, pid: int) -> None:
        """The last thread exited (or exec): entries go when the tracker forgets the process."""
        if pid in self.procs:
            self.procs.discard(pid)
            self.quirks_disabled.pop(pid, None)
            gen = self.restore_gen.pop(pid, 0)
            held = self.held_windows.pop(pid, 0) > 0
            self._emit(EventType.PROCESS_EXIT, pid, pid,
                       flags=EventFlag.HELD if held else NO_FLAGS, aux=gen if held else 0)

    # ---- what the tracker asks of the probes (ProbeControl) ------------------------------------
    def adopt_vcpu(self, pid: int, fd: int, vcpu_id: int, run_addr: int | None,
                   uid: int | None = None, start: AdoptState | None = None) -> int | None:
        if (pid, fd) in self.fds:
            return None
        if uid is None or uid not in self.vcpus:
            self._next_uid += 1
            uid = (1 << 63) + self._next_uid
            vcpu = ModelVcpu(uid, pid, vcpu_id, fd_refs=0)
            if start is not None and start.state:
                vcpu.state, vcpu.exit_reason = RunState(start.state), start.exit_reason
                vcpu.run_tid, vcpu.pending_since = start.run_tid, start.pending_since_ns
                vcpu.seq = 1 if vcpu.state is RunState.PENDING else 0
            if start is not None and start.run_tid:
                self.run_threads[start.run_tid] = uid
            self.vcpus[uid] = vcpu
        self.vcpus[uid].fd_refs += 1
        self.fds[(pid, fd)] = uid
        self.procs.add(pid)
        return uid

    def forget_process(self, pid: int, uids: set[int]) -> dict[int, VcpuCounters]:
        for key in [k for k, u in self.fds.items() if k[0] == pid and u in uids]:
            del self.fds[key]
        return self.release_vcpus(uids)

    def release_vcpus(self, uids: set[int]) -> dict[int, VcpuCounters]:
        gone = {uid: self.vcpus.pop(uid, None) for uid in uids}
        return {uid: v.counters for uid, v in gone.items() if v is not None}

    def forget_fd(self, pid: int, fd: int) -> VcpuCounters | None:
        uid = self.fds.pop((pid, fd), None)
        vcpu = self.vcpus.get(uid) if uid is not None else None
        if vcpu is not None and uid is not None:
            vcpu.fd_refs -= 1
            if vcpu.fd_refs <= 0:
                return self.release_vcpus({uid}).get(uid)
        return None

    def tracked_fds(self, pid: int) -> dict[int, int]:
        return {fd: uid for (p, fd), uid in self.fds.items() if p == pid}

    def vcpu_states(self) -> list[dict[str, int]]:
        """The probes' ``vcpus`` map, as tracer.probes.Probes.vcpu_states() reads it."""
        return [{"uid": v.uid, "pid": v.pid, "vcpu_id": v.vcpu_id, "state": v.state.value,
                 "exit_reason": v.exit_reason, "seq": v.seq,
                 "pending_since_ns": v.pending_since, "run_tid": v.run_tid,
                 "run_addr": 0} for v in self.vcpus.values()]

    def mid_counts(self) -> dict[MidKey, int]:
        return dict(self.mid)

    def take_mid_counts(self, pid: int) -> dict[MidKey, int]:
        taken = {k: v for k, v in self.mid.items() if k.pid == pid}
        for key in taken:
            del self.mid[key]
        return taken

    def inspections(self) -> dict[InspectionKey, int]:
        return dict(self.inspected)

    def take_inspections(self, pid: int) -> dict[InspectionKey, int]:
        taken = {k: v for k, v in self.inspected.items() if k.pid == pid}
        for key in taken:
            del self.inspected[key]
        return taken

    def held_reads(self, pid: int) -> list[HeldRead]:
        return [v.held for v in self.vcpus.values()
                if v.pid == pid and v.held is not None and v.state is RunState.PENDING]

    def lost_windows(self) -> list[LostWindow]:
        return []

    def take_lost_window(self, vcpu_uid: int, seq: int) -> LostWindow | None:
        return None

    def vcpu_comms(self) -> dict[int, str]:
        """The kernel keeps the creating thread's comm per vCPU; the model runs no threads
        with names, so there is none to keep (VM names come from the ProcView)."""
        return {}

    def drain(self) -> list[KernelEvent]:
        out, self.out = self.out, []
        return out
