"""A daemon restart while a guest's completion is pending (tracer.handover): the new instance
keeps the pending state when nothing can have completed it, and drops it (no false alert) when
the VMM completed it while no daemon was watching.

And a restart under a real QEMU guest that keeps running: its vCPU thread sleeps inside KVM_RUN
(SeaBIOS halted, see tests/qemu_vm.py), so the new instance must re-learn it as RUNNING from
/proc to attribute the exit that ends that KVM_RUN, then follow the guest through pause, save,
resume and quit without a false alert."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import requires_kvm_bpf
from daemon_proc import DaemonProcess
from metrics_scrape import Samples, scrape, series
from qemu_vm import QemuGuest, check_0x7e_sync, qemu_or_skip

pytestmark = [pytest.mark.e2e, requires_kvm_bpf]
REPO = Path(__file__).resolve().parents[2]

# A one-vCPU VMM driven line by line on stdin: "run" (OUT exit, left pending), "complete"
# (immediate_exit KVM_RUN), "save" (KVM_GET_REGS), "quit". Answers each command with "ok".
VMM = r"""
import sys
from tracer.vmm import guest
from tracer.vmm.kvm import Kvm
kvm = Kvm()
vm = kvm.create_vm()
vm.set_tss_addr()
vm.add_memory(0, guest.MEMORY_SIZE)
program = guest.out_loop()
vm.memory[0].write(program.load_addr, program.code)
vcpu = vm.create_vcpu(0)
vcpu.setup_real_mode(program.load_addr)
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "run":
        assert vcpu.run() == 2
    elif cmd == "complete":
        assert vcpu.complete_pending() == 10
    elif cmd == "save":
        vcpu.get_regs()
    elif cmd == "quit":
        break
    print("ok", flush=True)
"""


class Vmm:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", VMM], cwd=REPO, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.readline() == "ready"

    def readline(self, timeout_s: float = 30) -> str:
        import select

        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        assert ready, "the VMM did not answer"
        return self.proc.stdout.readline().strip()

    def do(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        assert self.readline() == "ok", f"VMM failed on {cmd!r}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def Daemon(state_dir: Path) -> DaemonProcess:
    """A daemon on the shared state dir: what one instance hands over, the next one reads.
    Strict (--inspection violation): the VMM's lone KVM_GET_REGS is the save mid-completion
    these tests follow across a restart (by default it would be an inspection)."""
    return DaemonProcess("--inspection", "violation", state_dir=state_dir)


def stop_lines(d: DaemonProcess) -> list[dict[str, Any]]:
    """SIGTERM, exit 0, and every line it printed, the last one ``stopped``."""
    assert d.stop() == 0
    lines = d.lines()
    d.cleanup()
    assert lines[-1]["event"] == "stopped"
    return lines


def stop(d: DaemonProcess) -> dict[str, Any]:
    """SIGTERM, exit 0, and its ``stopped`` line."""
    return stop_lines(d)[-1]


@pytest.fixture
def state_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kct-restart-state-") as tmp:
        yield Path(tmp)


def violations(d: DaemonProcess, pid: int, expect: int) -> list[dict[str, Any]]:
    """The pid's violation lines once ``expect`` of them are there (10 s at most)."""
    deadline = time.monotonic() + 10
    while True:
        found = [e for e in d.lines()
                 if e["event"] == "completion_violation" and e["pid"] == pid]
        if len(found) >= expect or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def restart_with_pending_exit(state_dir: Path,
                              in_gap: str | None) -> tuple[Vmm, DaemonProcess, dict[str, Any]]:
    vmm = Vmm()
    try:
        first = Daemon(state_dir)
        try:
            vmm.do("run")  # OUT exit: its completion is pending from here on
            stopped = stop(first)
        except BaseException:
            first.kill()
            raise
        if in_gap:
            vmm.do(in_gap)
        return vmm, Daemon(state_dir), stopped
    except BaseException:
        vmm.close()
        raise


def test_a_pending_completion_survives_a_restart(state_dir: Path) -> None:
    vmm, second, stopped = restart_with_pending_exit(state_dir, None)
    try:
        assert stopped["handover_pending"] >= 1
        handover = second.wait_for(lambda e: e["event"] == "handover")
        assert handover["pending_kept"] >= 1
        vmm.do("save")  # still mid-completion: a violation the new instance must see
        [v] = violations(second, vmm.proc.pid, 1)
        assert (v["ioctl"], v["exit_reason"], v["vcpu_id"]) == ("KVM_GET_REGS", "KVM_EXIT_IO", 0)
        vmm.do("complete")
        vmm.do("save")  # completed: no alert for this one...
        vmm.do("run")
        vmm.do("save")  # ...and one for this, which also shows the daemon has caught up
        assert [e["window"] for e in violations(second, vmm.proc.pid, 2)] == [
            v["window"], v["window"] + 1]
    finally:
        second.kill()
        vmm.close()


