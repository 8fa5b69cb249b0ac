"""The daemon against a real QEMU guest (issue 4 item 6).

Debian's QEMU 7.2 with ``-enable-kvm`` boots SeaBIOS with no disk: thousands of port exits, and
the kvmvapic option ROM's ``OUT 0x7e``, inside which QEMU reads and writes back the whole vCPU
state (the sanctioned ``port-0x7e`` case). Then the test pauses the guest over QMP, saves it
with ``migrate exec:cat > FILE``, resumes and quits it. A correct VMM: the daemon must name the
VM, count its exits, log the 0x7e sync as sanctioned and raise nothing. With the sanction
switched off the same sync must come out as violations, which proves the daemon saw it.

Every daemon line is filtered by QEMU's pid: other daemons and VMMs may run on the host at the
same time, and this daemon sees them all.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import isolated_daemon_args, requires_kvm_bpf
from metrics_scrape import Labels, Samples, scrape, series
from qemu_vm import QemuGuest, check_0x7e_sync, qemu_or_skip

pytestmark = [pytest.mark.e2e, requires_kvm_bpf]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def qemu() -> str:
    return qemu_or_skip()


@pytest.fixture
def tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kct-qemu-e2e-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Daemon:
    """``python -m tracer run`` with JSON lines in a file, its own state dir and metrics port."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.out, self.err = tmp / "daemon.jsonl", tmp / "daemon.err"
        isolation, self.metrics_url = isolated_daemon_args()
        self.state_dir = Path(isolation[isolation.index("--state-dir") + 1])
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tracer", "run", "--log-format", "json", "--log-level",
                 "debug", *isolation, *args], cwd=REPO, stdout=out, stderr=err)

    def lines(self) -> list[dict[str, Any]]:
        text = self.out.read_text()
        complete = text[:text.rfind("\n") + 1]  # a line still being written is not parsed
        return [json.loads(raw) for raw in complete.splitlines()]  # every line must be JSON

    def for_pid(self, pid: int, *events: str) -> list[dict[str, Any]]:
        return [e for e in self.lines() if e.get("pid") == pid and e["event"] in events]

    def wait_for(self, what: str, match: Callable[[dict[str, Any]], bool],
                 timeout_s: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            for line in self.lines():
                if match(line):
                    return line
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode} waiting for {what}: "
                                     f"{self.err.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
            time.sleep(0.05)

    def settle(self, pid: int, quiet_s: float = 0.5, timeout_s: float = 15) -> None:
        """Until no new line about ``pid`` came for ``quiet_s``."""
        deadline = time.monotonic() + timeout_s
        seen, quiet_since = -1, time.monotonic()
        while time.monotonic() - quiet_since < quiet_s:
            count = sum(1 for e in self.lines() if e.get("pid") == pid)
            if count != seen:
                seen, quiet_since = count, time.monotonic()
            if time.monotonic() > deadline:
                raise AssertionError(f"the daemon kept logging about pid {pid}")
            time.sleep(0.05)

    def scrape(self) -> Samples:
        return scrape(self.metrics_url)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        shutil.rmtree(self.state_dir, ignore_errors=True)


@dataclass
class GuestRun:
    name: str
    pid: int
    lines: list[dict[str, Any]]  # the daemon's lines about QEMU's pid
    stopped: dict[str, Any]  # the daemon's last line (totals over everything it saw)
    metrics: Samples  # scraped while the guest ran, after the save
    migration: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for e in self.lines:
            key = e["event"] + (f":{e['rule']}" if "rule" in e else "")
            counts[key] = counts.get(key, 0) + 1
        exits = {dict(k)["exit_reason"]: int(v)
                 for k, v in self.series("kvm_completion_userspace_exits_total").items()}
        secs = ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items())
        return (f"{self.name} pid {self.pid}: exits {exits}; lines {counts}; "
                f"migration {self.migration.get('total-time')} ms; {secs}")

    def events(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.lines if e["event"] == event]

    def series(self, name: str, **labels: str) -> dict[Labels, float]:
        """Samples of ``name`` for this VM whose labels include ``labels``."""
        return series(self.metrics, name, vm=self.name, **labels)


