"""Events from the probes: the wire layout shared with ``bpf/completion.c`` and its decoding.

Pure Python (no bcc): the probes module hands raw ring-buffer bytes to :func:`decode_event`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, replace
from typing import Final

from tracer import abi


class EventType(enum.IntEnum):
    """``enum event_type`` in bpf/completion.c."""

    VIOLATION = 1  # a save/restore ioctl on a vCPU whose completion is pending
    VCPU_CREATED = 2  # KVM_CREATE_VCPU returned a vCPU fd
    VCPU_FD_DUP = 3  # a vCPU fd was duplicated (dup/dup2/dup3/fcntl F_DUPFD)
    VCPU_FD_CLOSED = 4  # a vCPU fd was closed; aux = fds left for that vCPU
    PROCESS_EXIT = 5  # a process holding vCPUs exited or exec'd
    WINDOW_CLOSED = 6  # userspace re-entered KVM_RUN after a window that had violations
    UNKNOWN_FD = 7  # a vCPU-class ioctl on an fd the probes do not know
    QUIRKS_DISABLED = 8  # KVM_ENABLE_CAP(KVM_CAP_DISABLE_QUIRKS[2]); aux = quirk mask
    FD_RANGE_CLOSED = 9  # close_range() in a process holding vCPUs: rescan its fds
    # Only with --trace-exits (debugging / differential testing): one per exit.
    RUN_ENTER = 10
    USERSPACE_EXIT = 11  # exit_reason, aux = errno
    # a save/restore with nothing pending on its vCPU: only with --trace-exits
    STATE_IOCTL = 12
    EXEC = 13  # the file a process exec'd (``path``): watch at the exec, run at its first vCPU
    # stacks: the user registers and top of stack of the VIOLATION before it (same tid and seq)
    USER_STACK = 14


class EventFlag(enum.IntFlag):
    """``EV_F_*`` in bpf/completion.c."""

    ACCESS_VALID = 1  # access[] holds the kvm_run exit union of the pending exit
    QUIRK_7E_DISABLED = 2  # the process disabled KVM_X86_QUIRK_OUT_7E_INC_RIP
    AT_RETURN = 4  # detected when the ioctl returned (it waited on a running KVM_RUN)
    IMMEDIATE_EXIT = 8  # the re-entry had kvm_run->immediate_exit set
    # VIOLATION: a read held in its window, reported once the window became a finding (aux:
    # tracer.windows.HeldWhy | reads << 8; no stack). PROCESS_EXIT: the process had windows
    # holding a read (aux: its final restore generation; tracer.windows judges them).
    HELD = 32
    USER_STACK = 64  # VIOLATION: a USER_STACK record with its tid and seq follows


# struct event: u32 type, tgid, tid, vcpu_id; s32 fd; u32 cmd, exit_reason, flags;
# u64 seq, pending_since_ns, ts_ns; s64 aux; u64 vcpu_uid; u8 access[24]; char comm[16];
# s32 stack_id; u32 pad
EVENT_STRUCT: Final = struct.Struct("<IIIIiIIIQQQqQ24s16siI")
EVENT_SIZE: Final = EVENT_STRUCT.size  # 120, asserted against the C side by the probes
EXEC_PATH_BYTES: Final = 256  # an EXEC event's file name, after the struct
# struct user_stack_rec: u32 type, tgid, tid, size; u64 seq, vcpu_uid; u64 regs[21] (UAPI
# struct pt_regs); u8 stack[USTACK_BYTES]. USTACK_BYTES: the copy from the stack pointer up;
# 8 KiB reach the thread's start from the ioctl in the test VMMs (~1.5 KiB C, ~3 KiB Rust) and
# Debian's QEMU vCPU threads (~2.5 KiB) with room for deeper VMMs (docs/stacks.md).
USTACK_HEADER: Final = struct.Struct("<IIIIQQ21Q")
USTACK_BYTES: Final = 8192
USTACK_CHUNK: Final = 512  # copied in pieces: a stack's top less than 8 KiB away still copies
# Captures allowed between two reads of the ring (Python refills them after each read): one
# per 32 KiB of ring, so the records (8.2 KiB each) fill at most about a quarter of it and a
# storm of reports keeps room for its reports: 8 in the default 256 KiB ring, 256 at most (the
# cap: watch's 64 MiB ring), for the VMM that reads a dozen kinds of state in one burst.
USTACK_RING_BYTES_PER_TOKEN: Final = 32 * 1024
USTACK_TOKENS_MAX: Final = 256


def stack_capture_budget(ring_bytes: int) -> int:
    """User stack captures allowed between two reads of a ring of ``ring_bytes``."""
    return max(1, min(USTACK_TOKENS_MAX, ring_bytes // USTACK_RING_BYTES_PER_TOKEN))


PT_REGS: Final = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax",
                  "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss")
EXEC_EVENT_SIZE: Final = EVENT_SIZE + EXEC_PATH_BYTES
MAX_EVENT_SIZE: Final = max(EXEC_EVENT_SIZE, USTACK_HEADER.size + USTACK_BYTES)


@dataclass(frozen=True)
class UserCapture:
    """A report's user registers (UAPI pt_regs names) and the stack bytes from rsp up."""

    regs: dict[str, int]
    stack: bytes

    @property
    def sp(self) -> int:
        return self.regs["rsp"]


