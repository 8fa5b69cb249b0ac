"""The systemd unit's process sandbox, rebuilt without systemd: what ``systemd`` 252 (Debian 12)
would apply to ExecStart=, derived from the unit file's own directives.

PID 1 on the test hosts is not systemd, so the unit cannot be started for real; this applies the
same kernel mechanisms in a ``preexec_fn`` (after fork, just before exec, as systemd's executor
does): the capability bounding and ambient sets, no_new_privs, RLIMIT_MEMLOCK, the umask, and
systemd's seccomp filters, built the way src/shared/seccomp-util.c (v252) builds them:

- ``SystemCallFilter=`` (an allow list): every syscall of the named groups, expanded by
  ``systemd-analyze syscall-filter`` (the installed systemd's own tables), plus ``@default``
  (which systemd adds to every allow list), plus the named syscalls; anything else gets
  ``SystemCallErrorNumber=``'s errno (SIGSYS without one);
- ``SystemCallArchitectures=native``: a syscall of another ABI (i386, x32) kills the process;
- ``MemoryDenyWriteExecute=yes``: EPERM for mmap with PROT_WRITE|PROT_EXEC, for mprotect and
  pkey_mprotect with PROT_EXEC (even R -> RX), for shmat with SHM_EXEC. Not the kernel's
  PR_SET_MDWE (systemd >= 254 prefers that one; 252 only has the seccomp filter);
- ``RestrictAddressFamilies=`` (an allow list): socket() with any other family -> EAFNOSUPPORT;
- ``RestrictNamespaces=yes``: setns, and unshare/clone with any CLONE_NEW* flag -> EPERM;
- ``RestrictRealtime=yes``: sched_setscheduler to a policy other than OTHER/BATCH/IDLE -> EPERM;
- ``LockPersonality=yes``: personality() to anything but PER_LINUX -> EPERM.

Not modelled: the mount-namespace set-up (ProtectSystem=, ProtectHome=, PrivateTmp=,
ProtectControlGroups=, StateDirectory=, the /dev/kmsg and clock devices of ProtectKernelLogs=
and ProtectClock=, the UTS namespace of ProtectHostname=); their seccomp parts refuse syslog,
@clock and sethostname, which the unit's allow list refuses already. RestrictSUIDSGID=
(chmod or open of set-uid/set-gid files) is not modelled either. A directive this module does
not know, or a form of one it cannot model, fails :func:`parse_unit` rather than being dropped.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import re
import resource
import shlex
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "deploy" / "systemd" / "kvm-completion-tracer.service"

# <linux/prctl.h>, <linux/capability.h>, <linux/shm.h>, <linux/sched.h>: not in Python's stdlib.
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, PR_CAP_AMBIENT_CLEAR_ALL = 47, 2, 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522
SHM_EXEC = 0o100000
CLONE_NEW_FLAGS = {"cgroup": 0x02000000, "ipc": 0x08000000, "mnt": 0x00020000,
                   "net": 0x40000000, "pid": 0x20000000, "user": 0x10000000,
                   "uts": 0x04000000}
SCHED_OTHER, SCHED_BATCH, SCHED_IDLE = 0, 3, 5
PER_LINUX = 0

# Directives that change nothing this module must model (unit metadata, service life cycle,
# logging, or sandboxing listed as not modelled in the docstring).
IGNORED = {
    "Description", "Documentation", "After", "Wants", "WantedBy", "Type", "NotifyAccess",
    "Restart", "RestartSec", "TimeoutStartSec", "ExecReload", "StandardOutput",
    "StandardError", "SyslogIdentifier", "StateDirectory", "StateDirectoryMode",
    "ConfigurationDirectory", "ProtectSystem", "ProtectHome", "PrivateTmp",
    "ProtectControlGroups", "ProtectKernelLogs", "ProtectClock", "ProtectHostname",
    "RestrictSUIDSGID",
}


class UnsupportedDirective(AssertionError):
    """The unit uses a directive (or a form of one) this emulation does not model."""


@dataclass
class Sandbox:
    """What systemd would apply to the service's main process."""

    exec_start: list[str] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    watchdog_usec: int = 0
    umask: int | None = None
    memlock: int | None = None  # resource.RLIM_INFINITY for "infinity"
    bounding: list[str] = field(default_factory=list)  # capability names, e.g. "CAP_BPF"
    ambient: list[str] = field(default_factory=list)
    no_new_privs: bool = False
    syscall_allow: list[str] = field(default_factory=list)  # as written: @groups and names
    syscall_errno: str = ""  # "" = kill
    native_arch_only: bool = False
    deny_write_execute: bool = False
    address_families: list[str] = field(default_factory=list)  # empty: unrestricted
    restrict_namespaces: bool = False
    restrict_realtime: bool = False
    lock_personality: bool = False


