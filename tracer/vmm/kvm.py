"""Thin typed bindings over /dev/kvm for the built-in test VMM (x86_64, no in-kernel irqchip).

The daemon's probes watch vCPU ioctls, so this module is careful to issue exactly the ioctls its
callers ask for and to say so: every ioctl on a vCPU fd is appended to a shared
:attr:`Kvm.ioctl_log` just before it is issued, every KVM_RUN outcome to :attr:`Kvm.run_log`,
and every save/restore ioctl issued while the vCPU's last exit still awaits its completion to
:attr:`Kvm.mid_completion` (the VMM's ground truth for what a tracer must report).

A save/restore ioctl another thread issues while KVM_RUN is in flight on the same vCPU blocks on
KVM's vcpu->mutex until that KVM_RUN returns, and then runs against the state it left: if the run
ended in an exit that needs completion, the ioctl runs mid-completion although nothing was
pending when it was issued. Such ioctls are logged to :attr:`Kvm.queued_ioctls` once they return
and, when the VMM's clocks show they returned after the KVM_RUN did, recorded in
:attr:`Kvm.mid_completion` against the exit that KVM_RUN returned (see :class:`QueuedIoctl`).

KVM_RUN itself is issued through libc's ``ioctl`` rather than ``fcntl.ioctl``: since CPython 3.14
(gh-132742) ``fcntl.ioctl`` retries a call that fails with EINTR, which would turn an
immediate-exit or signal-kicked KVM_RUN into a fresh KVM_RUN (or a busy loop); libc hands the
-EINTR back, as ``fcntl.ioctl`` itself does on 3.11-3.13.

Two details matter for the probes: the kvm_run page is mapped with libc ``mmap`` rather than
Python's ``mmap.mmap``, which would ``dup()`` the vCPU fd behind our back (an extra vCPU fd the
tracer would see and, in the fd-reuse scenario, a stolen fd number); and fds are plain ints
that Python never closes on its own, so a process that exits with a VM open leaves the closing
to the kernel, as a crashing VMM would.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NamedTuple, TypeVar

from tracer import abi
from tracer.vmm import structs

# ABI numbers live in tracer.abi, where the header test checks them.
KVM_API_VERSION: Final = abi.KVM_API_VERSION
KVM_CAP_X86_USER_SPACE_MSR: Final = abi.KVM_CAP_X86_USER_SPACE_MSR
KVM_MSR_EXIT_REASON_INVAL: Final = abi.KVM_MSR_EXIT_REASON_INVAL
KVM_MSR_EXIT_REASON_UNKNOWN: Final = abi.KVM_MSR_EXIT_REASON_UNKNOWN
KVM_MSR_EXIT_REASON_FILTER: Final = abi.KVM_MSR_EXIT_REASON_FILTER
# Three pages KVM reserves for the real-mode TSS on VMX without unrestricted guest; kept below
# 2 GiB because fcntl.ioctl passes integer arguments as a C int.
TSS_ADDR: Final = 0x7FFF_D000

# Exits after which KVM finishes the instruction only on the next KVM_RUN (facts file, x86).
# KVM_EXIT_HYPERV is pending only for hypercalls, see :func:`_needs_completion`.
COMPLETION_EXITS: Final = frozenset(
    abi.EXIT_REASON_BY_NAME[name]
    for name in (
        "KVM_EXIT_IO",
        "KVM_EXIT_HYPERCALL",
        "KVM_EXIT_MMIO",
        "KVM_EXIT_OSI",
        "KVM_EXIT_PAPR_HCALL",
        "KVM_EXIT_EPR",
        "KVM_EXIT_X86_RDMSR",
        "KVM_EXIT_X86_WRMSR",
        "KVM_EXIT_XEN",
        "KVM_EXIT_TDX",
        "KVM_EXIT_HYPERV",
    )
)
KVM_EXIT_INTR: Final = abi.EXIT_REASON_BY_NAME["KVM_EXIT_INTR"]
_L: Final = abi.KVM_RUN_LAYOUT


class KvmUnavailableError(RuntimeError):
    """/dev/kvm is missing, not permitted, or not a usable KVM."""


class VmmError(RuntimeError):
    """KVM did something the VMM did not expect (an unexpected exit, a failed ioctl...)."""


class LoggedIoctl(NamedTuple):
    """One ioctl issued on a vCPU fd; ``ts_ns`` is time.monotonic_ns() just before issuing it
    (the clock of bpf_ktime_get_ns)."""

    ts_ns: int
    tid: int
    fd: int
    name: str


class RunRecord(NamedTuple):
    """What one KVM_RUN returned. ``ts_ns`` equals that of the matching :class:`LoggedIoctl`."""

    ts_ns: int
    tid: int
    fd: int
    vcpu_id: int
    immediate_exit: bool
    outcome: str  # exit reason name; "KVM_EXIT_INTR" for -EINTR; "errno:N" for other failures


@dataclass(frozen=True)
class PioExit:
    port: int
    direction: str  # "in" | "out"
    size: int
    count: int
    data_offset: int


@dataclass(frozen=True)
class MmioExit:
    gpa: int
    length: int
    is_write: bool
    data: bytes


@dataclass(frozen=True)
class MsrExit:
    index: int
    is_write: bool
    reason: int  # KVM_MSR_EXIT_REASON_*
    data: int


ExitAccess = PioExit | MmioExit | MsrExit


@dataclass(frozen=True)
class PendingExit:
    """An exit whose instruction KVM completes only when KVM_RUN is entered again."""

    exit_reason: int
    access: ExitAccess | None
    since_ns: int  # time.monotonic_ns() right after KVM_RUN returned

    @property
    def exit_name(self) -> str:
        return abi.exit_reason_name(self.exit_reason)


@dataclass(frozen=True)
class MidCompletionIoctl:
    """A save/restore ioctl this VMM issued while ``pending`` was still to be completed."""

    ts_ns: int
    tid: int
    fd: int
    vm_fd: int
    vcpu_id: int
    name: str
    kind: str  # "save" | "restore"
    pending: PendingExit
    quirk_7e_disabled: bool


@dataclass(frozen=True)
class RunEnd:
    """How a KVM_RUN that other threads' state ioctls queued behind came back."""

    run_ts_ns: int  # the KVM_RUN's LoggedIoctl ts_ns
    returned_ns: int  # time.monotonic_ns() right after the ioctl returned
    outcome: str  # as RunRecord.outcome
    pending: PendingExit | None  # the exit it left to complete, if any
    progress: int | None = None  # Vcpu.progress() once it returned (the guest stopped)