@dataclass(frozen=True)
class PioAccess:
    port: int
    direction: str  # "in" | "out"
    size: int
    count: int

    def describe(self) -> dict[str, object]:
        return {"port": f"0x{self.port:x}", "direction": self.direction, "size": self.size,
                "count": self.count}


@dataclass(frozen=True)
class MmioAccess:
    gpa: int
    length: int
    is_write: bool

    def describe(self) -> dict[str, object]:
        return {"gpa": f"0x{self.gpa:x}", "length": self.length,
                "direction": "write" if self.is_write else "read"}


@dataclass(frozen=True)
class MsrAccess:
    index: int
    is_write: bool

    def describe(self) -> dict[str, object]:
        return {"msr": f"0x{self.index:x}", "direction": "write" if self.is_write else "read"}


@dataclass(frozen=True)
class HypercallAccess:
    nr: int

    def describe(self) -> dict[str, object]:
        return {"hypercall_nr": self.nr}


@dataclass(frozen=True)
class HypervAccess:
    type: int  # KVM_EXIT_HYPERV_SYNIC 1, _HCALL 2, _SYNDBG 3

    def describe(self) -> dict[str, object]:
        return {"hyperv_type": self.type}


PendingAccess = PioAccess | MmioAccess | MsrAccess | HypercallAccess | HypervAccess


def decode_access(exit_reason: int, raw: bytes) -> PendingAccess | None:
    """Decode the kvm_run exit union (bytes 32..55 of struct kvm_run) for ``exit_reason``."""
    if len(raw) < abi.ACCESS_BYTES:
        return None
    if exit_reason == abi.KVM_EXIT_IO:
        direction, size, port, count = struct.unpack_from("<BBHI", raw, 0)
        return PioAccess(port, "out" if direction == abi.KVM_EXIT_IO_OUT else "in", size, count)
    if exit_reason == abi.KVM_EXIT_MMIO:
        (gpa,) = struct.unpack_from("<Q", raw, 0)
        length, is_write = struct.unpack_from("<IB", raw, 16)
        return MmioAccess(gpa, length, bool(is_write))
    if exit_reason in (abi.KVM_EXIT_X86_RDMSR, abi.KVM_EXIT_X86_WRMSR):
        (index,) = struct.unpack_from("<I", raw, 12)
        return MsrAccess(index, exit_reason == abi.KVM_EXIT_X86_WRMSR)
    if exit_reason == abi.KVM_EXIT_HYPERCALL:
        (nr,) = struct.unpack_from("<Q", raw, 0)
        return HypercallAccess(nr)
    if exit_reason == abi.KVM_EXIT_HYPERV:
        (hv_type,) = struct.unpack_from("<I", raw, 0)
        return HypervAccess(hv_type)
    return None


@dataclass(frozen=True)
class KernelEvent:
    type: EventType
    tgid: int
    tid: int
    vcpu_id: int
    fd: int
    cmd: int
    exit_reason: int
    flags: EventFlag
    seq: int
    pending_since_ns: int
    ts_ns: int
    aux: int
    vcpu_uid: int  # the probes' key for one vCPU (unique per KVM_CREATE_VCPU)
    access: PendingAccess | None
    comm: str
    stack_id: int = -1  # key of the probes' stack map (VIOLATION with stacks on), -1: none
    path: str | None = None  # EXEC: the file name the process exec'd
    capture: UserCapture | None = None  # USER_STACK (and its VIOLATION once paired)

    @property
    def pending_ns(self) -> int:
        return max(0, self.ts_ns - self.pending_since_ns)


def split_exit_aux(aux: int) -> tuple[int, int]:
    """USERSPACE_EXIT's aux is ``(s64)errno << 32 | reason``: (reason, errno)."""
    return aux & 0xFFFFFFFF, aux >> 32  # aux is signed, so >> keeps errno's sign


class MalformedEvent(ValueError):
    pass


def decode_event(raw: bytes) -> KernelEvent:
    if len(raw) >= 4 and int.from_bytes(raw[:4], "little") == EventType.USER_STACK:
        return decode_user_stack(raw)
    if len(raw) < EVENT_SIZE:
        raise MalformedEvent(f"event of {len(raw)} bytes, expected {EVENT_SIZE}")
    (etype, tgid, tid, vcpu_id, fd, cmd, reason, flags, seq, since, ts, aux, uid, access,
     comm, stack_id, _pad) = EVENT_STRUCT.unpack_from(raw, 0)
    try:
        event_type = EventType(etype)
    except ValueError as err:
        raise MalformedEvent(f"unknown event type {etype}") from err
    eflags = EventFlag(flags & sum(EventFlag))
    decoded = decode_access(reason, access) if eflags & EventFlag.ACCESS_VALID else None
    return KernelEvent(event_type, tgid, tid, vcpu_id, fd, cmd, reason, eflags, seq, since, ts,
                       aux, uid, decoded, comm.split(b"\0", 1)[0].decode("utf-8", "replace"),
                       stack_id, _exec_path(raw) if event_type is EventType.EXEC else None)


