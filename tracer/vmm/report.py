"""What a scenario did, as JSON: the violations a correct tracer must report, and the rest.

The expectations come from the VMM's own bookkeeping (:attr:`Kvm.mid_completion`), classified by
the two sanctioned exceptions of the facts file, independently of :mod:`tracer.policy`, so a
test can hold the daemon's verdicts against them.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from tracer import abi
from tracer.vmm.kvm import (
    LoggedIoctl,
    MidCompletionIoctl,
    MmioExit,
    MsrExit,
    PendingExit,
    PioExit,
    RunRecord,
)

PORT_7E: Final = 0x7E
RULE_PORT_7E: Final = "port-0x7e"
RULE_RESTORE_AFTER_PIO: Final = "restore-after-pio"
_SAVES: Final = frozenset(i.name for i in abi.IOCTLS.values() if i.kind is abi.IoctlKind.SAVE)
_RESTORES: Final = frozenset(i.name for i in abi.IOCTLS.values()
                             if i.kind is abi.IoctlKind.RESTORE)


@dataclass(frozen=True)
class AccessFields:
    """The pending exit's access, flattened: only the fields of its kind are set."""

    port: int | None = None
    gpa: int | None = None
    msr_index: int | None = None
    direction: str | None = None  # "in"/"out" for PIO, "read"/"write" for MMIO and MSRs
    size: int | None = None  # bytes per PIO/MMIO access


def access_fields(pending: PendingExit) -> AccessFields:
    acc = pending.access
    if isinstance(acc, PioExit):
        return AccessFields(port=acc.port, direction=acc.direction, size=acc.size)
    if isinstance(acc, MmioExit):
        return AccessFields(gpa=acc.gpa, direction="write" if acc.is_write else "read",
                            size=acc.length)
    if isinstance(acc, MsrExit):
        return AccessFields(msr_index=acc.index, direction="write" if acc.is_write else "read")
    return AccessFields()


@dataclass(frozen=True)
class ExpectedViolation:
    """One save/restore ioctl issued while a completion was pending."""

    tid: int  # thread that issued the ioctl (not necessarily the vCPU thread)
    vcpu_id: int
    vcpu_fd: int  # the fd the ioctl went through (a dup'ed fd when the VMM used one)
    vm_fd: int
    exit_reason: str  # of the pending exit, e.g. "KVM_EXIT_MMIO"
    ioctl: str  # e.g. "KVM_GET_SREGS"
    kind: str  # "save" | "restore"
    port: int | None
    gpa: int | None
    msr_index: int | None
    direction: str | None
    size: int | None
    ts_ns: int  # monotonic ns just before the ioctl; equals the ioctl_log entry's ts_ns
    pending_since_ns: int  # monotonic ns just after the KVM_RUN that exited returned
    rule: str | None = None  # set for sanctioned entries: "port-0x7e" | "restore-after-pio"


@dataclass(frozen=True)
class VcpuInfo:
    vm_fd: int
    vcpu_id: int
    fd: int
    program: str
    buggy: bool
    created_ns: int  # monotonic ns after KVM_CREATE_VCPU returned
    closed_ns: int | None  # monotonic ns after its fd was closed; None if open at report time
    dup_fds: list[int] = field(default_factory=list)
    run_tids: list[int] = field(default_factory=list)  # threads that issued its KVM_RUNs


@dataclass(frozen=True)
class PendingInfo:
    vm_fd: int
    vcpu_id: int
    vcpu_fd: int
    exit_reason: str
    port: int | None
    gpa: int | None
    msr_index: int | None
    direction: str | None
    size: int | None
    since_ns: int


