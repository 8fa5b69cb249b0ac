"""The daemon under the systemd unit's sandbox, rebuilt without systemd (tests/unit_sandbox.py):
capabilities, no_new_privs and systemd 252's seccomp filters (SystemCallFilter=,
MemoryDenyWriteExecute=, RestrictAddressFamilies=, SystemCallArchitectures=, ...), all derived
from deploy/systemd/kvm-completion-tracer.service, so an edit of the unit is tested as written.

First that the emulated sandbox is live (a probe process is refused exactly what the unit
forbids, and allowed it without the sandbox), then the real daemon under it: ready with every
probe, a buggy VMM caught, metrics, sd_notify, SIGHUP reload, SIGTERM; and for each syscall the
unit names beside its groups, that the daemon fails without it with one error line.

Needs python3-seccomp (libseccomp's binding) and systemd-analyze (the syscall groups): skipped
without them, which fails a CI=true run (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import requires_kvm_bpf
from daemon_proc import REPO, DaemonProcess, run_vmm
from metrics_scrape import scrape, series
from unit_sandbox import (
    Sandbox,
    build_filters,
    child_env,
    expand_syscalls,
    granted_caps,
    load_unit,
    own_caps,
    preexec,
)

from tracer.metrics import PREFIX
from tracer.probes import expected_probes
from tracer.selftest import compare

pytestmark = [pytest.mark.e2e, requires_kvm_bpf]

try:
    import seccomp  # noqa: F401  (python3-seccomp, through the venv's system site-packages)
except ImportError:
    pytest.skip("python3-seccomp missing (apt-get install python3-seccomp)",
                allow_module_level=True)
if shutil.which("systemd-analyze") is None:
    pytest.skip("systemd-analyze missing", allow_module_level=True)

ERROR_PREFIX = "kvm-completion-tracer: error:"
CONFIG = 'snapshot_idle_seconds = 0.2\n[labels]\nsite = "{site}"\n'

# Run under the sandbox and without it: what each refused-or-not call returns. Raw libc calls
# (ctypes), so that nothing between the call and the kernel falls back on its own.
PROBE = r"""
import ctypes, errno, json, mmap, os, re, signal, socket
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
def rc(value):
    return "ok" if value >= 0 else errno.errorcode[ctypes.get_errno()]
