"""tracer.handover on fake /proc trees: the restart hand-over file and the re-learning rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tracer import abi, handover
from tracer.counters import RunState
from tracer.handover import AdoptState, PendingVcpu, Relearner

PENDING, RUNNING = RunState.PENDING, RunState.RUNNING

PID, TID, FD = 300, 301, 7
PREV = PendingVcpu(pid=PID, start_time=1000, vcpu_id=0, exit_reason=2, run_tid=TID,
                   thread_runtime_ns=5000, pending_since_ns=123)


def fake_proc(root: Path, *, runtime: int = 5000, syscall: str = "0 0x0 0x0 0x0",
              worker: bool = False, exit_reason: int = 2) -> Path:
    task = root / str(PID) / "task" / str(TID)
    task.mkdir(parents=True)
    (task / "schedstat").write_text(f"{runtime} 100 3\n")
    (task / "syscall").write_text(syscall + "\n")
    flags = handover.PF_USER_WORKER if worker else 0x400040
    (task / "stat").write_text(f"{TID} (vcpu 0) S 1 2 3 4 5 {flags} 7 8\n")
    mem = bytearray(8192)
    off = 0x1000 + abi.KVM_RUN_LAYOUT.exit_reason
    mem[off:off + 4] = exit_reason.to_bytes(4, "little")
    (root / str(PID) / "mem").write_bytes(bytes(mem))
    return root


def in_run_line(fd: int = FD) -> str:
    return f"16 {fd:#x} {abi.KVM_RUN:#x} 0x0 0x0 0x0 0x0 0x7ffc 0x7f00"


def test_save_then_load_round_trips_once(tmp_path: Path) -> None:
    path = tmp_path / "handover.json"
    handover.save(path, [PREV], now=1000.0)
    assert handover.load(path, now=1010.0) == [PREV]
    assert not path.exists()  # good for one start
    assert handover.load(path) == []


@pytest.mark.parametrize(("text", "needle"), [
    ("{not json", "malformed"),
    ('{"version": 99}', "not a version 1"),
    ('{"version": 1, "written_at": -9000, "pending": []}', "older than"),
    ('{"version": 1, "written_at": 1000, "pending": [{"pid": 1}]}', "malformed"),
    ('{"version": 1, "written_at": 1000, "pending": [{"pid": "x"}]}', "malformed"),
])
def test_a_bad_file_is_refused_with_the_reason_and_removed(tmp_path: Path, text: str,
                                                           needle: str) -> None:
    path = tmp_path / "handover.json"
    path.write_text(text)
    with pytest.raises(handover.HandoverError, match=needle):
        handover.load(path, now=1000.0 + 10)
    assert not path.exists()


def test_saved_file_is_plain_json(tmp_path: Path) -> None:
    path = tmp_path / "handover.json"
    handover.save(path, [PREV], now=5.0)
    doc = json.loads(path.read_text())
    assert doc["version"] == 1 and doc["pending"][0]["run_tid"] == TID


def test_thread_in_kvm_run_is_found_and_kernel_workers_are_not(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path / "a", syscall=in_run_line())
    assert handover.threads_in_kvm_run(PID, proc) == {FD: TID}
    worker = fake_proc(tmp_path / "b", syscall=in_run_line(), worker=True)
    assert handover.threads_in_kvm_run(PID, worker) == {}
    other = fake_proc(tmp_path / "c", syscall="16 0x7 0x8090ae81 0x0")  # KVM_GET_REGS
    assert handover.threads_in_kvm_run(PID, other) == {}
    running = fake_proc(tmp_path / "d", syscall="running")
    assert handover.threads_in_kvm_run(PID, running) == {}
    assert handover.threads_in_kvm_run(999, proc) == {}


def test_exit_reason_is_read_from_the_vmm_mapping(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, exit_reason=6)
    assert handover.kvm_run_exit_reason(PID, 0x1000, proc) == 6
    assert handover.kvm_run_exit_reason(PID, None, proc) is None
    assert handover.kvm_run_exit_reason(PID, 1 << 40, proc) is None  # past the end


@pytest.mark.parametrize(("change", "kept"), [
    ({}, True),
    ({"runtime": 5001}, False),  # the vCPU thread ran: it may have completed the exit
    ({"exit_reason": 6}, False),  # another exit since
    ({"syscall": in_run_line()}, False),  # in KVM_RUN right now: running, not pending
])
def test_relearner_keeps_only_provably_unchanged_pending_vcpus(
        tmp_path: Path, change: dict[str, object], kept: bool) -> None:
    proc = fake_proc(tmp_path, **change)  # type: ignore[arg-type]
    relearn = Relearner([PREV], proc)
    start = relearn.state_of(PID, FD, 0, 0x1000, start_time=1000)
    if kept:
        assert start == AdoptState(PENDING, 2, TID, 123) and relearn.kept == [PREV]
    else:
        assert start.state != PENDING and relearn.dropped == [PREV]
    if "syscall" in change:
        assert start == AdoptState(RUNNING, run_tid=TID)


def test_a_reused_pid_is_another_process(tmp_path: Path) -> None:
    relearn = Relearner([PREV], fake_proc(tmp_path))
    assert relearn.state_of(PID, FD, 0, 0x1000, start_time=2000) == AdoptState()
    assert relearn.dropped == [PREV]


def test_without_a_handover_only_running_is_relearned(tmp_path: Path) -> None:
    assert Relearner([], fake_proc(tmp_path / "a")).state_of(PID, FD, 0, 0x1000, 1000) \
        == AdoptState()
    assert Relearner([], fake_proc(tmp_path / "b", syscall=in_run_line())).state_of(
        PID, FD, 0, 0x1000, 1000) == AdoptState(RUNNING, run_tid=TID)
