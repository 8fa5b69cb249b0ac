"""What a restart must not lose: the run state of vCPUs that predate the probes.

The probes learn a vCPU's state from its KVM_RUN entries and exits. A VM older than the probes
(first start, or a restart: ``systemctl restart`` detaches the old programs before the new ones
attach) would start IDLE and a save in a completion that was already pending would go unseen.
Two things are re-learned at start-up, both from ``/proc``:

* a thread blocked in ``ioctl(vcpu_fd, KVM_RUN)`` right now (``/proc/PID/task/TID/syscall``):
  the vCPU is RUNNING, and that thread's next exit is tracked like any other;
* a completion left pending when the previous instance stopped: it wrote those vCPUs to
  ``<state_dir>/handover.json`` (with the CPU time of the thread that ran KVM_RUN). The new
  instance keeps one PENDING only if nothing can have completed it in between: no thread in its
  KVM_RUN, the same exit still in its ``kvm_run``, and the vCPU thread not run for a single
  nanosecond (``/proc/PID/task/TID/schedstat``): completing takes a KVM_RUN, and a KVM_RUN takes
  CPU time. Anything less certain starts IDLE: a restart may miss a violation in the gap but
  never invents one.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from tracer import abi
from tracer.counters import RunState
from tracer.vmident import PROC, stat_field

HANDOVER_FILE: Final = "handover.json"
FORMAT_VERSION: Final = 1
MAX_AGE_S: Final = 3600.0  # an older hand-over describes another era: ignored
# ioctl's syscall number, as /proc/PID/task/TID/syscall prints it first.
IOCTL_SYSCALL_NR: Final = {"x86_64": 16, "aarch64": 29, "riscv64": 29, "s390x": 54,
                           "ppc64le": 54}.get(platform.machine(), 16)


class HandoverError(ValueError):
    """The hand-over file is unusable; the message says why (it is then ignored)."""


@dataclass(frozen=True)
class PendingVcpu:
    """A vCPU the previous instance saw with a completion pending when it stopped."""

    pid: int
    start_time: int  # of the process (ticks after boot): a reused pid is another process
    vcpu_id: int
    exit_reason: int
    run_tid: int  # the thread that ran the KVM_RUN that exited
    thread_runtime_ns: int  # that thread's CPU time when the previous instance stopped
    pending_since_ns: int  # CLOCK_MONOTONIC (bpf_ktime_get_ns)


def thread_runtime_ns(pid: int, tid: int, proc_root: Path = PROC) -> int | None:
    """CPU time the thread has run (first field of schedstat), None if it is gone."""
    try:
        text = (proc_root / str(pid) / "task" / str(tid) / "schedstat").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return None


def threads_in_kvm_run(pid: int, proc_root: Path = PROC) -> dict[int, int]:
    """vCPU fd -> tid of every thread of ``pid`` blocked in ioctl(fd, KVM_RUN) now."""
    out: dict[int, int] = {}
    try:
        tids = [int(t) for t in os.listdir(proc_root / str(pid) / "task") if t.isdigit()]
    except OSError:
        return out
    for tid in tids:
        if _kernel_worker(pid, tid, proc_root):
            continue  # e.g. kvm-nx-lpage-recovery: it shows the registers of the KVM_RUN
            # that spawned it, yet never runs one
        try:
            fields = (proc_root / str(pid) / "task" / str(tid) / "syscall").read_text().split()
            if (len(fields) >= 3 and int(fields[0]) == IOCTL_SYSCALL_NR
                    and int(fields[2], 16) & 0xFFFFFFFF == abi.KVM_RUN):
                out[int(fields[1], 16)] = tid
        except (OSError, ValueError):
            continue  # gone, or "running" (not in a syscall): not blocked in KVM_RUN
    return out


# task flags (field 9 of /proc/PID/task/TID/stat): kernel threads and the kernel's "user worker"
# threads that KVM parks in the VMM's thread group (6.13+: kvm-nx-lpage-recovery).
PF_USER_WORKER: Final = 0x00004000
PF_KTHREAD: Final = 0x00200000


def _kernel_worker(pid: int, tid: int, proc_root: Path) -> bool:
    flags = stat_field(proc_root / str(pid) / "task" / str(tid) / "stat", 9)
    return flags is not None and bool(flags & (PF_USER_WORKER | PF_KTHREAD))


def kvm_run_exit_reason(pid: int, run_addr: int | None, proc_root: Path = PROC) -> int | None:
    """kvm_run.exit_reason as the VMM's mapping holds it now (None if unreadable)."""
    if not run_addr:
        return None
    try:
        with open(proc_root / str(pid) / "mem", "rb", buffering=0) as mem:
            mem.seek(run_addr + abi.KVM_RUN_LAYOUT.exit_reason)
            raw = mem.read(4)
    except (OSError, ValueError, OverflowError):
        return None
    return int(struct.unpack("<I", raw)[0]) if len(raw) == 4 else None


