"""``kvm-completion-tracer check``: what the host needs, what is missing, and how to fix it.

The cheap checks also guard ``run``, so a missing piece is one clear line, never a traceback.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tracer.tracefs import tracefs_root

CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True

    def line(self) -> str:
        status = "ok  " if self.ok else ("FAIL" if self.required else "warn")
        text = f"{status} {self.name:<18} {self.detail}"
        return text if self.ok or not self.fix else f"{text}\n     fix: {self.fix}"


def effective_caps(status_path: Path = Path("/proc/self/status")) -> int:
    try:
        for line in status_path.read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def check_privileges(caps: int | None = None) -> CheckResult:
    caps = effective_caps() if caps is None else caps
    def has(bit: int) -> bool:
        return bool(caps & (1 << bit))

    if has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON)):
        return CheckResult("privileges", True, "can load BPF and attach tracepoints")
    return CheckResult("privileges", False, "not root and lacking CAP_BPF+CAP_PERFMON",
                       "run as root (sudo), or grant CAP_BPF, CAP_PERFMON and "
                       "CAP_DAC_READ_SEARCH (systemd: AmbientCapabilities=)")


def check_tracefs(root: Path | None) -> CheckResult:
    if root is None:
        return CheckResult("tracefs", False, "not mounted (no events/ under /sys/kernel/tracing)",
                           "mount -t tracefs tracefs /sys/kernel/tracing")
    return CheckResult("tracefs", True, f"mounted at {root}")


def check_tracepoints(root: Path | None) -> list[CheckResult]:
    if root is None:
        return []
    events = root / "events"
    out = []
    if (events / "kvm" / "kvm_userspace_exit").is_dir():
        out.append(CheckResult("kvm tracepoints", True, "kvm:kvm_userspace_exit present"))
    else:
        out.append(CheckResult("kvm tracepoints", False, "kvm:kvm_userspace_exit missing",
                               "load KVM (modprobe kvm_intel or kvm_amd); this is not a KVM host"))
    guest = [e for e in ("kvm_exit", "kvm_entry") if (events / "kvm" / e).is_dir()]
    out.append(CheckResult("guest tracepoints", len(guest) == 2,
                           f"present: {', '.join(guest) or 'none'} (guest-exit counts only)",
                           "x86 KVM provides kvm:kvm_exit/kvm_entry; other arches lack them",
                           required=False))
    if (events / "syscalls" / "sys_enter_ioctl").is_dir():
        out.append(CheckResult("syscall tracepoints", True, "syscalls:sys_enter_ioctl present"))
    else:
        out.append(CheckResult("syscall tracepoints", False, "syscalls:sys_enter_ioctl missing",
                               "the kernel needs CONFIG_FTRACE_SYSCALLS=y"))
    return out


def check_headers(release: str | None = None, modules: Path = Path("/lib/modules")) -> CheckResult:
    release = release or platform.release()
    build = modules / release / "build"
    # bcc compiles with build/include (generated config) and, on split Debian packages, the
    # common tree behind source/: both must be there, not just a directory called include/.
    generated = build / "include" / "generated" / "autoconf.h"
    kconfig = [tree / "include" / "linux" / "kconfig.h"
               for tree in (build, modules / release / "source")]
    if generated.is_file() and any(k.is_file() for k in kconfig):
        return CheckResult("kernel headers", True, f"{build} -> {os.path.realpath(build)}")
    what = "missing" if not build.exists() else "incomplete (no include/generated/autoconf.h " \
        "or include/linux/kconfig.h)"
    return CheckResult("kernel headers", False, f"{build} {what} (bcc compiles against it)",
                       f"apt-get install linux-headers-{release}, or linux-headers-amd64 and "
                       "link /lib/modules/$(uname -r)/{build,source} to it "
                       "(scripts/setup-host.sh does this)")


def check_bcc() -> CheckResult:
    from tracer.probes import BCC_FIX, bcc_import_error  # tracer.probes owns bcc

    missing = bcc_import_error()
    if missing is not None:
        return CheckResult("bcc", False, f"cannot import bcc: {missing}", BCC_FIX)
    return CheckResult("bcc", True, "python3-bpfcc importable")


def check_kvm_device(path: Path = Path("/dev/kvm")) -> CheckResult:
    if path.exists():
        return CheckResult("/dev/kvm", True, "present", required=False)
    return CheckResult("/dev/kvm", False, "absent: no VMs can run here, nothing to trace",
                       "load KVM (modprobe kvm_intel or kvm_amd)", required=False)


def basic_checks() -> list[CheckResult]:
    """Everything but the trial load: cheap enough to guard ``run``."""
    root = tracefs_root()
    return [check_privileges(), check_tracefs(root), *check_tracepoints(root), check_headers(),
            check_bcc(), check_kvm_device()]


def trial_load(load: Callable[[], None]) -> CheckResult:
    try:
        load()
    except Exception as err:  # any failure is reported as the check's result, not raised
        return CheckResult("trial BPF load", False, str(err),
                           "see the failures above; 'dmesg' may show the verifier's complaint")
    return CheckResult("trial BPF load", True, "programs compiled, loaded and attached")


def failures(results: list[CheckResult]) -> list[CheckResult]:
    return [r for r in results if r.required and not r.ok]
