"""Every VMM scenario on the real /dev/kvm (no BPF): the reports must be internally consistent.

The central check rebuilds, from the report's raw ioctl and KVM_RUN logs alone, which state
ioctls were issued while a completion was pending, and demands that this set is exactly the
report's violations plus sanctioned entries. The daemon's e2e tests then only need to compare
their probes' verdicts with these reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tracer import abi
from tracer.vmm import guest, snapshot
from tracer.vmm.kvm import KVM_EXIT_INTR, Kvm, MmioExit, MsrExit, PioExit, VmmError, clock_slack_ns
from tracer.vmm.report import ExpectedViolation, ScenarioReport
from tracer.vmm.scenarios import (
    DEFAULT_ITERATIONS,
    KICK_AFTER_SAVE_S,
    PEEK_HOLD_S,
    SAVE_AFTER_ENTRY_S,
    SAVE_WHILE_RUNNING_ITERATIONS,
    SCENARIOS,
    close_kept_open,
    run_scenario,
)

KVM_OK = os.access("/dev/kvm", os.R_OK | os.W_OK)
pytestmark = pytest.mark.skipif(
    not KVM_OK, reason="needs /dev/kvm (read-write): the VMM scenarios run real vCPUs"
)
ROOT = Path(__file__).resolve().parents[2]
# Independent of tracer.vmm.kvm: the exits these guests produce that leave a completion owed.
PENDING = {"KVM_EXIT_IO", "KVM_EXIT_MMIO", "KVM_EXIT_X86_RDMSR", "KVM_EXIT_X86_WRMSR"}
N = 4
SAVES = len(snapshot.SAVE_IOCTLS)
# Scenarios whose snapshots start while KVM_RUN is in flight: the first ioctl of each is issued
# before the exit it ends up running after.
BEHIND_RUN = {"save-while-running", "save-while-running-kicked"}
RESTORES = len(snapshot.RESTORE_IOCTLS)
_cache: dict[str, ScenarioReport] = {}


@pytest.fixture(autouse=True, scope="module")
def _no_vm_left_behind() -> Iterator[None]:
    """process-exit keeps its VM open on purpose; this test process must not keep it."""
    yield
    close_kept_open()


def report_of(name: str) -> ScenarioReport:
    if name not in _cache:
        iterations = 200 if name == "loop-io" else N
        _cache[name] = run_scenario(name, iterations)
    return _cache[name]


def _key(e: ExpectedViolation) -> tuple[int, int, int, str]:
    return (e.ts_ns, e.tid, e.vcpu_fd, e.ioctl)


def _rebuild_mid_completion(report: ScenarioReport) -> set[tuple[int, int, int, str]]:
    """State ioctls issued between a pending exit and the next KVM_RUN of the same vCPU."""
    outcome = {(r.ts_ns, r.fd): r.outcome for r in report.run_log}

    def vcpu_of(fd: int, ts: int) -> int:
        for i, v in enumerate(report.vcpus):
            end = v.closed_ns if v.closed_ns is not None else report.finished_ns
            if fd in (v.fd, *v.dup_fds) and v.created_ns <= ts <= end:
                return i
        raise AssertionError(f"ioctl on fd {fd} at {ts} belongs to no vCPU")

    pending: dict[int, bool] = {}
    found: set[tuple[int, int, int, str]] = set()
    for e in sorted(report.ioctl_log):
        vcpu = vcpu_of(e.fd, e.ts_ns)
        if e.name == "KVM_RUN":
            pending[vcpu] = outcome[(e.ts_ns, e.fd)] in PENDING
        elif pending.get(vcpu) and abi.IOCTL_BY_NAME[e.name].kind in (
            abi.IoctlKind.SAVE, abi.IoctlKind.RESTORE
        ):
            found.add((e.ts_ns, e.tid, e.fd, e.name))
    return found


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_report_is_internally_consistent(name: str) -> None:
    report = report_of(name)
    assert report.scenario == name and report.pid == os.getpid()
    # every mid-completion save is expected as exactly one of: violation, sanctioned, inspection
    expected = report.violations + report.sanctioned + report.inspections
    assert _rebuild_mid_completion(report) == {_key(e) for e in expected}
    assert len(expected) == len({_key(e) for e in expected})
    logged = set(report.ioctl_log)
    for e in expected:
        assert (e.ts_ns, e.tid, e.vcpu_fd, e.ioctl) in logged
        assert e.kind == abi.IOCTL_BY_NAME[e.ioctl].kind.value
        assert e.exit_reason in PENDING
        assert e.pending_since_ns < e.ts_ns or report.scenario in BEHIND_RUN
        assert (e.rule is None) == (e in report.violations or e in report.inspections)
    assert all(r.ts_ns in {e.ts_ns for e in report.ioctl_log} for r in report.run_log)
    assert Counter(r.outcome for r in report.run_log) == Counter(report.exits)
    assert report.completions == sum(r.immediate_exit for r in report.run_log)
    # Every immediate-exit KVM_RUN came back -EINTR without running the guest.
    assert all(r.outcome == "KVM_EXIT_INTR" for r in report.run_log if r.immediate_exit)
    assert ScenarioReport.from_json(report.to_json()) == report
    # peek-idle holds each window open past the tracer's idle time on purpose
    held = PEEK_HOLD_S * report.iterations if name == "peek-idle" else 0.0
    assert report.elapsed_ns < (2 + held) * 1e9


@pytest.mark.parametrize("name", ["correct-io", "correct-mmio", "correct-msr", "hlt", "eintr",
                                  "fd-reuse", "loop-io"])
def test_correct_scenarios_expect_nothing(name: str) -> None:
    report = report_of(name)
    assert report.violations == [] and report.sanctioned == []
    assert report.pending_at_end == []


@pytest.mark.parametrize(
    ("name", "exit_reason", "field", "value", "direction"),
    [
        ("buggy-io-out", "KVM_EXIT_IO", "port", guest.SERIAL_PORT, "out"),
        ("buggy-io-in", "KVM_EXIT_IO", "port", guest.SERIAL_PORT, "in"),
        ("buggy-mmio-write", "KVM_EXIT_MMIO", "gpa", guest.MMIO_GPA, "write"),
        ("buggy-mmio-read", "KVM_EXIT_MMIO", "gpa", guest.MMIO_GPA, "read"),
        ("buggy-rdmsr", "KVM_EXIT_X86_RDMSR", "msr_index", guest.USER_MSR, "read"),
        ("buggy-wrmsr", "KVM_EXIT_X86_WRMSR", "msr_index", guest.USER_MSR, "write"),
    ],
)
def test_buggy_scenarios(name: str, exit_reason: str, field: str, value: int,
                         direction: str) -> None:
    report = report_of(name)
    assert len(report.violations) == N * SAVES and report.sanctioned == []
    assert [v.ioctl for v in report.violations] == list(snapshot.SAVE_IOCTLS) * N
    (vcpu,) = report.vcpus
    for v in report.violations:
        assert (v.exit_reason, v.kind, v.direction) == (exit_reason, "save", direction)
        assert getattr(v, field) == value
        assert v.tid in vcpu.run_tids and v.vcpu_fd == vcpu.fd and v.vcpu_id == 0
    assert report.exits == {exit_reason: N, "KVM_EXIT_INTR": N}


def test_reads_saved_mid_completion_miss_the_answer() -> None:
    """The point of it all: a save before completion still shows RIP at the IN/load/RDMSR."""
    for name in ("buggy-io-in", "buggy-mmio-read", "buggy-rdmsr"):
        assert report_of(name).facts["saves_with_rip_at_exiting_insn"] == N, name


def test_other_thread() -> None:
    report = report_of("buggy-other-thread")
    (vcpu,) = report.vcpus
    assert [v.ioctl for v in report.violations] == ["KVM_GET_REGS", "KVM_GET_SREGS"] * N
    assert {v.tid for v in report.violations} == {report.facts["saver_tid"]}
    assert report.facts["saver_tid"] not in vcpu.run_tids


def _windows(report: ScenarioReport) -> list[list[ExpectedViolation]]:
    """The violations grouped by the exit they ran after, in order."""
    by_exit: dict[int, list[ExpectedViolation]] = {}
    for v in report.violations:
        by_exit.setdefault(v.pending_since_ns, []).append(v)
    return [by_exit[k] for k in sorted(by_exit)]


def _saves_by(report: ScenarioReport, tid: int) -> list[int]:
    return [e.ts_ns for e in report.ioctl_log if e.tid == tid and e.name != "KVM_RUN"]


def test_save_while_running() -> None:
    """Every ioctl of each snapshot ran mid-completion; the first was issued while the vCPU
    was still inside KVM_RUN (before the exit), the others after it returned."""
    report = run_scenario("save-while-running", N)
    (vcpu,) = report.vcpus
    saver = report.facts["saver_tid"]
    assert vcpu.program == "delayed-out-0x3f8" and vcpu.buggy and saver not in vcpu.run_tids
    assert len(report.violations) == N * SAVES and report.sanctioned == []
    assert [v.ioctl for v in report.violations] == list(snapshot.SAVE_IOCTLS) * N
    for v in report.violations:
        assert (v.exit_reason, v.kind, v.port, v.direction) == (
            "KVM_EXIT_IO", "save", guest.SERIAL_PORT, "out")
        assert (v.tid, v.vcpu_fd, v.vcpu_id) == (saver, vcpu.fd, 0)
    assert report.exits == {"KVM_EXIT_IO": N, "KVM_EXIT_INTR": N} and report.pending_at_end == []
    runs = [r for r in report.run_log if not r.immediate_exit]
    completions = [r for r in report.run_log if r.immediate_exit]
    windows = _windows(report)
    assert len(runs) == len(completions) == len(windows) == N
    for run, completion, window in zip(runs, completions, windows, strict=True):
        first, *rest = window
        assert run.outcome == "KVM_EXIT_IO" and run.tid in vcpu.run_tids
        # Issued while KVM_RUN was in flight, at least SAVE_AFTER_ENTRY_S after it was issued.
        assert run.ts_ns + SAVE_AFTER_ENTRY_S * 1e9 <= first.ts_ns < first.pending_since_ns
        assert all(first.pending_since_ns < v.ts_ns for v in rest)
        # The vCPU thread completed the exit only once the whole snapshot was done.
        assert window[-1].ts_ns < completion.ts_ns and completion.outcome == "KVM_EXIT_INTR"
    assert sorted(_saves_by(report, int(saver))) == [v.ts_ns for v in report.violations]
    facts = report.facts
    assert facts["queued_ioctls"] >= N and facts["save_ioctls_per_iteration"] == SAVES
    # The VMM's clocks: each first ioctl blocked until KVM_RUN returned, and returned after it.
    assert float(facts["run_ms_min"]) > float(facts["save_issued_ms_into_run_min"])
    assert float(facts["first_save_blocked_ms_min"]) > clock_slack_ns() / 1e6
    assert float(facts["save_return_after_run_return_us_min"]) > -clock_slack_ns() / 1e3
    out = guest.delayed_out_loop().instructions[-2]  # KVM leaves RIP at the OUT or past it
    assert facts["saved_rip"] in (hex(guest.LOAD_ADDR + out.offset),
                                  hex(guest.LOAD_ADDR + out.offset + len(out.code)))
    assert float(facts["heartbeat_seen_ms_max"]) < float(facts["run_ms_min"])


def test_save_while_running_kicked() -> None:
    """The kicked KVM_RUN returns -EINTR: the blocked snapshot then runs with nothing owed."""
    report = run_scenario("save-while-running-kicked", N)
    (vcpu,) = report.vcpus
    saver = int(report.facts["saver_tid"])
    assert vcpu.program == "spin" and not vcpu.buggy and saver not in vcpu.run_tids
    assert report.violations == [] and report.sanctioned == [] and report.pending_at_end == []
    # Every KVM_RUN was ended by a kick, none by immediate_exit.
    assert report.exits == {"KVM_EXIT_INTR": N} and report.completions == 0
    assert int(report.facts["kicks"]) >= N
    saves = sorted(_saves_by(report, saver))
    assert len(saves) == N * SAVES
    runs = report.run_log
    for i, run in enumerate(runs):
        snap = saves[i * SAVES : (i + 1) * SAVES]
        end = runs[i + 1].ts_ns if i + 1 < len(runs) else report.finished_ns
        assert run.ts_ns + SAVE_AFTER_ENTRY_S * 1e9 <= snap[0] and snap[-1] < end
    assert float(report.facts["first_save_blocked_ms_min"]) >= KICK_AFTER_SAVE_S * 1e3 * 0.9
    assert float(report.facts["save_return_after_run_return_us_min"]) > -clock_slack_ns() / 1e3


def test_save_while_running_defaults() -> None:
    t0 = time.monotonic()
    for name in sorted(BEHIND_RUN):
        report = run_scenario(name)
        assert report.iterations == SAVE_WHILE_RUNNING_ITERATIONS == 3
    assert time.monotonic() - t0 < 3


def test_kicked_needs_the_main_thread() -> None:
    errors: list[BaseException] = []

    def body() -> None:
        try:
            run_scenario("save-while-running-kicked", 1)
        except VmmError as err:
            errors.append(err)

    worker = threading.Thread(target=body)
    worker.start()
    worker.join(10)
    assert len(errors) == 1 and "main thread" in str(errors[0])


def test_cli_save_while_running(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    done = _cli("save-while-running", "--report", str(out))
    assert done.returncode == 0, done.stderr
    report = ScenarioReport.from_json(out.read_text())
    assert len(report.violations) == SAVE_WHILE_RUNNING_ITERATIONS * SAVES
    assert {v.tid for v in report.violations} == {report.facts["saver_tid"]}


def test_restores() -> None:
    mmio = report_of("restore-mmio")
    assert [(v.ioctl, v.kind, v.exit_reason) for v in mmio.violations] == [
        ("KVM_SET_REGS", "restore", "KVM_EXIT_MMIO")] * N
    pio = report_of("restore-pio")
    assert pio.violations == []
    assert [(v.ioctl, v.rule, v.port) for v in pio.sanctioned] == [
        ("KVM_SET_REGS", "restore-after-pio", guest.SERIAL_PORT)] * N


# PVM runs every guest instruction in KVM's emulator, so its IN/OUT exits take the emulated
# path; VMX/SVM take the fast path for a plain `in`/`out` (tracer.policy's docstring).
EMULATED_PIO = Path("/sys/module/kvm_pvm").exists()


@pytest.mark.parametrize(("name", "direction", "count", "written"), [
    # The OUT was written back before the exit (emulated) or its completion is dropped since
    # the restore moved RIP (fast): KVM leaves the restored registers alone.
    ("restore-pio", "out", 1, ""),
    ("restore-pio-rep-outs", "out", 1, ""),
    # Emulated IN: the RIP decoded before the exit is written back over the restored one.
    # Fast IN: dropped, since the restore moved RIP (the one IN case KVM lets through).
    ("restore-pio-in", "in", 1, "rip" if EMULATED_PIO else ""),
    # String IN is always emulated: the restored RCX/RDI are used up and RIP is KVM's own.
    ("restore-pio-rep-ins", "in", guest.STRING_IO_COUNT, "rcx,rdi,rip"),
])
def test_what_kvm_does_with_a_restore_after_each_kind_of_port_exit(
        name: str, direction: str, count: int, written: str) -> None:
    """Real KVM: a KVM_SET_REGS that moved RIP and changed RAX/RCX/RDI/RSI while the port exit
    was pending, then the completion; the registers read back show what KVM wrote into the
    restored state. The verdicts follow: a restore after an OUT is sanctioned, after an IN a
    violation."""
    report = report_of(name)
    assert report.facts["fields_written_by_completion"] == written
    assert report.facts["restores_intact"] == (N if not written else 0)
    assert report.facts["pio_exits"] == f"{direction}x{count}"
    assert {v.direction for v in report.violations + report.sanctioned} == {direction}
    if direction == "out":
        assert report.violations == []
        assert [(v.kind, v.rule) for v in report.sanctioned] == [
            ("restore", "restore-after-pio")] * N
    else:
        assert report.sanctioned == []
        assert [(v.ioctl, v.kind, v.direction) for v in report.violations] == [
            ("KVM_SET_REGS", "restore", "in")] * N


def test_port_7e() -> None:
    on = report_of("port-7e")
    assert on.violations == [] and len(on.sanctioned) == N * (SAVES + RESTORES)
    assert {(v.rule, v.port, v.size) for v in on.sanctioned} == {("port-0x7e", 0x7E, 2)}
    off = report_of("port-7e-quirk-disabled")
    assert len(off.violations) == N * SAVES
    assert {(v.kind, v.port) for v in off.violations} == {("save", 0x7E)}
    assert {(v.kind, v.rule) for v in off.sanctioned} == {("restore", "restore-after-pio")}
    assert len(off.sanctioned) == N * RESTORES


@pytest.mark.parametrize("name", ["dup-fd", "dup2-fd", "dup3-fd"])
def test_dup_fd(name: str) -> None:
    report = report_of(name)
    (vcpu,) = report.vcpus
    assert vcpu.dup_fds == [report.facts["dup_fd"]] and vcpu.fd != report.facts["dup_fd"]
    if name != "dup-fd":
        assert report.facts["dup_fd"] in (200, 201)
    assert len(report.violations) == N * SAVES
    assert {v.vcpu_fd for v in report.violations} == {report.facts["dup_fd"]}
    # KVM_RUN itself still went through the original fd.
    assert {e.fd for e in report.ioctl_log if e.name == "KVM_RUN"} == {vcpu.fd}


def test_fd_reuse() -> None:
    report = report_of("fd-reuse")
    assert report.facts["fd_reused"] is True, report.notes
    old, new = report.vcpus
    assert old.fd == new.fd and old.closed_ns is not None and old.closed_ns < new.created_ns
    assert report.facts["abandoned_exit"] == "KVM_EXIT_IO"


@pytest.mark.parametrize(("vms", "vcpus"), [(2, 2), (2, 3)])
def test_multi(vms: int, vcpus: int) -> None:
    report = run_scenario("multi", N, vms=vms, vcpus=vcpus)
    assert len(report.vcpus) == vms * vcpus
    assert _rebuild_mid_completion(report) == {_key(e) for e in report.violations}
    by_vcpu = Counter((v.vm_fd, v.vcpu_id) for v in report.violations)
    for info in report.vcpus:
        want = N * SAVES if info.buggy else 0
        assert info.buggy == (info.vcpu_id % 2 == 1)
        assert by_vcpu[(info.vm_fd, info.vcpu_id)] == want, info
        assert len(info.run_tids) == 1  # one thread per vCPU
    assert len({t for i in report.vcpus for t in i.run_tids}) == vms * vcpus


def test_loop_io_counts_exits() -> None:
    report = report_of("loop-io")
    assert report.exits["KVM_EXIT_IO"] == report.iterations
    assert float(report.facts["ns_per_exit"]) > 0


def test_process_exit_leaves_completions_pending() -> None:
    report = report_of("process-exit")
    assert [p.exit_reason for p in report.pending_at_end] == ["KVM_EXIT_IO", "KVM_EXIT_MMIO"]
    assert report.pending_at_end[0].port == guest.SERIAL_PORT
    assert report.pending_at_end[1].gpa == guest.MMIO_GPA
    assert report.violations == []


def test_sequence_program_gives_each_exit_in_order() -> None:
    """The raw bindings: one of each exit, answered, with the results checked after completion."""
    program = guest.sequence()
    with Kvm() as kvm:
        vm = kvm.create_vm()
        vm.set_tss_addr()
        mem = vm.add_memory(0, guest.MEMORY_SIZE)
        vm.enable_user_space_msr()
        mem.write(program.load_addr, program.code)
        vcpu = vm.create_vcpu(0)
        vcpu.setup_real_mode(program.load_addr)
        seen = []
        for _ in program.exits:
            reason = vcpu.run()
            seen.append(abi.exit_reason_name(reason))
            access = vcpu.exit_access()
            assert (vcpu.pending is not None) == (seen[-1] in PENDING)
            if isinstance(access, PioExit):
                assert access.port == guest.SERIAL_PORT
                if access.direction == "out":
                    assert vcpu.io_out_data() == b"\x41"
                else:
                    vcpu.set_io_in_data(0x99)
            elif isinstance(access, MmioExit):
                assert access.gpa == guest.MMIO_GPA and access.length == 1
                if access.is_write:
                    assert access.data == b"\x42"
                else:
                    vcpu.set_mmio_read_data(0x77)
            elif isinstance(access, MsrExit):
                assert access.index == guest.USER_MSR
                if access.is_write:
                    assert access.data == 0x1234
                    vcpu.set_msr_result()
                else:
                    vcpu.set_msr_result(0xAABBCCDD_11223344)
            if seen[-1] == "KVM_EXIT_X86_RDMSR":
                assert vcpu.complete_pending() == KVM_EXIT_INTR
                regs = vcpu.get_regs()
                assert (regs.rdx, regs.rax & 0xFFFFFFFF) == (0xAABBCCDD, 0x11223344)
        assert tuple(seen) == program.exits
        assert vcpu.run() == abi.EXIT_REASON_BY_NAME["KVM_EXIT_HLT"]  # hlt forever
        assert vcpu.pending is None
        # Every vCPU-fd ioctl went to the log, in order.
        assert [e.name for e in kvm.ioctl_log][:3] == ["KVM_GET_SREGS", "KVM_SET_SREGS",
                                                       "KVM_SET_REGS"]
        assert all(e.fd == vcpu.fd for e in kvm.ioctl_log)


def test_quirk_disable_is_recorded() -> None:
    with Kvm() as kvm:
        vm = kvm.create_vm()
        assert not vm.quirk_7e_disabled
        vm.disable_quirks(abi.KVM_X86_QUIRK_OUT_7E_INC_RIP)
        assert vm.quirk_7e_disabled


def _cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tracer.vmm", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout, check=False)


def test_cli_writes_report(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    done = _cli("buggy-mmio-write", "--iterations", "3", "--report", str(out))
    assert done.returncode == 0, done.stderr
    report = ScenarioReport.from_json(out.read_text())
    assert report.pid != os.getpid() and len(report.violations) == 3 * SAVES
    assert len(report.ioctl_log) > 0


def test_cli_stdout_multi_without_logs() -> None:
    done = _cli("multi", "--iterations", "2", "--vms", "1", "--vcpus", "3", "--no-logs")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert len(data["vcpus"]) == 3 and data["ioctl_log"] == []
    assert len(data["violations"]) == 2 * SAVES  # vCPU 1 only


def test_cli_process_exit_holds_with_vcpus_open(tmp_path: Path) -> None:
    """While held, the process still has both vCPU fds open with completions owed."""
    out = tmp_path / "r.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tracer.vmm", "process-exit", "--start-delay", "0.1",
         "--hold-before-exit", "1.5", "--report", str(out)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 15
        while not (out.exists() and out.read_text().endswith("\n")):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        report = ScenarioReport.from_json(out.read_text())
        assert report.pid == proc.pid and len(report.pending_at_end) == 2
        links = {os.readlink(f"/proc/{proc.pid}/fd/{p.vcpu_fd}") for p in report.pending_at_end}
        assert links == {"anon_inode:kvm-vcpu:0", "anon_inode:kvm-vcpu:1"}
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_default_iterations_are_quick() -> None:
    t0 = time.monotonic()
    report = run_scenario("buggy-io-out")
    assert report.iterations == DEFAULT_ITERATIONS and time.monotonic() - t0 < 2
