"""A daemon restart while a guest's completion is pending (tracer.handover): the new instance
keeps the pending state when nothing can have completed it, and drops it (no false alert) when
the VMM completed it while no daemon was watching."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import requires_kvm_bpf
from daemon_proc import DaemonProcess

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
    """A daemon on the shared state dir: what one instance hands over, the next one reads."""
    return DaemonProcess(state_dir=state_dir)


def stop(d: DaemonProcess) -> dict[str, Any]:
    """SIGTERM, exit 0, and its ``stopped`` line."""
    assert d.stop() == 0
    stopped = d.lines()[-1]
    d.cleanup()
    assert stopped["event"] == "stopped"
    return stopped


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