def directives(text: str, section: str = "Service") -> Iterator[tuple[str, str]]:
    """(key, value) of every assignment in ``[section]``, in order, continuation lines joined."""
    current = ""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.startswith("[") and line.endswith("]") and not pending:
            current = line[1:-1]
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if current == section:
            key, sep, value = line.partition("=")
            if not sep:
                raise UnsupportedDirective(f"not an assignment in [{section}]: {line!r}")
            yield key.strip(), value.strip()


def _bool(key: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in {"yes", "true", "on", "1"}:
        return True
    if lowered in {"no", "false", "off", "0"}:
        return False
    raise UnsupportedDirective(f"{key}={value}: expected a boolean")


def _words(key: str, value: str, previous: list[str]) -> list[str]:
    """A list directive: assignments add up, an empty one resets; no ``~`` (deny lists)."""
    if not value:
        return []
    if value.startswith("~"):
        raise UnsupportedDirective(f"{key}={value}: deny lists are not modelled")
    return [*previous, *value.split()]


def _seconds_to_usec(key: str, value: str) -> int:
    match = re.fullmatch(r"(\d+)\s*(s|sec)?", value)
    if match is None:
        raise UnsupportedDirective(f"{key}={value}: only plain seconds are modelled")
    return int(match.group(1)) * 1_000_000


def parse_unit(text: str) -> Sandbox:
    sb = Sandbox()
    for key, value in directives(text):
        if key in IGNORED:
            continue
        if key == "ExecStart":
            sb.exec_start = shlex.split(value)
        elif key == "Environment":
            sb.environment.update(dict(w.split("=", 1) for w in shlex.split(value)))
        elif key == "WatchdogSec":
            sb.watchdog_usec = _seconds_to_usec(key, value)
        elif key == "UMask":
            sb.umask = int(value, 8)
        elif key == "LimitMEMLOCK":
            sb.memlock = resource.RLIM_INFINITY if value == "infinity" else int(value)
        elif key == "CapabilityBoundingSet":
            sb.bounding = _words(key, value, sb.bounding)
        elif key == "AmbientCapabilities":
            sb.ambient = _words(key, value, sb.ambient)
        elif key == "NoNewPrivileges":
            sb.no_new_privs = _bool(key, value)
        elif key == "SystemCallFilter":
            if any(":" in w for w in value.split()):
                raise UnsupportedDirective(f"{key}={value}: per-syscall errno not modelled")
            sb.syscall_allow = _words(key, value, sb.syscall_allow)
        elif key == "SystemCallErrorNumber":
            if not hasattr(errno, value):
                raise UnsupportedDirective(f"{key}={value}: not an errno name")
            sb.syscall_errno = value
        elif key == "SystemCallArchitectures":
            if value != "native":
                raise UnsupportedDirective(f"{key}={value}: only 'native' is modelled")
            sb.native_arch_only = True
        elif key == "MemoryDenyWriteExecute":
            sb.deny_write_execute = _bool(key, value)
        elif key == "RestrictAddressFamilies":
            if value == "none":
                raise UnsupportedDirective(f"{key}=none is not modelled")
            sb.address_families = _words(key, value, sb.address_families)
        elif key == "RestrictNamespaces":
            sb.restrict_namespaces = _bool(key, value)
        elif key == "RestrictRealtime":
            sb.restrict_realtime = _bool(key, value)
        elif key == "LockPersonality":
            sb.lock_personality = _bool(key, value)
        else:
            raise UnsupportedDirective(f"{key}= is not modelled: extend {Path(__file__).name}")
    return sb


def load_unit() -> Sandbox:
    return parse_unit(UNIT.read_text())


# ---- syscall groups -----------------------------------------------------------------------------

def expand_syscalls(entries: list[str]) -> set[str]:
    """Every syscall name in ``entries``, @groups expanded (recursively) by the installed
    systemd's ``systemd-analyze syscall-filter``; ``@default`` included, as systemd adds it to
    every allow list."""
    names: set[str] = set()
    seen: set[str] = set()
    todo = ["@default", *entries]
    while todo:
        entry = todo.pop()
        if not entry.startswith("@"):
            names.add(entry)
            continue
        if entry in seen:
            continue
        seen.add(entry)
        done = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager", entry],
                              capture_output=True, text=True, timeout=30, check=True)
        listed = [line.strip() for line in done.stdout.splitlines()[1:]]
        members = [w for w in listed if w and not w.startswith("#")]
        if not members:
            raise UnsupportedDirective(f"systemd-analyze knows no syscall group {entry}")
        todo.extend(members)
    return names


