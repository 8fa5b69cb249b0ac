"""tracer.handover's /proc reading on real captures (tests/unit/procfs/README.md): QEMU with
every vCPU thread asleep in KVM_RUN, next to threads in other syscalls and the kernel's
kvm-nx-lpage-recovery worker, whose syscall line shows the very KVM_RUN that spawned it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tracer.counters import RunState
from tracer.handover import PendingVcpu, Relearner, thread_runtime_ns, threads_in_kvm_run
from tracer.vmident import discover_vcpus, process_start_time

PROCFS = Path(__file__).resolve().parent / "procfs"
QEMU_CAPTURES = (15285, 15292, 15359, 17758)
VCPU_THREAD = re.compile(r"CPU (\d+)/KVM")  # -name ...,debug-threads=on


def vcpu_threads(pid: int) -> dict[int, int]:
    """vCPU fd -> tid, from the thread names and the fd links alone (not the syscall files)."""
    fd_of = {int(v[len("anon_inode:kvm-vcpu:"):]): int(fd)
             for fd in os.listdir(PROCFS / str(pid) / "fd")
             if (v := os.readlink(PROCFS / str(pid) / "fd" / fd)).startswith(
                 "anon_inode:kvm-vcpu:")}
    out = {}
    for task in (PROCFS / str(pid) / "task").iterdir():
        if m := VCPU_THREAD.fullmatch((task / "comm").read_text().strip()):
            out[fd_of[int(m[1])]] = int(task.name)
    return out


def comm(pid: int, tid: int) -> str:
    return (PROCFS / str(pid) / "task" / str(tid) / "comm").read_text().strip()


@pytest.mark.parametrize("pid", [15285, 15292, 17758])
def test_every_vcpu_thread_is_found_in_kvm_run(pid: int) -> None:
    assert threads_in_kvm_run(pid, PROCFS) == vcpu_threads(pid) != {}


def test_unnamed_threads_too() -> None:
    # No debug-threads: every QEMU thread is "qemu-system-x86"; the vCPU's is the one in KVM_RUN.
    tids = sorted(int(t.name) for t in (PROCFS / "15359" / "task").iterdir())
    assert [comm(15359, t) for t in tids] == [
        "qemu-system-x86", "qemu-system-x86", "qemu-system-x86", "kvm-nx-lpage-re"]
    assert threads_in_kvm_run(15359, PROCFS) == {9: tids[2]}


@pytest.mark.parametrize("pid", QEMU_CAPTURES)
def test_the_kernel_worker_is_not_a_vcpu_thread(pid: int) -> None:
    [worker] = [int(t.name) for t in (PROCFS / str(pid) / "task").iterdir()
                if (t / "comm").read_text().strip() == "kvm-nx-lpage-re"]
    line = (PROCFS / str(pid) / "task" / str(worker) / "syscall").read_text().split()
    assert (line[0], line[2]) == ("16", "0xae80")  # it does look like ioctl(fd, KVM_RUN)
    assert worker not in threads_in_kvm_run(pid, PROCFS).values()


def test_thread_runtime_is_schedstat_first_field() -> None:
    assert thread_runtime_ns(15285, 15287, PROCFS) == 2914503161  # "CPU 0/KVM"
    assert thread_runtime_ns(15285, 99999, PROCFS) is None


@pytest.mark.parametrize("pid", QEMU_CAPTURES)
def test_a_restart_relearns_every_vcpu_as_running(pid: int) -> None:
    """What the daemon's start-up scan decides for these processes: RUNNING on its own thread;
    a hand-over entry for a vCPU whose thread is back in KVM_RUN is dropped, not kept."""
    start = process_start_time(pid, PROCFS)
    assert start is not None
    vcpus = [v for v in discover_vcpus(PROCFS) if v.pid == pid]
    in_run = threads_in_kvm_run(pid, PROCFS)
    [vcpu0_fd] = [v.fd for v in vcpus if v.vcpu_id == 0]
    # Left pending by the previous instance: an OUT exit of vCPU 0, on the same thread.
    stale = PendingVcpu(pid=pid, start_time=start, vcpu_id=0, exit_reason=2,
                        run_tid=in_run[vcpu0_fd], thread_runtime_ns=1, pending_since_ns=1)
    relearner = Relearner([stale], PROCFS)
    for v in vcpus:
        state = relearner.state_of(v.pid, v.fd, v.vcpu_id, v.run_addr, start)
        assert (state.state, state.run_tid) == (RunState.RUNNING, in_run[v.fd])
    assert relearner.dropped == [stale] and relearner.kept == []