QUEUE_AFTER_RUN: Final = "after-run"
QUEUE_BEFORE_RUN: Final = "before-run"
QUEUE_AMBIGUOUS: Final = "ambiguous"
# How long a queued ioctl that returned waits for its KVM_RUN's return to be published.
QUEUE_TIMEOUT_S: Final = 30.0


@dataclass(frozen=True)
class QueuedIoctl:
    """A save/restore ioctl issued on a vCPU while a KVM_RUN was in flight on it.

    KVM_RUN holds vcpu->mutex until it returns, so the ioctl normally blocks and runs right
    after that KVM_RUN, against the exit it returned. ``order`` is what the VMM's clocks show:

    - ``after-run``: it returned after the KVM_RUN returned (to within the slack below) and
      no later KVM_RUN was issued before it returned; if the run left a completion pending,
      the ioctl is also recorded in :attr:`Kvm.mid_completion` against that exit;
    - ``before-run``: it slipped in before KVM_RUN took the mutex (nothing recorded: a
      scenario relying on the blocking must fail). With a guest progress counter
      (:attr:`Vcpu.progress`): the counter read right after the ioctl returned is not the one
      the guest stopped at when that KVM_RUN returned (the guest was still to run). Without
      one, from the clocks: it returned before the KVM_RUN did by more than
      :func:`clock_slack_ns`, which a loaded host can exceed (the vCPU thread waits for a CPU
      after KVM_RUN returned), so scenarios that queue ioctls give the counter;
    - ``ambiguous``: another KVM_RUN was issued before it returned, which may have completed
      the exit first (nothing recorded).

    The slack: both return times are taken once the thread has the GIL back, and the thread
    that gets it first is not always the one KVM let go first (the blocked ioctl, handed
    vcpu->mutex, often returns while the vCPU thread is still on its way out of KVM_RUN, e.g.
    delivering the signal that kicked it). Seen here: the ioctl's time up to ~120 us below the
    KVM_RUN's after a signal kick. A slipped ioctl returns while the KVM_RUN still has its whole
    run ahead, so callers keep that run well above the slack.
    """

    ts_ns: int  # just before issuing; equals the LoggedIoctl's ts_ns
    returned_ns: int  # just after it returned
    tid: int
    fd: int
    vcpu_id: int
    name: str
    kind: str  # "save" | "restore"
    run_ts_ns: int  # the in-flight KVM_RUN's ts_ns
    run_returned_ns: int
    run_outcome: str
    order: str  # QUEUE_AFTER_RUN | QUEUE_BEFORE_RUN | QUEUE_AMBIGUOUS
    progress_seen: int | None = None  # Vcpu.progress() right after it returned
    progress_at_run_end: int | None = None  # Vcpu.progress() once the KVM_RUN returned

    @property
    def blocked_ns(self) -> int:
        return self.returned_ns - self.ts_ns

    @property
    def after_run_ns(self) -> int:
        """Its return time minus its KVM_RUN's (negative within the clocks' slack)."""
        return self.returned_ns - self.run_returned_ns