def run_guest(tmp: Path, *daemon_args: str) -> GuestRun:
    """Daemon up; QEMU boots SeaBIOS to "no bootable device"; stop, save (migrate to a file),
    resume, scrape, quit; daemon down. Everything bounded, everything killed on the way out."""
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    daemon = Daemon(tmp, *daemon_args)
    guest: QemuGuest | None = None
    try:
        daemon.wait_for("ready", lambda e: e["event"] == "ready", timeout_s=90)
        timings["ready"] = time.monotonic() - t0
        guest = QemuGuest(tmp)  # -S: the vCPU exists, the guest has not run yet
        pid = guest.pid
        qmp = guest.connect()
        assert guest.status() == "prelaunch"
        daemon.wait_for("vcpu_created", lambda e: e["event"] == "vcpu_created"
                        and e.get("pid") == pid)

        t_boot = time.monotonic()
        qmp.command("cont")
        guest.wait_for_firmware(timeout_s=60)
        timings["firmware"] = time.monotonic() - t_boot
        # The kvmvapic ROM's 0x7e sync ran before that text: wait until the daemon shows it.
        daemon.wait_for("the port 0x7e sync", lambda e: e.get("pid") == pid
                        and e["event"] in ("completion_sanctioned", "completion_violation"))
        daemon.settle(pid)

        t_save = time.monotonic()
        qmp.command("stop")
        assert guest.status() == "paused"
        state = tmp / "vm.state"
        migration = guest.migrate_to_file(state)
        assert state.stat().st_size > 0
        assert guest.status() == "postmigrate"
        qmp.command("cont")
        assert guest.status() == "running"
        timings["save"] = time.monotonic() - t_save
        time.sleep(0.5)
        daemon.settle(pid)
        metrics = daemon.scrape()  # while QEMU still runs: its vCPU gauge is live

        assert guest.quit() == 0
        daemon.wait_for("process_exit", lambda e: e["event"] == "process_exit"
                        and e.get("pid") == pid)
        assert daemon.stop() == 0
        lines = daemon.lines()
        timings["total"] = time.monotonic() - t0
        run = GuestRun(name=guest.name, pid=pid, lines=[e for e in lines if e.get("pid") == pid],
                       stopped=lines[-1], metrics=metrics, migration=migration, timings=timings)
        print(run.summary())  # shown with -s, or on failure
        return run
    finally:
        if guest is not None:
            guest.kill()
        daemon.kill()


def assert_named_and_counted(run: GuestRun) -> None:
    [created] = run.events("vcpu_created")
    assert (created["vm"], created["vcpu_id"]) == (run.name, 0)
    assert {e["vm"] for e in run.lines if "vm" in e} == {run.name}
    assert run.stopped["event"] == "stopped"

    io_exits = sum(run.series("kvm_completion_userspace_exits_total",
                              exit_reason="KVM_EXIT_IO").values())
    assert io_exits > 1000, "SeaBIOS makes thousands of port exits"
    # The stopped totals cover every VM on the host, this one included.
    assert run.stopped["userspace_exits"] >= io_exits
    assert run.stopped["pending_exits"] >= io_exits
    assert run.series("kvm_completion_vcpus") == {(("vm", run.name),): 1.0}
    [info] = run.series("kvm_completion_vm_info", pid=str(run.pid))
    assert dict(info)["vmm"] == "qemu"


def the_0x7e_sync(run: GuestRun) -> list[dict[str, Any]]:
    """Every alert and sanctioned line about QEMU, checked to be the kvmvapic sync."""
    return check_0x7e_sync(run.lines, run.name)


def test_qemu_boot_pause_save_resume_raises_nothing(qemu: str, tmp: Path) -> None:
    run = run_guest(tmp)
    assert_named_and_counted(run)

    assert run.events("completion_violation") == []
    assert run.events("completion_snapshot") == []
    sync = the_0x7e_sync(run)
    assert {e["rule"] for e in sync} == {"port-0x7e"}
    assert run.stopped["sanctioned"] >= len(sync)

    assert run.series("kvm_completion_sanctioned_total") == {
        (("rule", "port-0x7e"), ("vm", run.name)): float(len(sync))}
    for name, labels in run.metrics:
        if dict(labels).get("vm") == run.name:
            assert "violation" not in name and "snapshot" not in name, (name, labels)


@pytest.mark.parametrize("off", [["port-0x7e"], ["port-0x7e", "restore-after-pio"]],
                         ids=["port-0x7e", "port-0x7e+restore-after-pio"])
def test_qemu_0x7e_sync_is_reported_with_the_sanction_off(qemu: str, tmp: Path,
                                                          off: list[str]) -> None:
    run = run_guest(tmp, *(arg for rule in off for arg in ("--no-sanction", rule)))
    assert_named_and_counted(run)

    sync = the_0x7e_sync(run)
    violations = run.events("completion_violation")
    sanctioned = run.events("completion_sanctioned")
    saves = [e for e in sync if e["kind"] == "save"]
    restores = [e for e in sync if e["kind"] == "restore"]
    assert all(e["rule"] != "port-0x7e" for e in sync)
    # QEMU's reads are now saves mid-completion; its writes are restores after a port exit,
    # which the ABI tolerates unless that sanction is off too.
    assert saves and all(e in violations for e in saves)
    assert all(e["rule"] == "save-mid-completion" and e["severity"] == "error" for e in saves)
    if "restore-after-pio" in off:
        assert sanctioned == [] and violations == sync
        assert all(e["severity"] == "critical" for e in restores)
    else:
        assert sanctioned == restores and {e["rule"] for e in restores} == {"restore-after-pio"}
    # Several saves in one pending window: a snapshot taken mid-completion.
    [snap] = run.events("completion_snapshot")
    assert snap["vm"] == run.name and snap["exit_reason"] == "KVM_EXIT_IO"
    assert snap["ioctls"] == [e["ioctl"] for e in saves]

    got = run.series("kvm_completion_violations_total")
    assert sum(got.values()) == len(violations)
    assert {dict(labels)["ioctl"] for labels in got} == {e["ioctl"] for e in violations}
    assert run.series("kvm_completion_snapshots_total") == {(("vm", run.name),): 1.0}
    assert run.stopped["violations"] >= len(violations)
