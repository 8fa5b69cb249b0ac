"""A real QEMU guest for the end-to-end tests: the process, and a tiny QMP client.

No disk: SeaBIOS runs (thousands of port exits, the kvmvapic option ROM's ``OUT 0x7e``), finds
no bootable device and halts (QEMU's default: no reboot-timeout). With the in-kernel irqchip a
halted vCPU sleeps inside KVM_RUN; the timer still wakes it ~18 times a second for a couple of
port exits. Every wait here is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import ci_enabled

QEMU = "qemu-system-x86_64"
NO_BOOT_DEVICE = "No bootable device"
STATE_IOCTL = re.compile(r"^KVM_(GET|SET)_[A-Z0-9_]+$")
VCPU_THREAD = re.compile(r"CPU (\d+)/KVM")  # QEMU's thread names with -name debug-threads=on


def qemu_binary() -> str | None:
    return shutil.which(QEMU)


def qemu_or_skip() -> str:
    """The QEMU binary; a skip without it, a failure under CI=true (where it must be there)."""
    binary = qemu_binary()
    if binary is None:
        why = f"{QEMU} is not installed (scripts/setup-host.sh test installs it)"
        if ci_enabled(os.environ):
            pytest.fail(f"{why}; CI=true, so this must not be skipped")
        pytest.skip(why)
    return binary


class QmpError(RuntimeError):
    pass


class Qmp:
    """QMP over a unix socket: one command at a time, asynchronous events kept aside."""

    def __init__(self, path: Path, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        sock.settimeout(timeout_s)
        self.sock = sock
        self.reader = sock.makefile("r", encoding="utf-8")
        self.events: list[dict[str, Any]] = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError(f"no QMP greeting: {greeting}")
        self.command("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.reader.readline()
        if not line:
            raise QmpError("QMP connection closed")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def command(self, name: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QmpError(f"{name}: {reply['error']}")
            return reply.get("return")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


class QemuGuest:
    """``qemu-system-x86_64 -enable-kvm`` with no disk, named ``guest=NAME``, started paused."""

    def __init__(self, tmp: Path, name: str | None = None) -> None:
        self.tmp = tmp
        self.name = name or f"kct-e2e-{uuid.uuid4().hex[:10]}"
        self.qmp_path = tmp / "qmp.sock"
        self.log = tmp / "qemu.log"
        self.firmware_log = tmp / "seabios.log"  # SeaBIOS prints its progress to port 0x402
        binary = qemu_binary()
        if binary is None:
            raise FileNotFoundError(QEMU)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [binary, "-enable-kvm", "-name", f"guest={self.name},debug-threads=on",
                 "-machine", "pc",
                 "-m", "64", "-smp", "1", "-nodefaults", "-display", "none", "-vga", "none",
                 "-serial", "none", "-monitor", "none",
                 "-chardev", f"file,id=seabios,path={self.firmware_log}",
                 "-device", "isa-debugcon,iobase=0x402,chardev=seabios",
                 "-qmp", f"unix:{self.qmp_path},server=on,wait=off", "-S"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.qmp: Qmp | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def connect(self, timeout_s: float = 15) -> Qmp:
        deadline = time.monotonic() + timeout_s
        while not self.qmp_path.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"qemu exited {self.proc.returncode}: "
                                     f"{self.log.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise AssertionError("qemu's QMP socket never appeared")
            time.sleep(0.05)
        self.qmp = Qmp(self.qmp_path, timeout_s=max(1.0, deadline - time.monotonic()))
        return self.qmp

    def wait_for_firmware(self, text: str = NO_BOOT_DEVICE, timeout_s: float = 30,
                          times: int = 1) -> None:
        """Until SeaBIOS has printed ``text`` on its debug port (after all its option ROMs)
        ``times`` times in all: once per boot, and the log survives a ``system_reset``."""
        deadline = time.monotonic() + timeout_s
        while self.firmware_log.read_text(errors="replace").count(text) < times:
            if self.proc.poll() is not None:
                raise AssertionError(f"qemu exited {self.proc.returncode}: "
                                     f"{self.log.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise AssertionError(f"SeaBIOS never printed {text!r}: "
                                     f"{self.firmware_log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)

    def vcpu_tids(self) -> dict[int, int]:
        """vCPU index -> tid of the QEMU thread that runs it (named "CPU n/KVM")."""
        out: dict[int, int] = {}
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                if m := VCPU_THREAD.fullmatch((task / "comm").read_text().strip()):
                    out[int(m[1])] = int(task.name)
        return out

    def status(self) -> str:
        assert self.qmp is not None
        return str(self.qmp.command("query-status")["status"])

    def migrate_to_file(self, path: Path, timeout_s: float = 30) -> dict[str, Any]:
        """``migrate exec:cat > path`` (QEMU 7.2 has no ``file:`` URI) until it completes."""
        assert self.qmp is not None
        self.qmp.command("migrate", uri=f"exec:cat > {path}")
        deadline = time.monotonic() + timeout_s
        while True:
            info: dict[str, Any] = self.qmp.command("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise AssertionError(f"migration {status}: {info}")
            if time.monotonic() > deadline:
                self.qmp.command("migrate_cancel")
                raise AssertionError(f"migration did not complete: {info}")
            time.sleep(0.05)

    def quit(self, timeout_s: float = 10) -> int:
        if self.qmp is not None and self.proc.poll() is None:
            with contextlib.suppress(QmpError, OSError):  # it may close before the reply
                self.qmp.command("quit")
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(OSError):
                self.qmp.close()
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def check_0x7e_sync(lines: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """Every alert and sanctioned line in ``lines`` (one QEMU's), checked to be the kvmvapic
    sync of one boot: one window on vCPU 0, an ``OUT`` to port 0x7e pending, state ioctls only,
    the reads before the writes. Returns them."""
    sync = [e for e in lines if e["event"] in ("completion_sanctioned", "completion_violation")]
    assert sync
    for e in sync:
        assert (e["vm"], e["vmm"], e["vcpu_id"], e["exit_reason"]) == (
            name, "qemu", 0, "KVM_EXIT_IO"), e
        assert e["access"]["port"] == "0x7e" and e["access"]["direction"] == "out", e
        assert STATE_IOCTL.match(e["ioctl"]), e
        assert e["kind"] == ("save" if e["ioctl"].startswith("KVM_GET_") else "restore"), e
    assert len({e["window"] for e in sync}) == 1, "one sync per boot"
    ioctls = [e["ioctl"] for e in sync]
    assert any(i.startswith("KVM_GET_") for i in ioctls)
    assert any(i.startswith("KVM_SET_") for i in ioctls)
    assert ioctls.index(next(i for i in ioctls if i.startswith("KVM_SET_"))) > max(
        n for n, i in enumerate(ioctls) if i.startswith("KVM_GET_")), "reads, then writes back"
    return sync