@dataclass
class ScenarioReport:
    scenario: str
    pid: int
    iterations: int
    violations: list[ExpectedViolation]
    sanctioned: list[ExpectedViolation]
    exits: dict[str, int]  # KVM_RUN outcomes by exit reason name; -EINTR counts as KVM_EXIT_INTR
    completions: int  # KVM_RUNs issued with immediate_exit = 1
    vcpus: list[VcpuInfo]
    pending_at_end: list[PendingInfo]  # completions still owed when the scenario returned
    started_ns: int
    finished_ns: int
    facts: dict[str, int | str | bool | float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    ioctl_log: list[LoggedIoctl] = field(default_factory=list)  # every vCPU-fd ioctl
    run_log: list[RunRecord] = field(default_factory=list)
    # Register peeks completed before anything else touched the vCPU (not violations).
    inspections: list[ExpectedViolation] = field(default_factory=list)

    @property
    def elapsed_ns(self) -> int:
        return self.finished_ns - self.started_ns

    def to_dict(self, *, with_logs: bool = True) -> dict[str, Any]:
        data = asdict(self)
        data["elapsed_ns"] = self.elapsed_ns
        if with_logs:
            # Named tuples become compact lists: [ts_ns, tid, fd, name] and
            # [ts_ns, tid, fd, vcpu_id, immediate_exit, outcome].
            data["ioctl_log"] = [list(e) for e in self.ioctl_log]
            data["run_log"] = [list(r) for r in self.run_log]
        else:
            data["ioctl_log"] = []
            data["run_log"] = []
        return data

    def to_json(self, *, with_logs: bool = True, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(with_logs=with_logs), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScenarioReport:
        return cls(
            scenario=data["scenario"],
            pid=data["pid"],
            iterations=data["iterations"],
            violations=[ExpectedViolation(**v) for v in data["violations"]],
            sanctioned=[ExpectedViolation(**v) for v in data["sanctioned"]],
            exits=dict(data["exits"]),
            completions=data["completions"],
            vcpus=[VcpuInfo(**v) for v in data["vcpus"]],
            pending_at_end=[PendingInfo(**p) for p in data["pending_at_end"]],
            started_ns=data["started_ns"],
            finished_ns=data["finished_ns"],
            facts=dict(data.get("facts", {})),
            notes=list(data.get("notes", [])),
            ioctl_log=[LoggedIoctl(*e) for e in data.get("ioctl_log", [])],
            run_log=[RunRecord(*r) for r in data.get("run_log", [])],
            inspections=[ExpectedViolation(**v) for v in data.get("inspections", [])],
        )

    @classmethod
    def from_json(cls, text: str) -> ScenarioReport:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a scenario report is a JSON object")
        return cls.from_dict(data)


def sanction_rule(rec: MidCompletionIoctl) -> str | None:
    """The sanctioned exception covering ``rec``, or None when it is a violation.

    - an OUT to port 0x7e with KVM_X86_QUIRK_OUT_7E_INC_RIP on: KVM advanced RIP before
      exiting and the completion does nothing, so saving and restoring are both safe;
    - a restore after an OUT exit: an emulated or string OUT was written back before the exit,
      a fast OUT's completion drops itself when RIP moved or just steps past the OUT, so the
      restore takes effect (saving is still a violation). After an IN the completion writes
      into the restored state (tracer.policy's docstring cites KVM).
    """
    acc = rec.pending.access
    if (isinstance(acc, PioExit) and acc.direction == "out" and acc.port == PORT_7E
            and not rec.quirk_7e_disabled):
        return RULE_PORT_7E
    if rec.kind == "restore" and isinstance(acc, PioExit) and acc.direction == "out":
        return RULE_RESTORE_AFTER_PIO
    return None


def expected_entry(rec: MidCompletionIoctl, rule: str | None) -> ExpectedViolation:
    acc = access_fields(rec.pending)
    return ExpectedViolation(
        tid=rec.tid, vcpu_id=rec.vcpu_id, vcpu_fd=rec.fd, vm_fd=rec.vm_fd,
        exit_reason=rec.pending.exit_name, ioctl=rec.name, kind=rec.kind,
        port=acc.port, gpa=acc.gpa, msr_index=acc.msr_index, direction=acc.direction,
        size=acc.size, ts_ns=rec.ts_ns, pending_since_ns=rec.pending.since_ns, rule=rule,
    )


WindowKey = tuple[int, int, int]  # (vm fd, vCPU id, PendingExit.since_ns)


def _window(rec: MidCompletionIoctl) -> WindowKey:
    return (rec.vm_fd, rec.vcpu_id, rec.pending.since_ns)


VcpuLife = tuple[int, int, int, int | None]  # (vm fd, vCPU id, created ns, closed ns or None)


def inspections(records: list[MidCompletionIoctl], ioctl_log: list[LoggedIoctl],
                completed: dict[WindowKey, int], lives: list[VcpuLife]
                ) -> set[MidCompletionIoctl]:
    """The mid-completion reads that were inspections: the tracer's default rule
    (tracer.windows), restated as the VMM reads it, not the tracer's code.

    A window qualifies when every state ioctl in it is a read of one and the same save ioctl
    (one kind of state), and no restore was issued in the process between its first read and
    its end: the KVM_RUN that completed it, else the vCPU's close (``lives``), else the end of
    the process.
    """
    windows: dict[WindowKey, list[MidCompletionIoctl]] = {}
    for rec in records:
        windows.setdefault(_window(rec), []).append(rec)
    found: set[MidCompletionIoctl] = set()
    for key, recs in windows.items():
        if any(r.kind != "save" for r in recs) or len({r.name for r in recs}) != 1:
            continue
        first = min(r.ts_ns for r in recs)
        end = completed.get(key)
        if end is None:
            end = next((closed for vm_fd, vcpu_id, created, closed in lives
                        if (vm_fd, vcpu_id) == key[:2] and created <= first
                        and (closed is None or first <= closed)), None)
        if any(first < e.ts_ns and (end is None or e.ts_ns < end) and e.name in _RESTORES
               for e in ioctl_log):
            continue
        found.update(recs)
    return found


def split_expectations(
    records: list[MidCompletionIoctl], peeks: set[MidCompletionIoctl] | None = None,
) -> tuple[list[ExpectedViolation], list[ExpectedViolation], list[ExpectedViolation]]:
    """(violations, sanctioned, inspections), each in issue order; ``peeks`` from
    :func:`inspections`."""
    violations: list[ExpectedViolation] = []
    sanctioned: list[ExpectedViolation] = []
    inspected: list[ExpectedViolation] = []
    for rec in sorted(records, key=lambda r: r.ts_ns):
        rule = sanction_rule(rec)
        if peeks and rec in peeks:  # judged in the kernel, before any sanction
            inspected.append(expected_entry(rec, None))
        elif rule:
            sanctioned.append(expected_entry(rec, rule))
        else:
            violations.append(expected_entry(rec, None))
    return violations, sanctioned, inspected


def pending_info(vm_fd: int, vcpu_id: int, vcpu_fd: int, pending: PendingExit) -> PendingInfo:
    acc = access_fields(pending)
    return PendingInfo(vm_fd, vcpu_id, vcpu_fd, pending.exit_name, acc.port, acc.gpa,
                       acc.msr_index, acc.direction, acc.size, pending.since_ns)


def exit_counts(run_log: list[RunRecord]) -> dict[str, int]:
    return dict(sorted(Counter(r.outcome for r in run_log).items()))