def save(path: Path, pending: list[PendingVcpu], now: float | None = None) -> None:
    """Write the hand-over atomically (a crash mid-write leaves the old file or none)."""
    doc = {"version": FORMAT_VERSION, "written_at": time.time() if now is None else now,
           "pending": [asdict(p) for p in pending]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def load(path: Path, now: float | None = None) -> list[PendingVcpu]:
    """Read and remove the hand-over (it is good for one start). No file: nothing pending.
    Raises HandoverError naming the problem for a file that cannot be trusted."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as err:
        raise HandoverError(f"{path}: {err.strerror}") from None
    finally:
        with contextlib.suppress(OSError):  # good for one start; a read-only dir keeps it
            path.unlink(missing_ok=True)
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
            raise HandoverError(f"{path}: not a version {FORMAT_VERSION} hand-over")
        age = (time.time() if now is None else now) - float(doc["written_at"])
        if not 0 <= age <= MAX_AGE_S:
            raise HandoverError(f"{path}: written {age:.0f} s ago, older than {MAX_AGE_S:.0f} s")
        return [PendingVcpu(**{k: int(v) for k, v in item.items()}) for item in doc["pending"]]
    except HandoverError:
        raise
    except (ValueError, TypeError, KeyError) as err:
        raise HandoverError(f"{path}: malformed ({type(err).__name__}: {err})") from None


def still_pending(prev: PendingVcpu, *, start_time: int | None, in_run: bool,
                  exit_reason: int | None, runtime_ns: int | None) -> bool:
    """Whether nothing can have completed ``prev`` since the previous instance stopped."""
    return (start_time == prev.start_time and not in_run and exit_reason == prev.exit_reason
            and runtime_ns is not None and runtime_ns == prev.thread_runtime_ns)


@dataclass(frozen=True)
class AdoptState:
    """The run state a vCPU found in /proc starts with in the probes."""

    state: RunState = RunState.IDLE
    exit_reason: int = 0
    run_tid: int = 0
    pending_since_ns: int = 0



class Relearner:
    """Decides each pre-existing vCPU's starting state (see the module's docstring)."""

    def __init__(self, inherited: list[PendingVcpu], proc_root: Path = PROC) -> None:
        self.inherited = {(p.pid, p.vcpu_id): p for p in inherited}
        self.proc_root = proc_root
        self._in_run: dict[int, dict[int, int]] = {}
        self.kept: list[PendingVcpu] = []  # hand-over entries still pending
        self.dropped: list[PendingVcpu] = []  # hand-over entries that may have completed

    def state_of(self, pid: int, fd: int, vcpu_id: int, run_addr: int | None,
                 start_time: int | None) -> AdoptState:
        in_run = self._in_run.setdefault(pid, threads_in_kvm_run(pid, self.proc_root))
        prev = self.inherited.pop((pid, vcpu_id), None)
        if fd in in_run:
            if prev is not None:
                self.dropped.append(prev)
            return AdoptState(RunState.RUNNING, run_tid=in_run[fd])
        if prev is None:
            return AdoptState()
        if still_pending(prev, start_time=start_time,
                         in_run=any(t for f, t in in_run.items() if f != fd and
                                    t == prev.run_tid),
                         exit_reason=kvm_run_exit_reason(pid, run_addr, self.proc_root),
                         runtime_ns=thread_runtime_ns(pid, prev.run_tid, self.proc_root)):
            self.kept.append(prev)
            return AdoptState(RunState.PENDING, prev.exit_reason, prev.run_tid,
                              prev.pending_since_ns)
        self.dropped.append(prev)
        return AdoptState()