def anon(prot):
    p = libc.mmap(None, 4096, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    return p if p != ctypes.c_void_p(-1).value else None
out = {}
out["mmap_wx"] = "ok" if anon(mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC) else \
    errno.errorcode[ctypes.get_errno()]
out["mmap_rx"] = "ok" if anon(mmap.PROT_READ | mmap.PROT_EXEC) else \
    errno.errorcode[ctypes.get_errno()]
out["mprotect_rx"] = rc(libc.mprotect(anon(mmap.PROT_READ), 4096,
                                      mmap.PROT_READ | mmap.PROT_EXEC))
for family in ("AF_UNIX", "AF_INET", "AF_NETLINK", "AF_PACKET"):
    try:
        socket.socket(getattr(socket, family), socket.SOCK_DGRAM).close()
        out[family] = "ok"
    except OSError as err:
        out[family] = errno.errorcode[err.errno]
out["adjtimex"] = rc(libc.adjtimex(ctypes.create_string_buffer(512)))  # modes=0: a query
out["setns"] = rc(libc.setns(-1, 0))
pid = os.fork()
if pid == 0:
    libc.syscall(0x40000000 | 39)  # getpid through the x32 ABI
    os._exit(0)
status = os.waitpid(pid, 0)[1]
out["x32"] = signal.Signals(os.WTERMSIG(status)).name if os.WIFSIGNALED(status) else "ran"
status_text = open("/proc/self/status").read()
for key in ("CapBnd", "CapAmb", "CapEff", "NoNewPrivs"):
    out[key] = re.search(rf"^{key}:\s*(\S+)$", status_text, re.M).group(1)
print(json.dumps(out))
"""


PROC_KEYS = ("Cap", "NoNewPrivs")  # read from /proc/self/status, not calls


@pytest.fixture(scope="module")
def unit() -> Sandbox:
    return load_unit()


def run_probe(sb: Sandbox | None) -> dict[str, str]:
    hook = preexec(sb, build_filters(sb)) if sb is not None else None
    env = child_env(sb, dict(os.environ)) if sb is not None else None
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          timeout=60, preexec_fn=hook, env=env)
    assert done.returncode == 0 and done.stderr == "", done
    result: dict[str, str] = json.loads(done.stdout)
    return result


def test_the_emulated_sandbox_refuses_what_the_unit_forbids(unit: Sandbox) -> None:
    outside, inside = run_probe(None), run_probe(unit)
    allowed = expand_syscalls(unit.syscall_allow) if unit.syscall_allow else None

    def syscall(name: str, baseline: str, refused_too: bool = False) -> str:
        return "EPERM" if refused_too or (allowed is not None and name not in allowed) \
            else baseline

    def family(name: str) -> str:
        listed = not unit.address_families or name in unit.address_families
        return outside[name] if listed else "EAFNOSUPPORT"

    want = {
        "mmap_wx": "EPERM" if unit.deny_write_execute else outside["mmap_wx"],
        "mmap_rx": outside["mmap_rx"],  # R+X without W is what loading a library does
        "mprotect_rx": "EPERM" if unit.deny_write_execute else outside["mprotect_rx"],
        **{f: family(f) for f in ("AF_UNIX", "AF_INET", "AF_NETLINK", "AF_PACKET")},
        "adjtimex": syscall("adjtimex", outside["adjtimex"]),
        "setns": syscall("setns", outside["setns"], unit.restrict_namespaces),
        "x32": "SIGSYS" if unit.native_arch_only else outside["x32"],
        "CapBnd": f"{granted_caps(unit.bounding) if unit.bounding else own_caps():016x}",
        "CapAmb": f"{granted_caps(unit.ambient):016x}",
        "CapEff": f"{granted_caps(unit.bounding) if unit.bounding else own_caps():016x}",
        "NoNewPrivs": "1" if unit.no_new_privs else outside["NoNewPrivs"],
    }
    assert inside == want, (inside, outside)
    # Not vacuous: without the sandbox, the calls the unit forbids work on this host.
    refused = {k for k, v in want.items() if v != outside[k] and not k.startswith(PROC_KEYS)}
    assert refused and all(outside[k] in {"ok", "EBADF", "ran"} for k in refused), outside


def seccomp_filters(pid: int | str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("Seccomp_filters:", 1)[1].split()[0])


class Notifications:
    """The far end of $NOTIFY_SOCKET (systemd's side of Type=notify)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.received: list[str] = []

    def lines(self) -> list[str]:
        while True:
            try:
                self.received.extend(self.sock.recv(4096).decode().splitlines())
            except BlockingIOError:
                return self.received


class SandboxedDaemon(DaemonProcess):
    """:class:`DaemonProcess`, but started the way the unit's ExecStart= is: its arguments,
    its Environment=, $NOTIFY_SOCKET and $WATCHDOG_USEC, under its sandbox."""

    def __init__(self, sb: Sandbox, config: Path, notify: Path) -> None:
        assert Path(sb.exec_start[0]).name == "kvm-completion-tracer", sb.exec_start  # = -m tracer
        self.filters = build_filters(sb)
        super().__init__("--config", str(config), base_args=sb.exec_start[1:],
                         env=child_env(sb, {**os.environ, "NOTIFY_SOCKET": str(notify)}),
                         preexec_fn=preexec(sb, self.filters))


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kct-sandbox-") as tmp:
        yield Path(tmp)


def test_daemon_works_under_the_unit_sandbox(unit: Sandbox, workdir: Path) -> None:
    config = workdir / "config.toml"
    config.write_text(CONFIG.format(site="a"))
    notify = Notifications(workdir / "notify.sock")
    d = SandboxedDaemon(unit, config, notify.path)
    try:
        # The sandbox is on the daemon itself, every filter of it.
        assert own_caps("CapBnd", d.proc.pid) == granted_caps(unit.bounding)
        assert own_caps("CapAmb", d.proc.pid) == granted_caps(unit.ambient)
        filters = len(d.filters) + seccomp_filters("self")  # ours are inherited, if any
        assert seccomp_filters(d.proc.pid) == filters

        ready = d.wait_for(lambda e: e["event"] == "ready")
        assert sorted(ready["probes"]) == sorted(expected_probes()), ready
        d.wait_for(lambda _: "READY=1" in notify.lines())  # (a bounded wait on the socket)

        report = run_vmm("buggy-io-out", 2)
        assert report.violations, "the scenario must actually misbehave"
        d.settle()
        violations = d.for_pid(report.pid, "completion_violation")
        assert compare(report, violations, d.for_pid(report.pid, "completion_sanctioned"),
                       len(d.for_pid(report.pid, "completion_snapshot"))) == []

        samples = scrape(d.metrics_url)
        assert list(series(samples, f"{PREFIX}_probes_attached").values()) == [
            len(expected_probes())]
        counted = series(samples, f"{PREFIX}_violations_total", vm=violations[0]["vm"])
        assert sum(counted.values()) == len(report.violations), counted

        config.write_text(CONFIG.format(site="b"))
        d.proc.send_signal(signal.SIGHUP)
        reloaded = d.wait_for(lambda e: e["event"] == "config_reloaded")
        assert reloaded["changed"] == {"labels.site": "a -> b"}
        d.wait_for(lambda _: "RELOADING=1" in notify.lines())

        assert d.err.read_text() == ""
        assert d.stop() == 0
        assert d.lines()[-1]["event"] == "stopped"
        assert "STOPPING=1" in notify.lines()
    finally:
        d.kill()
        d.cleanup()
        notify.sock.close()


def named_syscalls() -> list[str]:
    """The syscalls the unit's SystemCallFilter= names beside its @groups."""
    return [s for s in load_unit().syscall_allow if not s.startswith("@")]


@pytest.mark.parametrize("missing", named_syscalls())
def test_each_named_syscall_is_needed(unit: Sandbox, workdir: Path, missing: str) -> None:
    """A negative control for the filter, and the reason each name is in the unit: the same
    sandbox without it stops the daemon at start, with one error line."""
    sb_filters = build_filters(unit, drop_syscalls=frozenset({missing}))
    done = subprocess.run(
        [sys.executable, "-m", "tracer", *unit.exec_start[1:], "--state-dir", str(workdir),
         "--no-metrics"], cwd=REPO, capture_output=True, text=True, timeout=120,
        preexec_fn=preexec(unit, sb_filters), env=child_env(unit, dict(os.environ)))
    assert done.returncode == 1, done
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), done
    assert "BPF" in lines[0], done  # refused at loading or attaching, not before
    events: list[dict[str, Any]] = [json.loads(raw) for raw in done.stdout.splitlines()]
    assert [e["event"] for e in events] == ["starting"], done
