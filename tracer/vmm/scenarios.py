"""Named VMM behaviours, correct and buggy, each run on a real VM and reported as JSON.

A *buggy* VMM saves (or restores) vCPU state right after an exit that still owes the guest a
completion; a *correct* one first re-enters KVM_RUN with ``immediate_exit = 1``, which finishes
the instruction without running the guest and returns -EINTR. Every scenario returns a
:class:`~tracer.vmm.report.ScenarioReport` listing the save/restore ioctls a tracer must flag.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Final

from tracer import abi
from tracer.vmm import guest, snapshot
from tracer.vmm.guest import GuestProgram
from tracer.vmm.kvm import (
    KVM_EXIT_INTR,
    QUEUE_AFTER_RUN,
    Kvm,
    MmioExit,
    MsrExit,
    PioExit,
    QueuedIoctl,
    Vcpu,
    Vm,
    VmmError,
)
from tracer.vmm.report import (
    ScenarioReport,
    VcpuInfo,
    exit_counts,
    inspections,
    pending_info,
    split_expectations,
)

DEFAULT_ITERATIONS: Final = 5
LOOP_IO_ITERATIONS: Final = 20_000
THREAD_TIMEOUT_S: Final = 20.0

# Scenarios whose VMs must outlive the call (process-exit) park them here: the fds stay open
# until the process exits and the kernel closes them.
_KEPT_OPEN: list[Kvm] = []


# --gate FILE: after its first vCPU exists (fd open, kvm_run mapped), a scenario touches
# FILE.ready and waits for FILE, so a tracer can be started against a VM that predates it.
_GATE: list[Path] = []
GATE_TIMEOUT_S: Final = 120.0


def set_gate(path: Path) -> None:
    _GATE[:] = [path]


def _pass_gate() -> None:
    if not _GATE:
        return
    gate = _GATE.pop()
    Path(f"{gate}.ready").touch()
    deadline = time.monotonic() + GATE_TIMEOUT_S
    while not gate.exists():
        if time.monotonic() > deadline:
            raise VmmError(f"gate {gate} did not open within {GATE_TIMEOUT_S:.0f} s")
        time.sleep(0.01)


def close_kept_open() -> None:
    """Close what process-exit left open (for callers that stay alive, e.g. a test run)."""
    while _KEPT_OPEN:
        _KEPT_OPEN.pop().close()


class _Session:
    """One scenario's VMs and vCPUs, and the bookkeeping that turns into its report."""

    def __init__(self, name: str, iterations: int) -> None:
        if iterations < 1:
            raise ValueError("iterations must be at least 1")
        self.name = name
        self.iterations = iterations
        self.kvm = Kvm()
        self.started_ns = time.monotonic_ns()
        self.vcpus: list[tuple[Vcpu, VcpuInfo]] = []
        self.facts: dict[str, int | str | bool | float] = {}
        self.notes: list[str] = []

    def vm(self, *, user_msr: bool = False, disable_quirk_7e: bool = False) -> Vm:
        vm = self.kvm.create_vm()
        vm.set_tss_addr()
        vm.add_memory(0, guest.MEMORY_SIZE)
        if user_msr:
            vm.enable_user_space_msr()
        if disable_quirk_7e:
            vm.disable_quirks(abi.KVM_X86_QUIRK_OUT_7E_INC_RIP)
        return vm

    def vcpu(self, vm: Vm, vcpu_id: int, program: GuestProgram, *, buggy: bool = False) -> Vcpu:
        vm.memory[0].write(program.load_addr, program.code)
        vcpu = vm.create_vcpu(vcpu_id)
        vcpu.setup_real_mode(program.load_addr)
        self.vcpus.append((vcpu, VcpuInfo(vm.fd, vcpu_id, vcpu.fd, program.name, buggy,
                                          vcpu.created_ns, None)))
        _pass_gate()
        return vcpu

    def report(self, *, keep_open: bool = False) -> ScenarioReport:
        finished = time.monotonic_ns()
        kvm = self.kvm
        lives = [(info.vm_fd, info.vcpu_id, info.created_ns, v.closed_ns)
                 for v, info in self.vcpus]
        peeks = inspections(kvm.mid_completion, kvm.ioctl_log, kvm.completed_windows, lives)
        violations, sanctioned, inspected = split_expectations(kvm.mid_completion, peeks)
        pending = [
            pending_info(v.vm.fd, v.vcpu_id, v.fd, v.pending)
            for v, _ in self.vcpus
            if v.pending is not None and v.fd >= 0
        ]
        infos = []
        for vcpu, info in self.vcpus:
            end = vcpu.closed_ns if vcpu.closed_ns is not None else finished
            tids = sorted({r.tid for r in kvm.run_log if r.fd == info.fd
                           and info.created_ns <= r.ts_ns <= end})
            infos.append(dataclasses.replace(info, closed_ns=vcpu.closed_ns,
                                             dup_fds=list(vcpu.dup_history), run_tids=tids))
        report = ScenarioReport(
            scenario=self.name, pid=os.getpid(), iterations=self.iterations,
            violations=violations, sanctioned=sanctioned, exits=exit_counts(kvm.run_log),
            completions=sum(1 for r in kvm.run_log if r.immediate_exit),
            vcpus=infos, pending_at_end=pending, started_ns=self.started_ns,
            finished_ns=finished, facts=self.facts, notes=self.notes,
            ioctl_log=list(kvm.ioctl_log), run_log=list(kvm.run_log), inspections=inspected,
        )
        if keep_open:
            _KEPT_OPEN.append(kvm)
        else:
            kvm.close()
        return report

    def close(self) -> None:
        self.kvm.close()


# --- the device model: what the VMM answers -----------------------------------------------
def _answer(iteration: int) -> int:
    """The value served to reads in ``iteration``: varies so a stale register shows."""
    return 0x5A ^ (iteration & 0xFF)


