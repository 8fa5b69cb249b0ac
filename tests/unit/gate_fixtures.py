"""Alerts, stacks and reports for the gate's CI outputs' tests (suppressions, SARIF, annotations).

Stacks carry the line-table keys of symbolized frames (``file``, ``line``, ``column``,
``inlined``) where a test needs them; every other stack is as a build without them has it.
"""

from __future__ import annotations

from typing import Any

from tracer.alerts import SnapshotAlert, ViolationAlert
from tracer.gate import GateReport

LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"
ROOT = "/src/vmm"
VMM = "/src/vmm/target/debug/vmm"
PIO = {"port": "0x3f8", "direction": "out", "size": 1, "count": 1}


def frame(function: str | None, module: str | None = VMM, *, file: str | None = None,
          line: int | None = None, column: int | None = None, offset: int | None = 0x1234,
          address: int = 0x5581_0000_1234) -> dict[str, Any]:
    out: dict[str, Any] = {
        "address": address, "module": module, "build_id": "3f2a9c" if module else None,
        "file_offset": offset, "function": function,
        "function_offset": 0x2c if function else None, "inferred": False}
    if file is not None:
        out.update(file=file, line=line, column=column, inlined=False)
    return out


def stack(*frames: dict[str, Any]) -> dict[str, Any]:
    return {"frames": list(frames), "partial": False, "why_partial": None}


def ioctl_frame() -> dict[str, Any]:
    return frame("__GI___ioctl", LIBC, address=0x7F12_0000_001B, offset=0xFDD6B)


def site_stack(function: str, file: str | None = None, line: int | None = None,
               column: int | None = None, *, outer: dict[str, Any] | None = None,
               module: str = VMM) -> dict[str, Any]:
    """libc's ioctl, then the call site, then (optionally) ``outer``, then main."""
    frames = [ioctl_frame(), frame(function, module, file=file, line=line, column=column)]
    if outer is not None:
        frames.append(outer)
    frames.append(frame("main", file=f"{ROOT}/src/main.rs" if file else None,
                        line=10 if file else None))
    return stack(*frames)


def violation(*, ioctl: str = "KVM_GET_SREGS", kind: str = "save",
              exit_reason: str = "KVM_EXIT_IO", severity: str = "error",
              rule: str = "save-mid-completion", comm: str = "vmm-test",
              user_stack: dict[str, Any] | None = None, pid: int = 100,
              tid: int = 101) -> ViolationAlert:
    return ViolationAlert(
        pid=pid, tid=tid, comm=comm, vm=f"vmm[{pid}]", vmm="other", vcpu_id=0, vcpu_fd=5,
        exit_reason=exit_reason, access=PIO, ioctl=ioctl, kind=kind, pending_ns=18_200,
        rule=rule, severity=severity, reason=f"{ioctl} read vCPU state while {exit_reason} "
        "was pending", detected_at="ioctl_entry", window=1, user_stack=user_stack)


def snapshot(ioctls: tuple[str, ...] = ("KVM_GET_REGS", "KVM_GET_SREGS")) -> SnapshotAlert:
    return SnapshotAlert(pid=100, vm="vmm[100]", vmm="qemu", vcpu_id=0,
                         exit_reason="KVM_EXIT_IO", access=PIO, ioctls=list(ioctls), tids=[101],
                         window=1, pending_ns=40_000, closed_by="reentry")


def report_of(*alerts: ViolationAlert | SnapshotAlert, fail_on: str = "warning") -> GateReport:
    report = GateReport(fail_on)
    for alert in alerts:
        if isinstance(alert, SnapshotAlert):
            report.add_snapshot(alert)
        else:
            report.add_violation(alert)
    report.set_meta("0.1.0", "6.1.0", "0.29.1", ["./target/debug/vmm", "--test"], {}, 1.0, 3.5,
                    0)
    report.set_losses(0, {})
    return report