def clock_slack_ns() -> int:
    """How late a thread may time the return of a blocking call: it first has to get the GIL
    back, which another thread holds for at most a switch interval before it must let go."""
    return int(2 * sys.getswitchinterval() * 1e9)


# --- libc mmap: no hidden dup() of the vCPU fd ------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.ioctl.restype = ctypes.c_int
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
_PROT_RW: Final = 0x1 | 0x2
_MAP_SHARED: Final = 0x01
_MAP_PRIVATE_ANON: Final = 0x02 | 0x20
_MAP_NORESERVE: Final = 0x4000
_MAP_FAILED: Final = ctypes.c_void_p(-1).value


class Mapping:
    """A libc mapping exposed as a writable ctypes byte array."""

    def __init__(self, size: int, fd: int = -1) -> None:
        flags = _MAP_SHARED if fd >= 0 else _MAP_PRIVATE_ANON | _MAP_NORESERVE
        addr = _libc.mmap(None, size, _PROT_RW, flags, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of {size} bytes (fd {fd}): {os.strerror(err)}")
        self.addr: int = addr
        self.size = size
        self.buf: ctypes.Array[ctypes.c_uint8] | None = (ctypes.c_uint8 * size).from_address(addr)

    @property
    def view(self) -> ctypes.Array[ctypes.c_uint8]:
        if self.buf is None:
            raise VmmError("mapping used after munmap")
        return self.buf

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"write of {len(data)} bytes at {offset:#x} outside {self.size:#x}")
        ctypes.memmove(self.addr + offset, data, len(data))

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self.size:
            raise ValueError(f"read of {length} bytes at {offset:#x} outside {self.size:#x}")
        return ctypes.string_at(self.addr + offset, length)

    def close(self) -> None:
        if self.buf is not None:
            self.buf = None
            _libc.munmap(self.addr, self.size)


def _ioctl_number(name: str) -> int:
    return abi.IOCTL_BY_NAME[name].number


def _ioctl(fd: int, name: str, arg: int | ctypes.Structure) -> int:
    """An integer argument is passed by value; a struct by address, KVM writing into it in place."""
    if isinstance(arg, int):
        return fcntl.ioctl(fd, _ioctl_number(name), arg)
    result: int = fcntl.ioctl(fd, _ioctl_number(name), arg, True)
    return result


def _ioctl_no_retry(fd: int, name: str, arg: int = 0) -> int:
    """ioctl with an integer argument through libc: an EINTR failure raises OSError(EINTR) on
    every Python version (ctypes drops the GIL for the call, as fcntl.ioctl does)."""
    ret: int = _libc.ioctl(fd, _ioctl_number(name), arg)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


_Buf = TypeVar("_Buf", bound=ctypes.Structure)