def _exit(vcpu: Vcpu, program: GuestProgram, iteration: int) -> int:
    """One KVM_RUN, which must give the program's exit; answer it if it reads. Returns the
    exit reason; the exit's completion is then pending."""
    reason = vcpu.run()
    name = abi.exit_reason_name(reason)
    if name not in program.exits:
        raise VmmError(f"vCPU {vcpu.vcpu_id} running {program.name}: got {name}, expected "
                       f"{'/'.join(program.exits)}")
    value = _answer(iteration)
    access = vcpu.exit_access(reason)
    if isinstance(access, PioExit) and access.direction == "in":
        vcpu.set_io_in_data(value)
    elif isinstance(access, MmioExit) and not access.is_write:
        vcpu.set_mmio_read_data(value)
    elif isinstance(access, MsrExit):
        vcpu.set_msr_result(0 if access.is_write else value)
    return reason


def _complete(vcpu: Vcpu) -> None:
    result = vcpu.complete_pending()
    if result != KVM_EXIT_INTR:
        raise VmmError(f"immediate-exit KVM_RUN on vCPU {vcpu.vcpu_id} returned "
                       f"{abi.exit_reason_name(result)}, expected -EINTR")


def _check_read_completed(vcpu: Vcpu, snap: snapshot.Snapshot, iteration: int,
                          program: GuestProgram) -> None:
    """After a completed read the answer must be in the accumulator: proof the completion ran
    before the save (the very thing a buggy VMM gets wrong)."""
    want = _answer(iteration)
    if program.msr_index is not None and program.direction == "read":
        got = ((snap.regs.rdx & 0xFFFFFFFF) << 32) | (snap.regs.rax & 0xFFFFFFFF)
    elif program.direction in ("in", "read"):
        got = snap.regs.rax & 0xFF  # byte-sized IN and MMIO loads
    else:
        return
    if got != want:
        raise VmmError(f"vCPU {vcpu.vcpu_id}: completed read left {got:#x}, expected {want:#x}")


def _correct_round(vcpu: Vcpu, program: GuestProgram, iteration: int) -> None:
    _exit(vcpu, program, iteration)
    _complete(vcpu)
    snap = snapshot.save(vcpu)
    _check_read_completed(vcpu, snap, iteration, program)
    snapshot.restore(vcpu, snap)


def _buggy_round(vcpu: Vcpu, program: GuestProgram, iteration: int) -> bool:
    """Snapshot mid-completion; True when the saved RIP still points at the exiting
    instruction (a restore would replay it)."""
    _exit(vcpu, program, iteration)
    snap = snapshot.save(vcpu)
    _complete(vcpu)
    return bool(snap.regs.rip == program.load_addr + program.loop_head)


# --- scenarios ------------------------------------------------------------------------------
def _correct(name: str, program: GuestProgram, iterations: int, user_msr: bool = False
             ) -> ScenarioReport:
    s = _Session(name, iterations)
    try:
        vcpu = s.vcpu(s.vm(user_msr=user_msr), 0, program)
        for i in range(iterations):
            _correct_round(vcpu, program, i)
        return s.report()
    finally:
        s.close()