def test_a_completion_done_while_no_daemon_watched_raises_no_false_alert(
        state_dir: Path) -> None:
    vmm, second, stopped = restart_with_pending_exit(state_dir, "complete")
    try:
        assert stopped["handover_pending"] >= 1
        handover = second.wait_for(lambda e: e["event"] == "handover")
        assert handover["pending_dropped"] >= 1
        vmm.do("save")  # completed while no daemon watched: no alert...
        vmm.do("run")  # ...while the new instance tracks the next exit by itself
        vmm.do("save")
        [v] = violations(second, vmm.proc.pid, 2)
        assert v["ioctl"] == "KVM_GET_REGS" and v["exit_reason"] == "KVM_EXIT_IO"
    finally:
        second.kill()
        vmm.close()


def test_a_broken_handover_file_is_reported_and_ignored(state_dir: Path) -> None:
    (state_dir / "handover.json").write_text("{not json")
    d = Daemon(state_dir)  # kills itself if it never gets ready
    try:
        notice = d.wait_for(lambda e: e["event"] == "handover_ignored")
        assert "malformed" in notice["reason"]
        assert not (state_dir / "handover.json").exists()
    finally:
        d.kill()


# --- a real QEMU guest running through the restart ---------------------------------------------

SYNC = ("completion_sanctioned", "completion_violation")
# The scan can find QEMU's vCPU thread between two KVM_RUNs (it is inside one ~98% of the time):
# then nothing is re-learned and the daemon is restarted again, at most this many times in all.
RESTARTS = 3


@pytest.fixture
def qemu() -> str:
    return qemu_or_skip()


@pytest.fixture
def tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kct-qemu-restart-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def about(lines: list[dict[str, Any]], pid: int, *events: str) -> list[dict[str, Any]]:
    return [e for e in lines if e.get("pid") == pid and (not events or e["event"] in events)]


def lines_after(d: DaemonProcess, index: int, pid: int, event: str,
                timeout_s: float = 15) -> list[dict[str, Any]]:
    """The daemon's lines from ``index`` on, once one of them is ``event`` about ``pid``."""
    deadline = time.monotonic() + timeout_s
    while True:
        tail = d.lines()[index:]
        if about(tail, pid, event):
            return tail
        assert time.monotonic() < deadline, f"no {event} for pid {pid} after line {index}"
        time.sleep(0.05)


def handed_over(state_dir: Path, pid: int) -> list[dict[str, Any]]:
    """The hand-over file's entries for ``pid`` (read before the next instance consumes it)."""
    try:
        doc = json.loads((state_dir / "handover.json").read_text())
    except FileNotFoundError:
        return []
    return [p for p in doc["pending"] if p["pid"] == pid]