# ---- the seccomp filters ------------------------------------------------------------------------

def build_filters(sb: Sandbox, drop_syscalls: frozenset[str] = frozenset()) -> list[Any]:
    """systemd's filters for ``sb``, in the order systemd loads them (the allow list last).
    ``drop_syscalls``: names left out of the allow list (for negative controls)."""
    import seccomp as sc

    def new(default: Any) -> Any:
        f = sc.SyscallFilter(default)  # native arch only
        # Like systemd's seccomp_init_for_arch(): each filter lets other ABIs through; only the
        # SystemCallArchitectures= filter below refuses them.
        f.set_attr(sc.Attr.ACT_BADARCH, sc.ALLOW)
        f.set_attr(sc.Attr.CTL_NNP, 0)  # no_new_privs is the unit's NoNewPrivileges= (below)
        return f

    filters: list[Any] = []
    if sb.address_families:
        f = new(sc.ALLOW)
        wanted = sorted(int(getattr(socket, af)) for af in sb.address_families)
        refuse = sc.ERRNO(errno.EAFNOSUPPORT)
        f.add_rule_exactly(refuse, "socket", sc.Arg(0, sc.LT, wanted[0]))
        f.add_rule_exactly(refuse, "socket", sc.Arg(0, sc.GT, wanted[-1]))
        for af in range(wanted[0] + 1, wanted[-1]):
            if af not in wanted:
                f.add_rule_exactly(refuse, "socket", sc.Arg(0, sc.EQ, af))
        filters.append(f)
    if sb.deny_write_execute:
        f = new(sc.ALLOW)
        eperm, wx = sc.ERRNO(errno.EPERM), mmap.PROT_WRITE | mmap.PROT_EXEC
        f.add_rule_exactly(eperm, "mmap", sc.Arg(2, sc.MASKED_EQ, wx, wx))
        for call in ("mprotect", "pkey_mprotect"):
            f.add_rule_exactly(eperm, call, sc.Arg(2, sc.MASKED_EQ, mmap.PROT_EXEC,
                                                   mmap.PROT_EXEC))
        f.add_rule_exactly(eperm, "shmat", sc.Arg(2, sc.MASKED_EQ, SHM_EXEC, SHM_EXEC))
        filters.append(f)
    if sb.restrict_realtime:
        f = new(sc.ALLOW)
        allowed = (SCHED_OTHER, SCHED_BATCH, SCHED_IDLE)
        for policy in range(max(allowed)):
            if policy not in allowed:
                f.add_rule_exactly(sc.ERRNO(errno.EPERM), "sched_setscheduler",
                                   sc.Arg(1, sc.EQ, policy))
        f.add_rule_exactly(sc.ERRNO(errno.EPERM), "sched_setscheduler",
                           sc.Arg(1, sc.GT, max(allowed)))
        filters.append(f)
    if sb.restrict_namespaces:
        f = new(sc.ALLOW)
        f.add_rule_exactly(sc.ERRNO(errno.EPERM), "setns")
        for flag in CLONE_NEW_FLAGS.values():
            for call in ("unshare", "clone"):
                f.add_rule_exactly(sc.ERRNO(errno.EPERM), call, sc.Arg(0, sc.MASKED_EQ, flag, flag))
        filters.append(f)
    if sb.native_arch_only:
        arch = sc.SyscallFilter(sc.ALLOW)  # bad-arch action left at libseccomp's: kill
        arch.set_attr(sc.Attr.CTL_NNP, 0)
        filters.append(arch)
    if sb.lock_personality:
        f = new(sc.ALLOW)
        f.add_rule_exactly(sc.ERRNO(errno.EPERM), "personality", sc.Arg(0, sc.NE, PER_LINUX))
        filters.append(f)
    if sb.syscall_allow:
        err = getattr(errno, sb.syscall_errno) if sb.syscall_errno else 0
        f = new(sc.ERRNO(err) if err else sc.KILL_PROCESS)
        for name in sorted(expand_syscalls(sb.syscall_allow) - drop_syscalls):
            # Names not on this ABI (mmap2, _llseek, ...) resolve to negative pseudo-numbers,
            # unknown ones to -1: systemd skips both.
            if sc.resolve_syscall(sc.Arch.NATIVE, name) >= 0:
                f.add_rule_exactly(sc.ALLOW, name)
        filters.append(f)
    return filters