def decode_user_stack(raw: bytes) -> KernelEvent:
    if len(raw) < USTACK_HEADER.size:
        raise MalformedEvent(f"user stack record of {len(raw)} bytes, expected at least "
                             f"{USTACK_HEADER.size}")
    _t, tgid, tid, size, seq, uid, *regs = USTACK_HEADER.unpack_from(raw, 0)
    stack = raw[USTACK_HEADER.size:USTACK_HEADER.size + size]
    if len(stack) != size:
        raise MalformedEvent(f"user stack record says {size} stack bytes, has {len(stack)}")
    return KernelEvent(EventType.USER_STACK, tgid, tid, 0, -1, 0, 0, EventFlag(0), seq, 0, 0, 0,
                       uid, None, "", capture=UserCapture(dict(zip(PT_REGS, regs, strict=True)),
                                                          stack))


def encode_user_stack(tgid: int, tid: int, seq: int, uid: int, capture: UserCapture) -> bytes:
    """Inverse of :func:`decode_user_stack` (tests)."""
    return USTACK_HEADER.pack(int(EventType.USER_STACK), tgid, tid, len(capture.stack), seq, uid,
                              *(capture.regs.get(r, 0) for r in PT_REGS)) + capture.stack


def _exec_path(raw: bytes) -> str | None:
    tail = raw[EVENT_SIZE:EXEC_EVENT_SIZE].split(b"\0", 1)[0]
    return tail.decode("utf-8", "surrogateescape") if tail else None


def encode_event(ev: KernelEvent, access_raw: bytes = b"") -> bytes:
    """Inverse of :func:`decode_event` (tests and replay); an EXEC event carries its path after."""
    raw = EVENT_STRUCT.pack(int(ev.type), ev.tgid, ev.tid, ev.vcpu_id, ev.fd, ev.cmd,
                             ev.exit_reason, int(ev.flags), ev.seq, ev.pending_since_ns,
                             ev.ts_ns, ev.aux, ev.vcpu_uid,
                             access_raw.ljust(abi.ACCESS_BYTES, b"\0"),
                             ev.comm.encode()[:16], ev.stack_id, 0)
    if ev.type is not EventType.EXEC:
        return raw
    path = (ev.path or "").encode("utf-8", "surrogateescape")[:EXEC_PATH_BYTES - 1]
    return raw + path.ljust(EXEC_PATH_BYTES, b"\0")


class CapturePairer:
    """Gives each VIOLATION flagged USER_STACK the USER_STACK record that follows it (same tid
    and seq), keeping the order of every event: from a flagged violation on, events wait until
    its record came. The probes submit the record before the violation, so it is nearly always
    the next one; a record still missing one poll later (another CPU's uncommitted record in
    between keeps it for the next poll) or never sent lets the violation go without it
    (``unpaired``)."""

    MAX_HELD: Final = 4096  # bounded: past it the oldest waiting violation goes without

    def __init__(self) -> None:
        self._queue: list[KernelEvent] = []
        self._waiting_since_poll: int | None = None
        self._polls = 0
        self.unpaired = 0
        self.orphans = 0  # USER_STACK records with no violation waiting (not counted lost)

    @staticmethod
    def _waits(ev: KernelEvent) -> bool:
        return (ev.type is EventType.VIOLATION and bool(ev.flags & EventFlag.USER_STACK)
                and ev.capture is None)

    def feed(self, ev: KernelEvent) -> list[KernelEvent]:
        """The events that can go to the tracker now, in order."""
        if ev.type is EventType.USER_STACK:
            for i, held in enumerate(self._queue):
                if self._waits(held) and (held.tid, held.seq, held.vcpu_uid) == (
                        ev.tid, ev.seq, ev.vcpu_uid):
                    self._queue[i] = replace(held, capture=ev.capture)
                    return self._release()
            self.orphans += 1
            return []
        self._queue.append(ev)
        if len(self._queue) > self.MAX_HELD:
            return self._release(force=1)
        return self._release()

    def polled(self) -> list[KernelEvent]:
        """After each poll: a violation that waited through a whole poll goes without."""
        self._polls += 1
        if self._waiting_since_poll is not None and self._polls - self._waiting_since_poll >= 2:
            return self._release(force=1)
        return []

    def flush(self) -> list[KernelEvent]:
        """Everything held (at the end)."""
        return self._release(force=len(self._queue))

    def _release(self, force: int = 0) -> list[KernelEvent]:
        out = []
        while self._queue:
            head = self._queue[0]
            if self._waits(head):
                if not force:
                    break
                force -= 1
                self.unpaired += 1
            out.append(self._queue.pop(0))
        self._waiting_since_poll = self._polls if self._queue else None
        return out