class Kvm:
    """The /dev/kvm system fd plus the logs shared by every VM and vCPU created from it."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as err:
            raise KvmUnavailableError(f"{path} does not exist: no KVM on this machine") from err
        except PermissionError as err:
            msg = f"{path}: permission denied (need root or the kvm group)"
            raise KvmUnavailableError(msg) from err
        except OSError as err:
            raise KvmUnavailableError(f"{path}: {err.strerror}") from err
        self.path = path
        self.ioctl_log: list[LoggedIoctl] = []
        self.run_log: list[RunRecord] = []
        self.mid_completion: list[MidCompletionIoctl] = []
        self.queued_ioctls: list[QueuedIoctl] = []
        # (vm fd, vCPU id, PendingExit.since_ns) -> ts_ns of the KVM_RUN that completed it; a
        # window missing here was never completed (fd closed, or the process exited with it).
        self.completed_windows: dict[tuple[int, int, int], int] = {}
        self.vms: list[Vm] = []
        version = self._sys_ioctl("KVM_GET_API_VERSION")
        if version != KVM_API_VERSION:
            self.close()
            raise KvmUnavailableError(f"{path}: KVM API version {version}, need {KVM_API_VERSION}")
        self.vcpu_mmap_size = self._sys_ioctl("KVM_GET_VCPU_MMAP_SIZE")

    def _sys_ioctl(self, name: str, arg: int = 0) -> int:
        return fcntl.ioctl(self.fd, _ioctl_number(name), arg)

    def check_extension(self, cap: int) -> int:
        return self._sys_ioctl("KVM_CHECK_EXTENSION", cap)

    def create_vm(self) -> Vm:
        vm = Vm(self, self._sys_ioctl("KVM_CREATE_VM", 0))
        self.vms.append(vm)
        return vm

    def close(self) -> None:
        for vm in list(self.vms):
            vm.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Vm:
    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.memory: list[Mapping] = []
        self.vcpus: list[Vcpu] = []
        self.quirks_disabled = 0
        self._slots = 0

    def _ioctl(self, name: str, arg: int | ctypes.Structure = 0) -> int:
        return _ioctl(self.fd, name, arg)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (some answers, e.g. quirk masks, are per VM)."""
        return self._ioctl("KVM_CHECK_EXTENSION", cap)

    def add_memory(self, gpa: int, size: int) -> Mapping:
        """Back [gpa, gpa+size) with fresh anonymous memory in the next free slot."""
        mem = Mapping(size)
        region = structs.UserspaceMemoryRegion(self._slots, 0, gpa, size, mem.addr)
        try:
            self._ioctl("KVM_SET_USER_MEMORY_REGION", region)
        except OSError:
            mem.close()
            raise
        self._slots += 1
        self.memory.append(mem)
        return mem

    def set_tss_addr(self, addr: int = TSS_ADDR) -> None:
        self._ioctl("KVM_SET_TSS_ADDR", addr)

    def enable_cap(self, cap: int, *args: int) -> None:
        req = structs.EnableCap(cap=cap)
        for i, value in enumerate(args):
            req.args[i] = value
        self._ioctl("KVM_ENABLE_CAP", req)

    def enable_user_space_msr(
        self, reasons: int = KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_INVAL
    ) -> None:
        """Send RDMSR/WRMSR of MSRs KVM does not know to userspace instead of injecting #GP."""
        self.enable_cap(KVM_CAP_X86_USER_SPACE_MSR, reasons)

    def disable_quirks(self, mask: int) -> None:
        """Prefer KVM_CAP_DISABLE_QUIRKS2 (it rejects unknown quirks); else the old cap."""
        supported = self.check_extension(abi.KVM_CAP_DISABLE_QUIRKS2)
        if supported and (supported & mask) == mask:
            self.enable_cap(abi.KVM_CAP_DISABLE_QUIRKS2, mask)
        elif self.check_extension(abi.KVM_CAP_DISABLE_QUIRKS):
            self.enable_cap(abi.KVM_CAP_DISABLE_QUIRKS, mask)
        else:
            raise VmmError(f"KVM cannot disable quirks {mask:#x}")
        self.quirks_disabled |= mask

    @property
    def quirk_7e_disabled(self) -> bool:
        return bool(self.quirks_disabled & abi.KVM_X86_QUIRK_OUT_7E_INC_RIP)

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        fd = self._ioctl("KVM_CREATE_VCPU", vcpu_id)
        try:
            vcpu = Vcpu(self, vcpu_id, fd)
        except OSError:
            os.close(fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        """vCPU fds first, then the VM fd, and only then the memory KVM may still reference."""
        for vcpu in list(self.vcpus):
            vcpu.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for mem in self.memory:
            mem.close()
        self.memory.clear()
        if self in self.kvm.vms:
            self.kvm.vms.remove(self)


class Vcpu:
    """One vCPU: its fd, its kvm_run page and the completion it may owe the guest."""

    def __init__(self, vm: Vm, vcpu_id: int, fd: int) -> None:
        self.vm = vm
        self.vcpu_id = vcpu_id
        self.fd = fd
        # Lifetime in monotonic ns, so a reader of the logs can tell apart two vCPUs that got
        # the same fd number one after the other.
        self.created_ns = time.monotonic_ns()
        self.closed_ns: int | None = None
        self.run_page = Mapping(vm.kvm.vcpu_mmap_size, fd)
        self.pending: PendingExit | None = None
        self.dup_fds: list[int] = []  # open duplicates, closed with the vCPU
        self.dup_history: list[int] = []  # every duplicate ever made, for reports
        self._log = vm.kvm.ioctl_log
        # State ioctls go through this fd; dup-fd tests point it at a duplicate.
        self.state_fd = fd
        # KVM_RUN in flight (its ts_ns) and what queued state ioctls need to know about it;
        # all guarded by _run_cond, which also publishes run ends to the queued ioctls.
        self.run_in_flight: int | None = None
        self._last_run_ns = 0  # ts_ns of the latest KVM_RUN issued
        self._run_cond = threading.Condition()
        self._queued_behind: dict[int, int] = {}  # run ts_ns -> queued ioctls not settled yet
        self._run_ends: dict[int, RunEnd] = {}
        # A counter the guest moves while it runs (its heartbeat in guest memory), if the
        # scenario has one: orders queued state ioctls by the guest's state, not by clocks.
        self.progress: Callable[[], int] | None = None

    # --- raw ioctl plumbing --------------------------------------------------------------
    def _issue(self, fd: int, name: str, arg: int | ctypes.Structure, ts: int, tid: int) -> int:
        self._log.append(LoggedIoctl(ts, tid, fd, name))
        return _ioctl(fd, name, arg)

    def _state(self, name: str, arg: int | ctypes.Structure = 0) -> int:
        kind = abi.IOCTL_BY_NAME[name].kind
        pending = self.pending
        fd = self.state_fd
        ts = time.monotonic_ns()
        tid = threading.get_native_id()
        if kind in (abi.IoctlKind.SAVE, abi.IoctlKind.RESTORE):
            with self._run_cond:
                behind = self.run_in_flight
                if behind is not None:
                    self._queued_behind[behind] = self._queued_behind.get(behind, 0) + 1
                else:
                    pending = self.pending
            if behind is not None:
                return self._state_behind_run(behind, name, kind.value, arg, ts, tid)
        if pending is not None and kind in (abi.IoctlKind.SAVE, abi.IoctlKind.RESTORE):
            self._record_mid_completion(ts, tid, fd, name, kind.value, pending)
        return self._issue(fd, name, arg, ts, tid)

    def _record_mid_completion(self, ts: int, tid: int, fd: int, name: str, kind: str,
                               pending: PendingExit) -> None:
        self.vm.kvm.mid_completion.append(MidCompletionIoctl(
            ts_ns=ts, tid=tid, fd=fd, vm_fd=self.vm.fd, vcpu_id=self.vcpu_id, name=name,
            kind=kind, pending=pending, quirk_7e_disabled=self.vm.quirk_7e_disabled))

    def _state_behind_run(self, run_ts: int, name: str, kind: str,
                          arg: int | ctypes.Structure, ts: int, tid: int) -> int:
        """A state ioctl issued while the KVM_RUN ``run_ts`` is in flight: issue it (KVM blocks
        it until that KVM_RUN returns), then settle it against what the KVM_RUN returned."""
        fd = self.state_fd
        try:
            result = self._issue(fd, name, arg, ts, tid)
            seen = self.progress() if self.progress is not None else None
        except BaseException:
            with self._run_cond:
                self._unqueue(run_ts)
            raise
        returned = time.monotonic_ns()
        with self._run_cond:
            try:
                if not self._run_cond.wait_for(lambda: run_ts in self._run_ends,
                                               QUEUE_TIMEOUT_S):
                    raise VmmError(f"{name} issued during KVM_RUN on vCPU {self.vcpu_id}: that "
                                   f"KVM_RUN did not return within {QUEUE_TIMEOUT_S:.0f} s")
                end = self._run_ends[run_ts]
                if seen is not None and end.progress is not None:
                    slipped = seen != end.progress  # the guest had yet to run to its exit
                else:
                    slipped = returned < end.returned_ns - clock_slack_ns()
                if slipped:
                    order = QUEUE_BEFORE_RUN
                elif run_ts < self._last_run_ns < returned:
                    order = QUEUE_AMBIGUOUS
                else:
                    order = QUEUE_AFTER_RUN
            finally:
                self._unqueue(run_ts)
        kvm = self.vm.kvm
        kvm.queued_ioctls.append(QueuedIoctl(ts, returned, tid, fd, self.vcpu_id, name, kind,
                                             run_ts, end.returned_ns, end.outcome, order, seen,
                                             end.progress))
        if order == QUEUE_AFTER_RUN and end.pending is not None:
            self._record_mid_completion(ts, tid, fd, name, kind, end.pending)
        return result

    def _unqueue(self, run_ts: int) -> None:
        """Under _run_cond: one queued ioctl of ``run_ts`` is settled."""
        left = self._queued_behind.get(run_ts, 0) - 1
        if left > 0:
            self._queued_behind[run_ts] = left
        else:
            self._queued_behind.pop(run_ts, None)
            self._run_ends.pop(run_ts, None)

    def _end_run(self, ts: int, returned: int, outcome: str, pending: PendingExit | None
                 ) -> None:
        """The KVM_RUN ``ts`` returned: publish its pending exit, and its end to queued ioctls."""
        with self._run_cond:
            self.pending = pending
            if self.run_in_flight == ts:
                self.run_in_flight = None
            if ts in self._queued_behind:
                progress = self.progress() if self.progress is not None else None
                self._run_ends[ts] = RunEnd(ts, returned, outcome, pending, progress)
                self._run_cond.notify_all()

    def _get(self, name: str, buf: _Buf) -> _Buf:
        self._state(name, buf)
        return buf

    # --- running -------------------------------------------------------------------------
    def run(self) -> int:
        """One KVM_RUN. Returns the exit reason; -EINTR comes back as KVM_EXIT_INTR (10), which
        is what KVM itself stores in kvm_run.exit_reason then."""
        page = self.run_page.view
        immediate = bool(page[_L.immediate_exit])
        ts = time.monotonic_ns()
        tid = threading.get_native_id()
        # Entering KVM_RUN completes whatever was pending, whatever KVM_RUN returns.
        if self.pending is not None:
            key = (self.vm.fd, self.vcpu_id, self.pending.since_ns)
            self.vm.kvm.completed_windows[key] = ts
        self.pending = None
        with self._run_cond:
            self.run_in_flight = ts
            self._last_run_ns = ts
        self._log.append(LoggedIoctl(ts, tid, self.fd, "KVM_RUN"))
        try:
            _ioctl_no_retry(self.fd, "KVM_RUN")
        except OSError as err:
            returned = time.monotonic_ns()
            outcome = "KVM_EXIT_INTR" if err.errno == errno.EINTR else f"errno:{err.errno}"
            self._end_run(ts, returned, outcome, None)
            self._record_run(ts, tid, immediate, outcome)
            if err.errno != errno.EINTR:
                raise VmmError(f"KVM_RUN on vCPU {self.vcpu_id}: {err.strerror}") from err
            return KVM_EXIT_INTR
        except BaseException:
            self._end_run(ts, time.monotonic_ns(), "interrupted", None)
            raise
        returned = time.monotonic_ns()
        reason: int = struct.unpack_from("<I", page, _L.exit_reason)[0]
        pending = None
        if _needs_completion(reason, page):
            pending = PendingExit(reason, self.exit_access(reason), time.monotonic_ns())
        self._end_run(ts, returned, abi.exit_reason_name(reason), pending)
        self._record_run(ts, tid, immediate, abi.exit_reason_name(reason))
        return reason

    def _record_run(self, ts: int, tid: int, immediate: bool, outcome: str) -> None:
        self.vm.kvm.run_log.append(RunRecord(ts, tid, self.fd, self.vcpu_id, immediate, outcome))

    def complete_pending(self) -> int:
        """Finish the pending instruction without running guest code: KVM_RUN with
        kvm_run->immediate_exit = 1, which must come back -EINTR. Returns KVM_EXIT_INTR, or the
        exit reason if the completion itself exited again (then that exit is pending)."""
        page = self.run_page.view
        page[_L.immediate_exit] = 1
        try:
            return self.run()
        finally:
            page[_L.immediate_exit] = 0

    # --- the exit union ------------------------------------------------------------------
    @property
    def exit_reason(self) -> int:
        value: int = struct.unpack_from("<I", self.run_page.view, _L.exit_reason)[0]
        return value

    def exit_access(self, reason: int | None = None) -> ExitAccess | None:
        """Decode the access of the last exit from kvm_run (None for exits without one)."""
        page = self.run_page.view
        reason = self.exit_reason if reason is None else reason
        if reason == abi.KVM_EXIT_IO:
            direction, size, port, count = struct.unpack_from("<BBHI", page, _L.io_direction)
            (offset,) = struct.unpack_from("<Q", page, _L.io_data_offset)
            return PioExit(port, "out" if direction == abi.KVM_EXIT_IO_OUT else "in", size,
                           count, offset)
        if reason == abi.KVM_EXIT_MMIO:
            (gpa,) = struct.unpack_from("<Q", page, _L.mmio_phys_addr)
            (length,) = struct.unpack_from("<I", page, _L.mmio_len)
            is_write = bool(page[_L.mmio_is_write])
            data = bytes(page[_L.mmio_data : _L.mmio_data + min(length, 8)])
            return MmioExit(gpa, length, is_write, data)
        if reason in (abi.KVM_EXIT_X86_RDMSR, abi.KVM_EXIT_X86_WRMSR):
            (msr_reason,) = struct.unpack_from("<I", page, _L.msr_reason)
            (index,) = struct.unpack_from("<I", page, _L.msr_index)
            (data,) = struct.unpack_from("<Q", page, _L.msr_data)
            return MsrExit(index, reason == abi.KVM_EXIT_X86_WRMSR, msr_reason, data)
        return None

    def io_out_data(self) -> bytes:
        """The bytes an OUT exit wrote (size*count at data_offset in the kvm_run mapping)."""
        access = self.exit_access(abi.KVM_EXIT_IO)
        assert isinstance(access, PioExit)
        return self.run_page.read(access.data_offset, access.size * access.count)

    def set_io_in_data(self, value: int) -> None:
        """Answer an IN exit: the result goes where data_offset points, once per repetition."""
        access = self.exit_access(abi.KVM_EXIT_IO)
        if not isinstance(access, PioExit) or access.direction != "in":
            raise VmmError("set_io_in_data without a pending IN exit")
        chunk = (value & ((1 << (8 * access.size)) - 1)).to_bytes(access.size, "little")
        self.run_page.write(access.data_offset, chunk * access.count)

    def set_mmio_read_data(self, value: int) -> None:
        access = self.exit_access(abi.KVM_EXIT_MMIO)
        if not isinstance(access, MmioExit) or access.is_write:
            raise VmmError("set_mmio_read_data without a pending MMIO read")
        length = min(access.length, 8)
        data = (value & ((1 << (8 * length)) - 1)).to_bytes(length, "little")
        self.run_page.write(_L.mmio_data, data.ljust(8, b"\0"))

    def set_msr_result(self, data: int = 0, error: int = 0) -> None:
        """Answer an RDMSR/WRMSR exit: ``error`` != 0 makes KVM inject #GP on completion."""
        if self.exit_reason not in (abi.KVM_EXIT_X86_RDMSR, abi.KVM_EXIT_X86_WRMSR):
            raise VmmError("set_msr_result without a pending MSR exit")
        struct.pack_into("<B", self.run_page.view, _L.msr_error, error)
        if self.exit_reason == abi.KVM_EXIT_X86_RDMSR:
            struct.pack_into("<Q", self.run_page.view, _L.msr_data, data)

    # --- state: getters are saves, setters restores --------------------------------------
    def get_regs(self) -> structs.Regs:
        return self._get("KVM_GET_REGS", structs.Regs())

    def set_regs(self, regs: structs.Regs) -> None:
        self._state("KVM_SET_REGS", regs)

    def get_sregs(self) -> structs.Sregs:
        return self._get("KVM_GET_SREGS", structs.Sregs())

    def set_sregs(self, sregs: structs.Sregs) -> None:
        self._state("KVM_SET_SREGS", sregs)

    def get_msr(self, index: int) -> int:
        """KVM_GET_MSRS with one entry; KVM returns how many entries it could read."""
        msrs = structs.Msrs1(nmsrs=1, entry=structs.MsrEntry(index=index))
        if self._state("KVM_GET_MSRS", msrs) != 1:
            raise VmmError(f"KVM_GET_MSRS could not read MSR {index:#x}")
        value: int = msrs.entry.data
        return value

    def set_msr(self, index: int, value: int) -> None:
        msrs = structs.Msrs1(nmsrs=1, entry=structs.MsrEntry(index=index, data=value))
        if self._state("KVM_SET_MSRS", msrs) != 1:
            raise VmmError(f"KVM_SET_MSRS could not write MSR {index:#x}")

    def get_vcpu_events(self) -> structs.VcpuEvents:
        return self._get("KVM_GET_VCPU_EVENTS", structs.VcpuEvents())

    def set_vcpu_events(self, events: structs.VcpuEvents) -> None:
        self._state("KVM_SET_VCPU_EVENTS", events)

    def get_mp_state(self) -> int:
        value: int = self._get("KVM_GET_MP_STATE", structs.MpState()).mp_state
        return value

    def set_mp_state(self, mp_state: int) -> None:
        self._state("KVM_SET_MP_STATE", structs.MpState(mp_state))

    def get_fpu(self) -> structs.Fpu:
        return self._get("KVM_GET_FPU", structs.Fpu())

    def set_fpu(self, fpu: structs.Fpu) -> None:
        self._state("KVM_SET_FPU", fpu)

    def get_xcrs(self) -> structs.Xcrs:
        return self._get("KVM_GET_XCRS", structs.Xcrs())

    def set_xcrs(self, xcrs: structs.Xcrs) -> None:
        self._state("KVM_SET_XCRS", xcrs)

    def get_debugregs(self) -> structs.DebugRegs:
        return self._get("KVM_GET_DEBUGREGS", structs.DebugRegs())

    def set_debugregs(self, dregs: structs.DebugRegs) -> None:
        self._state("KVM_SET_DEBUGREGS", dregs)

    def get_xsave(self) -> structs.Xsave:
        return self._get("KVM_GET_XSAVE", structs.Xsave())

    def set_xsave(self, xsave: structs.Xsave) -> None:
        self._state("KVM_SET_XSAVE", xsave)

    def get_tsc_khz(self) -> int:
        return self._state("KVM_GET_TSC_KHZ")

    def get_cpuid2(self) -> structs.Cpuid2:
        """The CPUID table set on this vCPU (empty here: real-mode guests need none)."""
        return self._get("KVM_GET_CPUID2", structs.Cpuid2(nent=structs.CPUID_MAX_ENTRIES))

    # --- setup and teardown --------------------------------------------------------------
    def setup_real_mode(self, entry: int, stack: int = 0) -> None:
        """Flat real mode: every segment base 0 / selector 0, CS:IP = 0:entry.

        KVM resets CS to F000:FFF0 with base 0xFFFF0000; we replace that so the program at
        ``entry`` (below 64 KiB) runs without a BIOS."""
        sregs = self.get_sregs()
        for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
            seg.base = 0
            seg.selector = 0
        self.set_sregs(sregs)
        regs = structs.Regs()
        regs.rip = entry
        regs.rsp = stack
        regs.rflags = 0x2  # bit 1 is reserved and must be set; interrupts off
        self.set_regs(regs)

    def dup(self, target: int | None = None, *, cloexec: bool = True) -> int:
        """A duplicate of the vCPU fd (closed with the vCPU). Without ``target`` CPython issues
        fcntl(F_DUPFD_CLOEXEC); with one, dup3(O_CLOEXEC) or, with ``cloexec=False``, dup2."""
        if target is None:
            fd = os.dup(self.fd)
        else:
            fd = os.dup2(self.fd, target, inheritable=not cloexec)
        self.dup_fds.append(fd)
        self.dup_history.append(fd)
        return fd

    def close(self) -> None:
        """Unmap kvm_run and close the fd(s), completing nothing: whatever is pending is lost."""
        self.run_page.close()
        for fd in self.dup_fds:
            os.close(fd)
        self.dup_fds.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.closed_ns = time.monotonic_ns()
        if self in self.vm.vcpus:
            self.vm.vcpus.remove(self)


def _needs_completion(reason: int, page: ctypes.Array[ctypes.c_uint8]) -> bool:
    if reason == abi.KVM_EXIT_HYPERV:
        (hv_type,) = struct.unpack_from("<I", page, _L.hyperv_type)
        return bool(hv_type == abi.KVM_EXIT_HYPERV_HCALL)
    return reason in COMPLETION_EXITS
