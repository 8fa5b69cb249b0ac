"""A real QEMU guest for the end-to-end tests: the process, and a tiny QMP client.

No disk: SeaBIOS runs (thousands of port exits, the kvmvapic option ROM's ``OUT 0x7e``), finds
no bootable device and waits to retry. Every wait here is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

QEMU = "qemu-system-x86_64"
NO_BOOT_DEVICE = "No bootable device"


def qemu_binary() -> str | None:
    return shutil.which(QEMU)


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
                [binary, "-enable-kvm", "-name", f"guest={self.name}", "-machine", "pc",
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

    def wait_for_firmware(self, text: str = NO_BOOT_DEVICE, timeout_s: float = 30) -> None:
        """Until SeaBIOS has printed ``text`` on its debug port (after all its option ROMs)."""
        deadline = time.monotonic() + timeout_s
        while text not in self.firmware_log.read_text(errors="replace"):
            if self.proc.poll() is not None:
                raise AssertionError(f"qemu exited {self.proc.returncode}: "
                                     f"{self.log.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise AssertionError(f"SeaBIOS never printed {text!r}: "
                                     f"{self.firmware_log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)

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