def correct_io(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """OUT exits, completed with immediate_exit before each save+restore: no violations."""
    return _correct("correct-io", guest.out_loop(), iterations)


def correct_mmio(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """MMIO read exits, completed before each save+restore (checks AL got the answer)."""
    return _correct("correct-mmio", guest.mmio_read_loop(), iterations)


def correct_msr(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """RDMSR exits, completed before each save+restore (checks EDX:EAX got the answer)."""
    return _correct("correct-msr", guest.rdmsr_loop(), iterations, user_msr=True)


def _buggy(name: str, program: GuestProgram, iterations: int, user_msr: bool = False
           ) -> ScenarioReport:
    s = _Session(name, iterations)
    try:
        vcpu = s.vcpu(s.vm(user_msr=user_msr), 0, program, buggy=True)
        stale = sum(_buggy_round(vcpu, program, i) for i in range(iterations))
        s.facts["saves_with_rip_at_exiting_insn"] = stale
        s.facts["save_ioctls_per_iteration"] = len(snapshot.SAVE_IOCTLS)
        return s.report()
    finally:
        s.close()


def buggy_io_out(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """Snapshot from the vCPU thread while an OUT to 0x3f8 is pending."""
    return _buggy("buggy-io-out", guest.out_loop(), iterations)


def buggy_io_in(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """Snapshot while an IN from 0x3f8 is pending (the saved AL misses the answer)."""
    return _buggy("buggy-io-in", guest.in_loop(), iterations)


def buggy_mmio_write(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """Snapshot while an MMIO byte store to 0x20000 is pending."""
    return _buggy("buggy-mmio-write", guest.mmio_write_loop(), iterations)


def buggy_mmio_read(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """Snapshot while an MMIO byte load from 0x20000 is pending."""
    return _buggy("buggy-mmio-read", guest.mmio_read_loop(), iterations)


def buggy_rdmsr(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """Snapshot while an RDMSR of 0x12345678 is pending."""
    return _buggy("buggy-rdmsr", guest.rdmsr_loop(), iterations, user_msr=True)


def buggy_wrmsr(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """Snapshot while a WRMSR of 0x12345678 is pending."""
    return _buggy("buggy-wrmsr", guest.wrmsr_loop(), iterations, user_msr=True)


class _Worker(threading.Thread):
    """A thread whose exception is handed to whoever joins it."""

    def __init__(self, name: str, body: Callable[[], None]) -> None:
        super().__init__(name=name, daemon=True)
        self._body = body
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._body()
        except BaseException as err:  # re-raised in the joining thread
            self.error = err

    def finish(self) -> None:
        self.join(THREAD_TIMEOUT_S)
        if self.is_alive():
            raise VmmError(f"thread {self.name} did not finish in {THREAD_TIMEOUT_S} s")
        if self.error is not None:
            raise VmmError(f"thread {self.name} failed: {self.error}") from self.error


def _wait(event: threading.Event, what: str, worker: _Worker) -> None:
    if not event.wait(THREAD_TIMEOUT_S):
        worker.finish()  # surfaces the worker's error if it died
        raise VmmError(f"timed out waiting for {what}")
    event.clear()


def buggy_other_thread(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """The vCPU thread parks after an OUT exit; another thread saves GET_REGS + GET_SREGS."""
    s = _Session("buggy-other-thread", iterations)
    try:
        program = guest.out_loop()
        vcpu = s.vcpu(s.vm(), 0, program, buggy=True)
        exited, saved = threading.Event(), threading.Event()

        def vcpu_thread() -> None:
            for i in range(iterations):
                _exit(vcpu, program, i)
                exited.set()
                if not saved.wait(THREAD_TIMEOUT_S):
                    raise VmmError("saver thread never finished")
                saved.clear()
                _complete(vcpu)

        worker = _Worker("vcpu0", vcpu_thread)
        worker.start()
        for _ in range(iterations):
            _wait(exited, "the vCPU exit", worker)
            vcpu.get_regs()
            vcpu.get_sregs()
            saved.set()
        worker.finish()
        s.facts["saver_tid"] = threading.get_native_id()
        return s.report()
    finally:
        s.close()


SAVE_WHILE_RUNNING_ITERATIONS: Final = 3
# The saver issues its snapshot at least this long after the vCPU thread is about to enter
# KVM_RUN, and only once the guest's heartbeat moved (so KVM_RUN holds vcpu->mutex): well under
# the 55-250 ms the guest then spends in guest.delayed_out_loop()'s delay loop before its OUT
# (see guest.OUT_DELAY_ROUNDS), leaving the snapshot tens of ms to wait for the exit.
SAVE_AFTER_ENTRY_S: Final = 0.005
HEARTBEAT_POLL_S: Final = 0.0002
# The kicked variant signals the vCPU thread this long after the saver started its snapshot, so
# the snapshot's first ioctl is surely blocked on vcpu->mutex behind the spinning KVM_RUN.
KICK_AFTER_SAVE_S: Final = 0.02
KICK_RETRY_S: Final = 1.0
MAX_KICKS: Final = 5
KICK_SIGNAL: Final = signal.SIGUSR1


def _ignore_kick(signum: int, frame: FrameType | None) -> None:
    """The kick's handler: nothing to do, the signal only has to end KVM_RUN with -EINTR."""


def _save_while_running(name: str, iterations: int, kicked: bool) -> ScenarioReport:
    """The vCPU thread enters KVM_RUN; another thread, once the guest's heartbeat shows this
    KVM_RUN is running guest code (so it holds vcpu->mutex), snapshots the vCPU. The snapshot's
    first ioctl waits for KVM_RUN to return and so runs right after the exit, mid-completion
    unless the run ended in -EINTR; the vCPU thread leaves the exit pending until the snapshot
    is done, then completes it with immediate_exit (nothing to complete after -EINTR)."""
    if kicked and threading.current_thread() is not threading.main_thread():
        raise VmmError(f"{name} installs a {KICK_SIGNAL.name} handler: run it in the main thread")
    s = _Session(name, iterations)
    old_handler = signal.signal(KICK_SIGNAL, _ignore_kick) if kicked else None
    runner: _Worker | None = None
    try:
        program = guest.spin_forever() if kicked else guest.delayed_out_loop()
        vcpu = s.vcpu(s.vm(), 0, program, buggy=not kicked)
        entering, run_over, saving, saved = (threading.Event() for _ in range(4))
        snaps: list[snapshot.Snapshot] = []
        saver_tids: list[int] = []
        beat_before = [0]
        beat_waits: list[float] = []
        assert program.heartbeat is not None
        heartbeat_gpa = program.heartbeat

        def beat() -> int:
            value: int = struct.unpack("<I", vcpu.vm.memory[0].read(heartbeat_gpa, 4))[0]
            return value

        vcpu.progress = beat  # queued saves ordered by the guest's heartbeat, not by clocks

        def vcpu_thread() -> None:
            for i in range(iterations):
                beat_before[0] = beat()  # the guest is not running: the count is stable
                entering.set()  # just before KVM_RUN
                if kicked:
                    reason = vcpu.run()
                    if reason != KVM_EXIT_INTR:
                        raise VmmError(f"kicked KVM_RUN returned {abi.exit_reason_name(reason)}"
                                       ", expected -EINTR")
                else:
                    _exit(vcpu, program, i)
                run_over.set()
                if not saved.wait(THREAD_TIMEOUT_S):
                    raise VmmError("saver thread never finished")
                saved.clear()
                if not kicked:
                    _complete(vcpu)

        def saver_thread() -> None:
            saver_tids.append(threading.get_native_id())
            for _ in range(iterations):
                if not entering.wait(THREAD_TIMEOUT_S):
                    raise VmmError("the vCPU thread never entered KVM_RUN")
                entering.clear()
                t0 = time.monotonic()
                time.sleep(SAVE_AFTER_ENTRY_S)
                # The guest ran this KVM_RUN's code: KVM_RUN has vcpu->mutex, so the snapshot
                # cannot slip in before it.
                while beat() == beat_before[0]:
                    if time.monotonic() - t0 > THREAD_TIMEOUT_S:
                        raise VmmError("the guest's heartbeat never moved")
                    time.sleep(HEARTBEAT_POLL_S)
                beat_waits.append(time.monotonic() - t0)
                saving.set()
                snaps.append(snapshot.save(vcpu))  # blocks until KVM_RUN returns
                saved.set()

        runner, saver = _Worker("vcpu0", vcpu_thread), _Worker("saver", saver_thread)
        runner.start()
        saver.start()
        kicks = 0
        if kicked:
            for _ in range(iterations):
                _wait(saving, "the saver's snapshot", saver)
                time.sleep(KICK_AFTER_SAVE_S)
                while True:
                    if kicks >= MAX_KICKS * iterations or not runner.is_alive():
                        runner.finish()  # surfaces the vCPU thread's error, if it died
                        raise VmmError(f"{kicks} kicks did not end KVM_RUN")
                    assert runner.ident is not None
                    signal.pthread_kill(runner.ident, KICK_SIGNAL)
                    kicks += 1
                    if run_over.wait(KICK_RETRY_S):
                        break
                run_over.clear()
        runner.finish()
        saver.finish()
        _check_saves_behind_runs(s, vcpu, kicked, iterations)
        s.facts.update(saver_tid=saver_tids[0],
                       save_ioctls_per_iteration=len(snapshot.SAVE_IOCTLS),
                       heartbeat_seen_ms_max=round(max(beat_waits) * 1e3, 3))
        if kicked:
            s.facts["kicks"] = kicks
        else:
            # KVM leaves RIP at the OUT until the completion (fast PIO) or, emulating it as
            # PVM does in real mode, already past it; never inside the delay loop.
            out = program.instructions[-2]
            at_exit = {program.load_addr + out.offset + n for n in (0, len(out.code))}
            rips = [snap.regs.rip for snap in snaps]
            if not all(rip in at_exit for rip in rips):
                raise VmmError(f"{s.name}: snapshots saw RIP {[hex(r) for r in rips]}, expected "
                               f"the guest stopped at its OUT ({sorted(map(hex, at_exit))})")
            s.facts["saved_rip"] = hex(rips[0])
        return s.report()
    finally:
        stuck = runner is not None and runner.is_alive()
        if stuck and kicked and runner is not None and runner.ident is not None:
            # Failed with the guest still spinning: end that KVM_RUN before closing its fd.
            vcpu.run_page.view[abi.KVM_RUN_LAYOUT.immediate_exit] = 1
            signal.pthread_kill(runner.ident, KICK_SIGNAL)
        if old_handler is not None and not stuck:
            # (A thread still alive may yet get a kick: keep the no-op handler then.)
            signal.signal(KICK_SIGNAL, old_handler)
        s.close()


def _check_saves_behind_runs(s: _Session, vcpu: Vcpu, kicked: bool, iterations: int) -> None:
    """Every iteration's snapshot started while its KVM_RUN was in flight, and every ioctl
    issued then ran after that KVM_RUN returned (the heartbeat the saver waits for already rules
    out a slip; the guest's heartbeat read right after each ioctl, the one it stopped at,
    double-checks it: no clock, so a loaded host cannot fail it); else the expectations would
    be wrong, so the scenario fails. Timings go to the facts."""
    kvm = s.kvm
    runs = [r for r in kvm.run_log if r.fd == vcpu.fd and not r.immediate_exit]
    want = "KVM_EXIT_INTR" if kicked else "KVM_EXIT_IO"
    if len(runs) != iterations or any(r.outcome != want for r in runs):
        raise VmmError(f"{s.name}: KVM_RUN outcomes {[r.outcome for r in runs]}, expected "
                       f"{iterations} x {want}")
    wrong = [q for q in kvm.queued_ioctls if q.order != QUEUE_AFTER_RUN]
    if wrong:
        q = wrong[0]
        raise VmmError(f"{s.name}: {len(wrong)} state ioctl(s) issued during KVM_RUN did not run "
                       f"after it (first: {q.name}, {q.order}, returned "
                       f"{-q.after_run_ns / 1e3:.0f} us before the run; guest heartbeat "
                       f"{q.progress_seen} after it, {q.progress_at_run_end} at the run's end)")
    firsts: list[QueuedIoctl] = []
    for i, run in enumerate(runs):
        behind = [q for q in kvm.queued_ioctls if q.run_ts_ns == run.ts_ns]
        if not behind:
            raise VmmError(f"{s.name}: iteration {i}: the snapshot was issued after KVM_RUN "
                           "returned (the guest's run is too short for the saver's delay)")
        firsts.append(min(behind, key=lambda q: q.ts_ns))
    saves = [e for e in kvm.ioctl_log if abi.IOCTL_BY_NAME[e.name].kind is abi.IoctlKind.SAVE
             and e.ts_ns > runs[0].ts_ns]
    if len(saves) != iterations * len(snapshot.SAVE_IOCTLS):
        raise VmmError(f"{s.name}: {len(saves)} save ioctls, expected "
                       f"{iterations} x {len(snapshot.SAVE_IOCTLS)}")
    expected = 0 if kicked else len(saves)
    if len(kvm.mid_completion) != expected:
        raise VmmError(f"{s.name}: {len(kvm.mid_completion)} mid-completion ioctls recorded, "
                       f"expected {expected}")
    ms = 1e6
    s.facts.update(
        queued_ioctls=len(kvm.queued_ioctls),
        run_ms_min=round(min(q.run_returned_ns - q.run_ts_ns for q in firsts) / ms, 3),
        run_ms_max=round(max(q.run_returned_ns - q.run_ts_ns for q in firsts) / ms, 3),
        save_issued_ms_into_run_min=round(min(q.ts_ns - q.run_ts_ns for q in firsts) / ms, 3),
        first_save_blocked_ms_min=round(min(q.blocked_ns for q in firsts) / ms, 3),
        # Negative: the saver timed its return first (GIL order), within clock_slack_ns().
        save_return_after_run_return_us_min=round(
            min(q.after_run_ns for q in kvm.queued_ioctls) / 1e3, 1),
    )


def save_while_running(iterations: int = SAVE_WHILE_RUNNING_ITERATIONS) -> ScenarioReport:
    """Another thread snapshots the vCPU while it is inside KVM_RUN (guest in a ~45 ms delay
    loop before an OUT): the snapshot's ioctls block on vcpu->mutex and run right after the IO
    exit, mid-completion. Every one is a violation, the first of each snapshot entered while the
    vCPU was still running."""
    return _save_while_running("save-while-running", iterations, kicked=False)


def save_while_running_kicked(iterations: int = SAVE_WHILE_RUNNING_ITERATIONS
                              ) -> ScenarioReport:
    """As save-while-running, but the guest spins and the VMM kicks the vCPU thread out of
    KVM_RUN with SIGUSR1 (-EINTR): the blocked snapshot then runs with nothing pending, so no
    violations."""
    return _save_while_running("save-while-running-kicked", iterations, kicked=True)


def _restore_mid(name: str, program: GuestProgram, iterations: int) -> ScenarioReport:
    s = _Session(name, iterations)
    try:
        vcpu = s.vcpu(s.vm(), 0, program, buggy=True)
        for i in range(iterations):
            regs = vcpu.get_regs()  # nothing pending yet: a clean save
            _exit(vcpu, program, i)
            vcpu.set_regs(regs)  # the restore mid-completion
            _complete(vcpu)
        return s.report()
    finally:
        s.close()


def restore_mmio(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """SET_REGS while an MMIO read is pending: a restore violation (the completion overwrites)."""
    return _restore_mid("restore-mmio", guest.mmio_read_loop(), iterations)


# What a restore mid-port-exit writes: RIP back to the program's start (moved away from the
# exit's instruction), a marker in RAX, and string registers that differ from the exit's.
RESTORE_MARK: Final = 0x1111
RESTORED_STRING_COUNT: Final = 1
RESTORED_STRING_OFFSET: Final = 0x80  # DI/SI restored this far past the guest's buffer
_RESTORE_FIELDS: Final = ("rip", "rax", "rcx", "rdi", "rsi")


def _restore_effect(name: str, program: GuestProgram, iterations: int,
                    buggy: bool) -> ScenarioReport:
    """At each port exit, KVM_SET_REGS of a state that differs from the exit's (RIP moved,
    RAX, RCX, RDI, RSI changed), complete, and read the registers back (nothing pending then):
    the facts say whether KVM left the restored state intact or wrote into it, and what."""
    s = _Session(name, iterations)
    intact = 0
    changed: set[str] = set()
    exits: set[str] = set()
    try:
        vcpu = s.vcpu(s.vm(), 0, program, buggy=buggy)
        for i in range(iterations):
            restored = vcpu.get_regs()  # nothing pending yet: a clean save
            _exit(vcpu, program, i)
            access = vcpu.exit_access()
            if not isinstance(access, PioExit):
                raise VmmError(f"{name}: expected a port exit, got {access}")
            exits.add(f"{access.direction}x{access.count}")
            restored.rip = program.load_addr
            restored.rax = RESTORE_MARK
            restored.rcx = RESTORED_STRING_COUNT
            restored.rdi = guest.STRING_IO_BUFFER + RESTORED_STRING_OFFSET
            restored.rsi = guest.STRING_IO_BUFFER + RESTORED_STRING_OFFSET
            vcpu.set_regs(restored)  # the restore mid-completion
            _complete(vcpu)
            after = vcpu.get_regs()  # completed: a clean read
            diff = {f for f in _RESTORE_FIELDS if getattr(after, f) != getattr(restored, f)}
            intact += not diff
            changed |= diff
        s.facts["restores_intact"] = intact
        s.facts["fields_written_by_completion"] = ",".join(sorted(changed))
        s.facts["pio_exits"] = ",".join(sorted(exits))  # direction x kvm_run.io.count
        return s.report()
    finally:
        s.close()


def restore_pio(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """SET_REGS while an OUT is pending: the restore takes effect (rule restore-after-pio)."""
    return _restore_effect("restore-pio", guest.out_loop(), iterations, buggy=False)


def restore_pio_in(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """SET_REGS while an IN is pending: a restore violation, the completion writes into the
    restored state (emulated IN: RIP; fast IN with RIP unchanged: RAX and RIP)."""
    return _restore_effect("restore-pio-in", guest.in_loop(), iterations, buggy=True)


def restore_pio_rep_ins(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """SET_REGS while a `rep insb` is pending: a restore violation, the emulator finishes the
    string IN with the restored RCX/RDI and its own RIP."""
    return _restore_effect("restore-pio-rep-ins", guest.rep_ins_loop(), iterations, buggy=True)


def restore_pio_rep_outs(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """SET_REGS while a `rep outsb` is pending: the emulator wrote the OUT back before the
    exit, the restore takes effect (rule restore-after-pio)."""
    return _restore_effect("restore-pio-rep-outs", guest.rep_outs_loop(), iterations,
                           buggy=False)


def hlt(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """Snapshot after each HLT exit: HLT needs no completion, so no violations."""
    s = _Session("hlt", iterations)
    try:
        program = guest.hlt_loop()
        vcpu = s.vcpu(s.vm(), 0, program)
        for i in range(iterations):
            _exit(vcpu, program, i)
            snapshot.save(vcpu)
        return s.report()
    finally:
        s.close()


def eintr(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """OUT exit, immediate-exit completion, save; then a second immediate exit with nothing
    pending and another save. Every KVM_RUN with immediate_exit returns -EINTR; no violations."""
    s = _Session("eintr", iterations)
    try:
        program = guest.out_loop()
        vcpu = s.vcpu(s.vm(), 0, program)
        for i in range(iterations):
            _exit(vcpu, program, i)
            _complete(vcpu)
            snapshot.save(vcpu)
            _complete(vcpu)  # nothing pending: still -EINTR, still no guest code run
            snapshot.save(vcpu)
        return s.report()
    finally:
        s.close()


def _port_7e(name: str, iterations: int, disable_quirk: bool) -> ScenarioReport:
    s = _Session(name, iterations)
    try:
        # QEMU's kvmvapic ROM does `out 0x7e, ax`: a 2-byte OUT.
        program = guest.out_loop(port=guest.PORT_7E, value=0x1, size=2)
        vcpu = s.vcpu(s.vm(disable_quirk_7e=disable_quirk), 0, program, buggy=disable_quirk)
        for i in range(iterations):
            _exit(vcpu, program, i)
            snapshot.restore(vcpu, snapshot.save(vcpu))
            _complete(vcpu)
        s.facts["quirk_out_7e_inc_rip"] = not disable_quirk
        return s.report()
    finally:
        s.close()


def port_7e(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """Save+restore while `out 0x7e, ax` is pending, quirk on: all sanctioned (port-0x7e)."""
    return _port_7e("port-7e", iterations, disable_quirk=False)


def port_7e_quirk_disabled(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """As port-7e after disabling KVM_X86_QUIRK_OUT_7E_INC_RIP: the saves are violations, the
    restores sanctioned only as restore-after-pio."""
    return _port_7e("port-7e-quirk-disabled", iterations, disable_quirk=True)


@contextmanager
def _through(vcpu: Vcpu, fd: int) -> Iterator[None]:
    vcpu.state_fd = fd
    try:
        yield
    finally:
        vcpu.state_fd = vcpu.fd


def _dup_scenario(name: str, iterations: int, dup: Callable[[Vcpu], int]) -> ScenarioReport:
    s = _Session(name, iterations)
    try:
        program = guest.out_loop()
        vcpu = s.vcpu(s.vm(), 0, program, buggy=True)
        fd = dup(vcpu)
        s.facts["dup_fd"] = fd
        for i in range(iterations):
            _exit(vcpu, program, i)
            with _through(vcpu, fd):
                snapshot.save(vcpu)
            _complete(vcpu)
        return s.report()
    finally:
        s.close()


# Far above what the scenario itself opens, so the target fd is free.
DUP_TARGET_FD: Final = 200


def dup_fd(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """Snapshot through an os.dup() (fcntl F_DUPFD_CLOEXEC) of the vCPU fd, OUT pending."""
    return _dup_scenario("dup-fd", iterations, lambda v: v.dup())


def dup2_fd(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """Snapshot through dup2(vcpu_fd, 200) while an OUT is pending."""
    return _dup_scenario("dup2-fd", iterations, lambda v: v.dup(DUP_TARGET_FD, cloexec=False))


def dup3_fd(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """Snapshot through dup3(vcpu_fd, 201, O_CLOEXEC) while an OUT is pending."""
    return _dup_scenario("dup3-fd", iterations, lambda v: v.dup(DUP_TARGET_FD + 1))


def fd_reuse(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """Close a vCPU (and its VM) with an OUT pending; a new VM's vCPU gets the same fd number
    and is saved with nothing pending: no violations."""
    s = _Session("fd-reuse", iterations)
    try:
        program = guest.out_loop()
        old_vm = s.vm()
        old = s.vcpu(old_vm, 0, program, buggy=True)
        old_fd = old.fd
        _exit(old, program, 0)
        s.facts["abandoned_exit"] = old.pending.exit_name if old.pending else ""
        old_vm.close()  # vCPU fd (and kvm_run mapping) first, then the VM fd; nothing completed
        vcpu = s.vcpu(s.vm(), 0, program)
        s.facts.update(old_vcpu_fd=old_fd, new_vcpu_fd=vcpu.fd, fd_reused=vcpu.fd == old_fd)
        if vcpu.fd != old_fd:
            s.notes.append(f"new vCPU got fd {vcpu.fd}, not {old_fd}: some other fd was free")
        snapshot.save(vcpu)  # a vCPU that never ran: nothing can be pending
        for i in range(iterations):
            _correct_round(vcpu, program, i)
        return s.report()
    finally:
        s.close()


_MULTI_PROGRAMS: Final[tuple[Callable[[], GuestProgram], ...]] = (
    guest.out_loop, guest.mmio_read_loop, guest.rdmsr_loop,
    guest.in_loop, guest.mmio_write_loop, guest.wrmsr_loop,
)


def multi(iterations: int = DEFAULT_ITERATIONS, *, vms: int = 2, vcpus: int = 2
          ) -> ScenarioReport:
    """Several VMs x vCPUs, one thread per vCPU, all at once; odd vCPU ids snapshot
    mid-completion, even ones complete first. Programs rotate through every exit kind."""
    if vms < 1 or vcpus < 1:
        raise ValueError("--vms and --vcpus must be at least 1")
    s = _Session("multi", iterations)
    try:
        jobs: list[tuple[Vcpu, GuestProgram, bool]] = []
        for vm_index in range(vms):
            vm = s.vm(user_msr=True)
            for vcpu_id in range(vcpus):
                make = _MULTI_PROGRAMS[(vm_index * vcpus + vcpu_id) % len(_MULTI_PROGRAMS)]
                program = make().at(guest.LOAD_ADDR + 0x100 * vcpu_id)
                buggy = vcpu_id % 2 == 1
                jobs.append((s.vcpu(vm, vcpu_id, program, buggy=buggy), program, buggy))
        start = threading.Barrier(len(jobs))

        def body(vcpu: Vcpu, program: GuestProgram, buggy: bool) -> Callable[[], None]:
            def loop() -> None:
                start.wait(THREAD_TIMEOUT_S)
                for i in range(iterations):
                    if buggy:
                        _buggy_round(vcpu, program, i)
                    else:
                        _correct_round(vcpu, program, i)
            return loop

        workers = [_Worker(f"vm{v.vm.fd}-vcpu{v.vcpu_id}", body(v, p, b)) for v, p, b in jobs]
        for w in workers:
            w.start()
        for w in workers:
            w.finish()
        s.facts.update(vms=vms, vcpus_per_vm=vcpus)
        return s.report()
    finally:
        s.close()


def loop_io(iterations: int = LOOP_IO_ITERATIONS) -> ScenarioReport:
    """Benchmark: OUT exits completed by plain re-entry (KVM_RUN, KVM_RUN, ...), no saves."""
    s = _Session("loop-io", iterations)
    try:
        program = guest.out_loop()
        vcpu = s.vcpu(s.vm(), 0, program)
        t0 = time.monotonic_ns()
        for _ in range(iterations):
            if vcpu.run() != abi.KVM_EXIT_IO:
                raise VmmError(f"loop-io: unexpected {abi.exit_reason_name(vcpu.exit_reason)}")
        elapsed = time.monotonic_ns() - t0
        _complete(vcpu)  # leave nothing pending behind
        s.facts.update(loop_ns=elapsed, ns_per_exit=elapsed / iterations)
        return s.report()
    finally:
        s.close()


def process_exit(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """Two vCPUs (OUT and MMIO read) left with a completion pending; the VM stays open so the
    process exits with it (the CLI's --hold-before-exit keeps it alive a while first)."""
    s = _Session("process-exit", iterations)
    try:
        vm = s.vm()
        programs = (guest.out_loop(), guest.mmio_read_loop().at(guest.LOAD_ADDR + 0x100))
        for vcpu_id, program in enumerate(programs):
            vcpu = s.vcpu(vm, vcpu_id, program)
            for i in range(iterations):
                _exit(vcpu, program, i)  # the next run() completes the previous exit
        report = s.report(keep_open=True)
        if len(report.pending_at_end) != len(programs):
            raise VmmError("process-exit: expected every vCPU to be left pending")
        return report
    except BaseException:
        s.close()
        raise


# --- register peeks: read one register set to decode the exit, then complete at once -------
HCALL_MAGIC: Final = 0x4B43_5450  # "PTCK": the request block's tag, checked by the VMM
HCALL_STATUS: Final = 0x3C


def _decode_request(vcpu: Vcpu, vm: Vm) -> int:
    """The hypercall-like request: its block's address is only in RDI (KVM_GET_REGS); the
    reply goes into the block and the status into AL (the IN's answer). Returns the address."""
    rdi = int(vcpu.get_regs().rdi) & 0xFFFF
    tag, arg = struct.unpack("<II", vm.memory[0].read(rdi, 8))
    if tag != HCALL_MAGIC:
        raise VmmError(f"request block at {rdi:#x} holds {tag:#x}, expected {HCALL_MAGIC:#x}")
    vm.memory[0].write(rdi + 8, struct.pack("<I", arg * 2))
    vcpu.set_io_in_data(HCALL_STATUS)
    return rdi


def _peek_session(name: str, iterations: int, program: GuestProgram) -> tuple[_Session, Vm,
                                                                              Vcpu]:
    s = _Session(name, iterations)
    vm = s.vm()
    vm.memory[0].write(guest.HCALL_REQUEST_ADDR, struct.pack("<II", HCALL_MAGIC, 0))
    return s, vm, s.vcpu(vm, 0, program)


def peek_io(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """A hypercall-like port request: IN exit, KVM_GET_REGS to find the request block from
    RDI, reply, complete with immediate_exit; a full snapshot only after. Correct use of the
    ABI: every peek is an inspection, no violation."""
    s, vm, vcpu = _peek_session("peek-io", iterations, guest.hypercall_in_loop())
    try:
        for i in range(iterations):
            vm.memory[0].write(guest.HCALL_REQUEST_ADDR + 4, struct.pack("<I", i + 1))
            _exit(vcpu, guest.hypercall_in_loop(), i)
            rdi = _decode_request(vcpu, vm)
            _complete(vcpu)
            snap = snapshot.save(vcpu)  # after the completion: a clean snapshot
            if snap.regs.rax & 0xFF != HCALL_STATUS:
                raise VmmError(f"completed request left AL={snap.regs.rax & 0xFF:#x}")
            (reply,) = struct.unpack("<I", vm.memory[0].read(rdi + 8, 4))
            if reply != 2 * (i + 1):
                raise VmmError(f"request {i}: reply {reply}, expected {2 * (i + 1)}")
        return s.report()
    finally:
        s.close()


def peek_mmio(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """MMIO read exit, KVM_GET_REGS to look at the faulting context, answer, complete with
    immediate_exit, then snapshot: inspections only."""
    program = guest.mmio_read_loop()
    s = _Session("peek-mmio", iterations)
    try:
        vcpu = s.vcpu(s.vm(), 0, program)
        for i in range(iterations):
            _exit(vcpu, program, i)
            vcpu.get_regs()
            _complete(vcpu)
            _check_read_completed(vcpu, snapshot.save(vcpu), i, program)
        return s.report()
    finally:
        s.close()


def peek_events(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """IN exit, KVM_GET_VCPU_EVENTS alone (a VMM checking for a pending interrupt or NMI
    before injecting one), answer, complete: one kind of state other than the registers, never
    restored: inspections (the rule is one kind, whichever)."""
    program = guest.in_loop()
    s = _Session("peek-events", iterations)
    try:
        vcpu = s.vcpu(s.vm(), 0, program)
        for i in range(iterations):
            _exit(vcpu, program, i)
            vcpu.get_vcpu_events()
            _complete(vcpu)
            _check_read_completed(vcpu, snapshot.save(vcpu), i, program)
        return s.report()
    finally:
        s.close()


def _decode_then(name: str, iterations: int,
                 between: Callable[[Vcpu], object]) -> ScenarioReport:
    """The request loop: IN exit, decode it (KVM_GET_REGS), then ``between(vcpu)`` before the
    exit is completed."""
    s, vm, vcpu = _peek_session(name, iterations, guest.hypercall_in_loop())
    try:
        for i in range(iterations):
            _exit(vcpu, guest.hypercall_in_loop(), i)
            _decode_request(vcpu, vm)
            between(vcpu)
            _complete(vcpu)
        return s.report()
    finally:
        s.close()


def peek_then_snapshot(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """The request is decoded (KVM_GET_REGS), then the whole state saved before completing:
    the peek is part of a snapshot taken mid-completion (violations and a snapshot)."""
    return _decode_then("peek-then-snapshot", iterations, snapshot.save)


def peek_then_restore(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """MMIO read exit, KVM_GET_REGS, then KVM_SET_REGS of what was read before completing:
    the peek was read to be restored (violation), and the restore is one itself."""
    program = guest.mmio_read_loop()
    s = _Session("peek-then-restore", iterations)
    try:
        vcpu = s.vcpu(s.vm(), 0, program, buggy=True)
        for i in range(iterations):
            _exit(vcpu, program, i)
            vcpu.set_regs(vcpu.get_regs())
            _complete(vcpu)
        return s.report()
    finally:
        s.close()


def peek_then_close(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """IN exit, KVM_GET_REGS, then the vCPU (and its VM) closed without completing: one kind
    of state read and never restored, the window ends with the vCPU (an inspection)."""
    s = _Session("peek-then-close", iterations)
    try:
        for i in range(iterations):
            vm = s.vm()
            vm.memory[0].write(guest.HCALL_REQUEST_ADDR, struct.pack("<II", HCALL_MAGIC, 0))
            vcpu = s.vcpu(vm, 0, guest.hypercall_in_loop(), buggy=True)
            _exit(vcpu, guest.hypercall_in_loop(), i)
            _decode_request(vcpu, vm)
            vm.close()
        return s.report()
    finally:
        s.close()


def peek_two_vcpus(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """One thread runs two vCPUs to an IN exit each, then reads both vCPUs' registers before
    completing either: per window one kind of state, nothing restored (inspections: registers
    alone cannot restore a VM, whichever thread reads them)."""
    s = _Session("peek-two-vcpus", iterations)
    try:
        vm = s.vm()
        programs = [guest.in_loop().at(guest.LOAD_ADDR + 0x100 * n) for n in range(2)]
        vcpus = [s.vcpu(vm, n, p, buggy=True) for n, p in enumerate(programs)]
        for i in range(iterations):
            for vcpu, program in zip(vcpus, programs, strict=True):
                _exit(vcpu, program, i)
            for vcpu in vcpus:
                vcpu.get_regs()
            for vcpu in vcpus:
                _complete(vcpu)
        return s.report()
    finally:
        s.close()


def peek_then_exit(iterations: int = DEFAULT_ITERATIONS) -> ScenarioReport:
    """IN exit, KVM_GET_REGS, and the process exits with the exit still pending (the VM stays
    open until then): one kind read, nothing restored, an inspection judged at process exit."""
    s, vm, vcpu = _peek_session("peek-then-exit", iterations, guest.hypercall_in_loop())
    try:
        for i in range(iterations):
            _exit(vcpu, guest.hypercall_in_loop(), i)
            _decode_request(vcpu, vm)
            if i + 1 < iterations:
                _complete(vcpu)
        return s.report(keep_open=True)
    except BaseException:
        s.close()
        raise


PEEK_HOLD_S: Final = 1.5  # longer than the tracer's default idle time (1 s)


def peek_idle(iterations: int = 1) -> ScenarioReport:
    """IN exit, KVM_GET_REGS, then the exit left pending for PEEK_HOLD_S (longer than the
    tracer's --snapshot-idle) before completing: the kernel judges the window when it closes,
    however long it stays open, so the peek is an inspection, never an idle-time violation."""
    report = _decode_then("peek-idle", iterations, lambda _vcpu: time.sleep(PEEK_HOLD_S))
    report.facts["held_s"] = PEEK_HOLD_S
    return report


ScenarioFn = Callable[..., ScenarioReport]
SCENARIOS: Final[dict[str, ScenarioFn]] = {
    "correct-io": correct_io,
    "correct-mmio": correct_mmio,
    "correct-msr": correct_msr,
    "buggy-io-out": buggy_io_out,
    "buggy-io-in": buggy_io_in,
    "buggy-mmio-write": buggy_mmio_write,
    "buggy-mmio-read": buggy_mmio_read,
    "buggy-rdmsr": buggy_rdmsr,
    "buggy-wrmsr": buggy_wrmsr,
    "buggy-other-thread": buggy_other_thread,
    "save-while-running": save_while_running,
    "save-while-running-kicked": save_while_running_kicked,
    "restore-mmio": restore_mmio,
    "restore-pio": restore_pio,
    "restore-pio-in": restore_pio_in,
    "restore-pio-rep-ins": restore_pio_rep_ins,
    "restore-pio-rep-outs": restore_pio_rep_outs,
    "hlt": hlt,
    "eintr": eintr,
    "port-7e": port_7e,
    "port-7e-quirk-disabled": port_7e_quirk_disabled,
    "dup-fd": dup_fd,
    "dup2-fd": dup2_fd,
    "dup3-fd": dup3_fd,
    "fd-reuse": fd_reuse,
    "multi": multi,
    "loop-io": loop_io,
    "process-exit": process_exit,
    "peek-io": peek_io,
    "peek-mmio": peek_mmio,
    "peek-events": peek_events,
    "peek-then-snapshot": peek_then_snapshot,
    "peek-then-restore": peek_then_restore,
    "peek-then-close": peek_then_close,
    "peek-two-vcpus": peek_two_vcpus,
    "peek-then-exit": peek_then_exit,
    "peek-idle": peek_idle,
}


def describe(name: str) -> str:
    doc = SCENARIOS[name].__doc__ or ""
    return " ".join(doc.split())


def run_scenario(name: str, iterations: int | None = None, *, vms: int = 2, vcpus: int = 2
                 ) -> ScenarioReport:
    """Run scenario ``name``; ``iterations`` None means the scenario's default."""
    fn = SCENARIOS.get(name)
    if fn is None:
        raise KeyError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    args: dict[str, int] = {} if iterations is None else {"iterations": iterations}
    if fn is multi:
        args.update(vms=vms, vcpus=vcpus)
    return fn(**args)