@dataclass
class QemuRestart:
    name: str
    pid: int
    vcpu_tid: int  # QEMU's "CPU 0/KVM" thread
    first: list[dict[str, Any]]  # every line of the instance that saw QEMU start
    second: list[dict[str, Any]]  # every line of the instance that saw it quit
    restarts: int  # instances started after the first one (see RESTARTS)
    inherited: list[dict[str, Any]]  # hand-over entries for QEMU the second one read
    metrics: Samples  # the second instance's, after the resume, while QEMU still ran

    def events(self, lines: list[dict[str, Any]], *events: str) -> list[dict[str, Any]]:
        return about(lines, self.pid, *events)

    def series(self, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
        return series(self.metrics, name, vm=self.name, **labels)


def restart_under_qemu(tmp: Path, state_dir: Path, *second_args: str,
                       reset: bool = False) -> QemuRestart:
    """A daemon sees QEMU boot SeaBIOS (and its 0x7e sync); SIGTERM; a new one on the same
    state dir with ``--trace-exits`` (so its first line about QEMU's vCPU says whether it
    caught the thread inside KVM_RUN) and ``second_args``; optionally a ``system_reset`` (a
    second boot, a second sync); QMP stop, save, cont, scrape, quit; the new one stops."""
    first = DaemonProcess(state_dir=state_dir)
    second: DaemonProcess | None = None
    guest: QemuGuest | None = None
    try:
        guest = QemuGuest(tmp)  # after the first daemon: it sees the vCPU created
        pid = guest.pid
        qmp = guest.connect()
        first.wait_for(lambda e: e["event"] == "vcpu_created" and e.get("pid") == pid)
        qmp.command("cont")
        guest.wait_for_firmware(timeout_s=60)
        first.wait_for(lambda e: e["event"] in SYNC and e.get("pid") == pid)
        vcpu_tid = guest.vcpu_tids()[0]
        first_lines = stop_lines(first)

        restarts, inherited = 0, []
        while True:
            restarts += 1
            inherited = handed_over(state_dir, pid)
            second = DaemonProcess("--trace-exits", *second_args, state_dir=state_dir)
            seen = second.wait_for(lambda e: e["event"].startswith("trace_")
                                   and e.get("pid") == pid, timeout_s=15)
            if seen["event"] == "trace_userspace_exit" or restarts == RESTARTS:
                break
            stop_lines(second)  # its scan found the thread outside KVM_RUN: try again
            second = None

        if reset:
            qmp.command("system_reset")  # the vCPU restarts at the reset vector: SeaBIOS again
            guest.wait_for_firmware(timeout_s=60, times=2)
            second.wait_for(lambda e: e["event"] in SYNC and e.get("pid") == pid)
        qmp.command("stop")
        assert guest.status() == "paused"
        mark = len(second.lines())
        guest.migrate_to_file(tmp / "vm.state")
        assert (tmp / "vm.state").stat().st_size > 0
        qmp.command("cont")
        assert guest.status() == "running"
        # Past the save's reads and the resume's writes, the vCPU ran and exited again: every
        # line about the stop, save and resume is out by then.
        tail = lines_after(second, mark, pid, "trace_state_ioctl")
        last_ioctl = max(n for n, e in enumerate(tail) if e["event"] == "trace_state_ioctl"
                         and e.get("pid") == pid)
        lines_after(second, mark + last_ioctl + 1, pid, "trace_userspace_exit")
        metrics = scrape(second.metrics_url)

        assert guest.quit() == 0
        second.wait_for(lambda e: e["event"] == "process_exit" and e.get("pid") == pid)
        second_lines = stop_lines(second)
        second = None
        return QemuRestart(guest.name, pid, vcpu_tid, first_lines, second_lines, restarts,
                           inherited, metrics)
    finally:
        if guest is not None:
            guest.kill()
        first.kill()
        if second is not None:
            second.kill()


def assert_restarted_under_a_running_guest(r: QemuRestart) -> None:
    """The first instance saw QEMU start; the second adopted its vCPU from /proc as RUNNING,
    then counted and named it until QEMU quit."""
    [created] = r.events(r.first, "vcpu_created")
    assert (created["vm"], created["vcpu_id"]) == (r.name, 0)

    ready = next(e for e in r.second if e["event"] == "ready")
    assert ready["vcpus_adopted"] >= 1  # QEMU's vCPU fd, and any other VM's on the host
    # Found by the start-up scan: neither created under this instance nor adopted late.
    assert r.events(r.second, "vcpu_created", "vcpu_adopted") == []
    # Its first line about QEMU is an exit: of a KVM_RUN that began before its probes did,
    # which only the re-learned RUNNING state (with the thread) lets it attribute.
    first_trace = next(e for e in r.events(r.second) if e["event"].startswith("trace_"))
    assert first_trace["event"] == "trace_userspace_exit", (
        f"after {r.restarts} restart(s) the vCPU thread's first line is still {first_trace}")
    assert (first_trace["tid"], first_trace["vcpu_id"]) == (r.vcpu_tid, 0)
    if r.inherited:  # stopped mid-exit: that completion was pending, but the thread re-ran it
        [handover] = [e for e in r.second if e["event"] == "handover"]
        assert handover["pending_dropped"] >= len(r.inherited)

    assert r.events(r.first, "completion_snapshot") == []
    assert {e["vm"] for e in r.events(r.second) if "vm" in e} <= {r.name}  # named in metrics
    # The save read the state: checked, with nothing pending.
    saves = [e for e in r.events(r.second, "trace_state_ioctl")
             if e["ioctl"].startswith("KVM_GET_")]
    assert saves and {e["tid"] for e in saves} == {r.vcpu_tid}

    io = sum(r.series("kvm_completion_userspace_exits_total", exit_reason="KVM_EXIT_IO").values())
    assert io >= 1  # the halted guest's timer ticks
    # QMP stop kicked the vCPU out of KVM_RUN (-EINTR).
    assert sum(r.series("kvm_completion_userspace_exits_total",
                        exit_reason="none_run_interrupted").values()) >= 1
    assert r.series("kvm_completion_vcpus") == {(("vm", r.name),): 1.0}
    [info] = r.series("kvm_completion_vm_info", pid=str(r.pid))
    assert dict(info)["vmm"] == "qemu"
    assert r.second[-1]["userspace_exits"] >= io


def test_a_restart_under_a_running_qemu_guest(qemu: str, tmp: Path, state_dir: Path) -> None:
    r = restart_under_qemu(tmp, state_dir)
    assert_restarted_under_a_running_guest(r)
    sync = check_0x7e_sync(r.events(r.first), r.name)
    assert {e["rule"] for e in sync} == {"port-0x7e"}
    for lines in (r.first, r.second):
        assert r.events(lines, "completion_violation", "completion_snapshot") == []


def test_a_qemu_sync_after_the_restart_is_reported_by_the_second_instance_alone(
        qemu: str, tmp: Path, state_dir: Path) -> None:
    """``--no-sanction port-0x7e`` on the second instance only; a ``system_reset`` after the
    restart boots SeaBIOS again, whose 0x7e sync that instance must report on the adopted vCPU
    (the first one, still sanctioning it, saw only the first boot's)."""
    r = restart_under_qemu(tmp, state_dir, "--no-sanction", "port-0x7e", reset=True)
    assert_restarted_under_a_running_guest(r)
    ready = next(e for e in r.second if e["event"] == "ready")
    assert "port-0x7e" not in ready["policy"]["sanctions"]

    before = check_0x7e_sync(r.events(r.first), r.name)
    assert {e["rule"] for e in before} == {"port-0x7e"}
    assert r.events(r.first, "completion_violation") == []
    after = check_0x7e_sync(r.events(r.second), r.name)
    saves = [e for e in after if e["kind"] == "save"]
    assert saves and all(e["event"] == "completion_violation"
                         and e["rule"] == "save-mid-completion" for e in saves)
    assert all(e["rule"] == "restore-after-pio" for e in after if e["kind"] == "restore")
    got = r.series("kvm_completion_violations_total")
    assert sum(got.values()) == len(r.events(r.second, "completion_violation")) == len(saves)
    [snap] = r.events(r.second, "completion_snapshot")  # several saves in one pending window
    assert snap["ioctls"] == [e["ioctl"] for e in saves]


def test_a_start_right_after_a_sigkill_waits_for_the_lock_then_runs(state_dir: Path) -> None:
    """A SIGKILLed daemon holds the lock until its programs are torn down: a new one started at
    once (the systemd Restart= case) waits for it, says so in one line, and gets ready."""
    first = Daemon(state_dir)
    first.proc.kill()  # no wait(): the next start races the dying process
    second = Daemon(state_dir)
    try:
        first.proc.wait(timeout=30)
        events = [e["event"] for e in second.lines()]
        assert "ready" in events
        # Tearing the killed one's programs down takes ~1.5 s here, the new one reaches the
        # lock in ~0.2 s: it waits, and says so once, naming the holder.
        waits = [e for e in second.lines() if e["event"] == "waiting_for_lock"]
        assert len(waits) == 1 and waits[0]["holder_pid"] == str(first.proc.pid)
        assert events.index("waiting_for_lock") < events.index("ready")
        assert stop(second)["event"] == "stopped"
    finally:
        first.cleanup()
        second.cleanup()


def test_a_start_next_to_a_live_instance_gives_up_after_the_wait(state_dir: Path) -> None:
    first = Daemon(state_dir)
    try:
        done = subprocess.run([sys.executable, "-m", "tracer", "run", "--log-format", "json",
                               "--state-dir", str(state_dir), "--no-metrics",
                               "--lock-wait", "0.5"], cwd=REPO, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode != 0
        assert "Traceback" not in done.stderr
        waits = [json.loads(line) for line in done.stdout.splitlines()
                 if '"waiting_for_lock"' in line]
        assert len(waits) == 1 and waits[0]["holder_pid"] == str(first.proc.pid)
        assert (f"another kvm-completion-tracer is already running (pid {first.proc.pid}"
                in done.stderr) and "waited 0.5 s for it to exit" in done.stderr
    finally:
        stop(first)
        first.cleanup()