# ---- capabilities -------------------------------------------------------------------------------

class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def cap_number(name: str) -> int:
    """libcap's number for a capability name ("CAP_BPF" -> 39)."""
    libcap = ctypes.CDLL("libcap.so.2", use_errno=True)
    value = ctypes.c_int()
    if libcap.cap_from_name(name.lower().encode(), ctypes.byref(value)) != 0:
        raise UnsupportedDirective(f"unknown capability {name}")
    return value.value


def cap_mask(names: list[str]) -> int:
    return sum(1 << cap_number(n) for n in set(names))


def own_caps(kind: str = "CapBnd", pid: int | str = "self") -> int:
    """A capability set of a process, from /proc/PID/status (CapBnd, CapEff, CapAmb, ...)."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{kind}:\s*([0-9a-f]+)$", status, re.M)
    assert match is not None, kind
    return int(match.group(1), 16)


def granted_caps(names: list[str]) -> int:
    """The unit's capabilities that this host can grant at all: a container may lack some in
    its own bounding set (e.g. CAP_SYS_RESOURCE), which no process in it can raise again;
    systemd as PID 1 of a real host has them all."""
    return cap_mask(names) & own_caps()


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def preexec(sb: Sandbox, filters: list[Any]) -> Callable[[], None]:
    """The child's last steps before exec, in systemd's order: resource limits and umask,
    capabilities, no_new_privs, then the seccomp filters (the allow list as close to execve as
    possible)."""
    libc = ctypes.CDLL(None, use_errno=True)
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    bounding, ambient = granted_caps(sb.bounding), granted_caps(sb.ambient)
    can_raise_limits = bool(own_caps("CapEff") >> cap_number("CAP_SYS_RESOURCE") & 1)

    def run() -> None:
        if sb.memlock is not None:
            # Raising the hard limit needs CAP_SYS_RESOURCE: without it (see granted_caps) the
            # host's limit stays, which kernels >= 5.11 (BPF memory charged to the cgroup,
            # not RLIMIT_MEMLOCK) do not notice.
            hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
            limit = sb.memlock if can_raise_limits else hard
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))
        if sb.umask is not None:
            os.umask(sb.umask)
        if sb.bounding:
            for cap in range(last_cap + 1):
                if not bounding >> cap & 1:
                    _check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
        # Ambient capabilities must be inheritable (and permitted: root has them all) first.
        header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        _check(libc.capget(ctypes.byref(header), data), "capget")
        data[0].inheritable, data[1].inheritable = ambient & 0xFFFFFFFF, ambient >> 32
        _check(libc.capset(ctypes.byref(header), data), "capset")
        _check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient")
        for cap in range(last_cap + 1):
            if ambient >> cap & 1:
                _check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0),
                       f"raise ambient capability {cap}")
        if sb.no_new_privs:
            _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        for f in filters:
            f.load()

    return run


def child_env(sb: Sandbox, base: dict[str, str]) -> dict[str, str]:
    """``base`` plus the unit's Environment= and the watchdog variable systemd sets."""
    env = {**base, **sb.environment}
    env.pop("WATCHDOG_PID", None)
    if sb.watchdog_usec:
        env["WATCHDOG_USEC"] = str(sb.watchdog_usec)
    return env
