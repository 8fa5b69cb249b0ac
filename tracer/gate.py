"""The ``watch`` gate's report: every finding of one command's run, grouped, judged, rendered.

A finding is one distinct (kind, exit reason, ioctl, call site): the same bug hit a thousand
times in a loop is one finding seen a thousand times, like a sanitizer's deduplicated report.
Pure: no probes, no bcc; the only I/O is writing the files the caller names.

Exit status of ``watch`` (:func:`exit_status`):

- a finding that fails the gate (see :meth:`GateReport.verdict`): ``error_exitcode``
  (default 66, distinct from the command's own codes, like a sanitizer's ``exitcode``);
- otherwise, unverified findings (counted by the kernel, their reports dropped by a full ring
  buffer, or reads held in a window whose process's exit event was lost) or maps full, without
  ``--allow-lost``: 65 (a race happened or may have, but the gate cannot say where), unless the
  command itself failed: then the command's status, which is the first thing to fix. Events
  lost that carried no finding do not count: the kernel judges every window itself, so a lost
  lifecycle event cannot turn a correct window into a finding nor hide one;
- otherwise the command's own status (128 + S for a command killed by signal S).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from tracer.alerts import SnapshotAlert, ViolationAlert
from tracer.gate_junit import JunitCase, junit_tree, write_junit_file
from tracer.policy import Severity
from tracer.symbolize import is_system_frame, stack_lines

TOOL: Final = "kvm-completion-tracer"
FAIL_ON_CHOICES: Final = ("warning", "error", "critical", "snapshot")
DEFAULT_FAIL_ON: Final = "warning"
DEFAULT_ERROR_EXITCODE: Final = 66
INCONCLUSIVE_EXITCODE: Final = 65
DEFAULT_RERUN_PAGES: Final = 65536  # 256 MiB: the rerun hint when the ring size is not known
SNAPSHOT_RULE: Final = "snapshot-mid-completion"
REPORT_SCHEMA: Final = "kvm-completion-tracer/watch-report/1"

# Why reports went without their user stack (tracer.counters.STACK_MISS_REASONS), in words: a
# finding reported without it says "unknown call site", and the report says why.
_STACK_MISS_TEXT: Final = {
    "stack_map_full": "the kernel's stack map full",
    "stack_failed": "the kernel's stack walk failed",
    "user_stack_failed": "registers or stack bytes not readable",
    "user_stack_dropped": ("not sent: more reports at once than the {allowed} stack "
                           "captures allowed between two reads of the ring, or the ring full"),
}
_SEVERITY_RANK: Final = {severity.value: rank for rank, severity in enumerate(Severity)}

# Frames of the ioctl wrapper itself, innermost first on every stack: the call site is the
# first frame past them. C libraries (glibc, musl) ...
_WRAPPER_FUNCTIONS: Final = frozenset({"ioctl", "__ioctl", "__GI___ioctl", "__ioctl_time64",
                                       "syscall"})
_WRAPPER_FUNCTION_PREFIXES: Final = (
    "__libc",
    # ... Rust's std and libc crates (legacy and v0 demangling) ...
    "libc::", "std::sys::", "<std::", "core::",
    # ... and the rust-vmm crates every Rust VMM issues KVM ioctls through (Firecracker,
    # cloud-hypervisor, crosvm's kvm_sys users): without these, all of a Rust VMM's saves
    # would share one call site, VcpuFd::get_regs.
    "vmm_sys_util::ioctl::", "kvm_ioctls::", "<kvm_ioctls::",
)
# QEMU funnels every vCPU and VM ioctl through these two (accel/kvm/kvm-all.c).
_VMM_WRAPPER_FUNCTIONS: Final = frozenset({"kvm_vcpu_ioctl", "kvm_vm_ioctl"})
_WRAPPER_MODULE_PREFIXES: Final = ("libc.so", "libc-", "ld-linux", "libc.musl", "ld-musl")

_FIXES: Final = {
    "save": "complete the exit first: re-enter KVM_RUN with immediate_exit=1 (KVM finishes the "
            "pending exit, then returns -EINTR), then save",
    "restore": "complete the exit first (KVM_RUN with immediate_exit=1), then restore: otherwise "
               "the next KVM_RUN finishes the old exit over the restored state",
    "snapshot": "complete the exit first (KVM_RUN with immediate_exit=1), then take the whole "
                "snapshot, so every part of it is from after the completion",
}

_RED_BOLD: Final = "\x1b[1;31m"
_YELLOW_BOLD: Final = "\x1b[1;33m"
_RESET: Final = "\x1b[0m"


def severity_rank(severity: str) -> int:
    """``info`` < ``warning`` < ``error`` < ``critical``; an unknown name counts as warning, as
    the log sink never reports a violation below warning."""
    return _SEVERITY_RANK.get(severity, _SEVERITY_RANK[Severity.WARNING.value])


def alert_stack(alert: ViolationAlert) -> dict[str, Any] | None:
    """The alert's symbolized user stack, if the tracker attached one."""
    stack = getattr(alert, "user_stack", None)
    return stack if isinstance(stack, dict) else None


# ---- call sites ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class CallSite:
    """Where the VMM issued the ioctl: a function of a module, else an offset in it."""

    module: str | None = None
    function: str | None = None
    file_offset: int | None = None
    file: str | None = None  # where the debug info says (not part of what tells findings apart)
    line: int | None = field(default=None, compare=False)

    def describe(self) -> str:
        module = os.path.basename(self.module) if self.module else "unknown module"
        where = f" {self.file}:{self.line}" if self.file and self.line else ""
        if self.function is not None:
            return f"{self.function}{where} ({module})"
        if self.file_offset is not None:
            return f"{module}+0x{self.file_offset:x}"
        return "unknown call site"

    def to_json(self) -> dict[str, Any]:
        return {"module": self.module, "function": self.function,
                "file_offset": self.file_offset, "file": self.file, "line": self.line,
                "text": self.describe()}


UNKNOWN_CALL_SITE: Final = CallSite()


def is_ioctl_wrapper(frame: Mapping[str, Any]) -> bool:
    function = frame.get("function")
    module = frame.get("module")
    if module and os.path.basename(module).startswith(_WRAPPER_MODULE_PREFIXES):
        return True
    if not function:
        return False
    return (function in _WRAPPER_FUNCTIONS or function in _VMM_WRAPPER_FUNCTIONS
            or function.startswith(_WRAPPER_FUNCTION_PREFIXES))


def call_site(stack: Mapping[str, Any] | None) -> CallSite:
    """The first frame in the VMM's own code past the ioctl wrapper (libc, the loader and the
    vDSO are not its code): (module, function, file:line), else (module, offset)."""
    frames: Sequence[Mapping[str, Any]] = (stack or {}).get("frames") or []
    for frame in frames:
        if is_ioctl_wrapper(frame) or is_system_frame(dict(frame)):
            continue
        if frame.get("function"):
            return CallSite(module=frame.get("module"), function=frame["function"],
                            file=frame.get("file"), line=frame.get("line"))
        if frame.get("file_offset") is not None:
            return CallSite(module=frame.get("module"), file_offset=frame["file_offset"])
        return UNKNOWN_CALL_SITE
    return UNKNOWN_CALL_SITE


# ---- findings -----------------------------------------------------------------------------------

@dataclass
class Finding:
    """One distinct bug: every occurrence with the same kind, exit reason, ioctl and call site."""

    kind: str  # "save" | "restore" | "snapshot"
    rule: str
    exit_reason: str
    ioctl: str  # for a snapshot: its save ioctls in order, joined by " + "
    call_site: CallSite
    first: ViolationAlert | SnapshotAlert
    stack: dict[str, Any] | None
    severity: str
    count: int = 0
    pids: set[int] = field(default_factory=set)
    threads: set[tuple[int, int]] = field(default_factory=set)  # (pid, tid)
    vcpus: set[tuple[int, int]] = field(default_factory=set)  # (pid, vCPU id)

    def title(self) -> str:
        return f"{self._what()} while {self.exit_reason} is pending"

    def case_name(self) -> str:
        return f"{self._what()} while {self.exit_reason} pending at {self.call_site.describe()}"

    def _what(self) -> str:
        return f"snapshot ({self.ioctl})" if self.kind == "snapshot" else self.ioctl

    def why(self) -> str:
        return _reason(self.first)

    def fix(self) -> str:
        return _FIXES.get(self.kind, _FIXES["save"])


@dataclass(frozen=True)
class GateVerdict:
    failed: bool  # a finding at or above the --fail-on threshold
    inconclusive: bool  # unverified findings or maps full, and --allow-lost not given
    reason: str

    @property
    def status(self) -> str:
        """``fail``, ``inconclusive`` or ``pass``: a failing finding is a fact even with losses."""
        if self.failed:
            return "fail"
        return "inconclusive" if self.inconclusive else "pass"


@dataclass(frozen=True)
class GateMeta:
    tool_version: str
    kernel_release: str
    bcc_version: str | None
    command: list[str]
    policy: dict[str, Any]
    started_unix: float
    finished_unix: float
    exit_status_of_command: int  # as subprocess reports it: -S for a command killed by signal S

    @property
    def duration_seconds(self) -> float:
        return max(self.finished_unix - self.started_unix, 0.0)


def command_exit_status(returncode: int) -> int:
    """The shell's view of a command's status: 128 + S for one killed by signal S."""
    return 128 - returncode if returncode < 0 else returncode


def exit_status(command_status: int, verdict: GateVerdict,
                error_exitcode: int = DEFAULT_ERROR_EXITCODE) -> int:
    """What ``watch`` exits with (the rules are in this module's docstring).

    ``command_status`` is the command's return code as subprocess gives it (negative: killed
    by that signal) or already as 128 + S.
    """
    own = command_exit_status(command_status)
    if verdict.failed:
        return error_exitcode
    if verdict.inconclusive and own == 0:
        return INCONCLUSIVE_EXITCODE
    return own


def check_fail_on(fail_on: str) -> str:
    if fail_on not in FAIL_ON_CHOICES:
        raise ValueError(f"fail_on: expected one of {', '.join(FAIL_ON_CHOICES)}, got {fail_on!r}")
    return fail_on


def fails_gate(finding: Finding, fail_on: str) -> bool:
    """``warning``/``error``/``critical``: any finding at or above that severity.
    ``snapshot``: only snapshot findings and critical restores (the state a migration or a
    checkpoint would carry is wrong), for VMMs that peek registers on purpose."""
    if fail_on == "snapshot":
        return finding.kind == "snapshot" or (
            finding.kind == "restore" and finding.severity == Severity.CRITICAL.value)
    return severity_rank(finding.severity) >= severity_rank(check_fail_on(fail_on))


# ---- the report ---------------------------------------------------------------------------------

class GateReport:
    """Collects a run's findings and counts; renders text, JSON and JUnit; decides the verdict.

    ``fail_on`` and ``allow_lost`` are the gate's settings, used by :meth:`verdict` (unless it
    is given others) and so by every rendering.
    """

    def __init__(self, fail_on: str = DEFAULT_FAIL_ON, allow_lost: bool = False) -> None:
        self.fail_on = check_fail_on(fail_on)
        self.allow_lost = allow_lost
        self._findings: dict[tuple[Any, ...], Finding] = {}
        self.occurrences: dict[str, int] = {"save": 0, "restore": 0, "snapshot": 0}
        self.inspections = 0
        self.sanctioned: dict[str, int] = {}
        self.events_lost = 0
        # VM (comm[pid] for a test VMM) -> findings the kernel counted whose report never
        # reached us: no call site, only that they happened (tracer.tracker.unverified)
        self.unverified: dict[str, int] = {}
        self.maps_full: dict[str, int] = {}
        self.stacks_missed: dict[str, int] = {}  # reason -> reports without their user stack
        self.captures_allowed = 0  # stack captures between two reads of the ring
        self.ringbuf_pages: int | None = None
        self.max_vcpus: int | None = None
        self.reader_nice: int | None = None  # the ring reader's nice value (None: unchanged)
        self.exits_traced: int | None = None
        self.pending_exits: int | None = None
        self.meta: GateMeta | None = None
        # Occurrences a suppressions file silenced (tracer.suppressions): never findings here;
        # their account is printed after the summary and put in the JSON as given.
        self.suppressed = 0
        self.suppression_lines: list[str] = []
        self.suppressions_json: dict[str, Any] | None = None

    # -- collecting

    def add_violation(self, alert: ViolationAlert, stack: dict[str, Any] | None = None) -> None:
        stack = stack if stack is not None else alert_stack(alert)
        finding = self._finding(alert.kind, alert.rule, alert.exit_reason, alert.ioctl,
                                call_site(stack), alert, stack, alert.severity)
        finding.threads.add((alert.pid, alert.tid))
        finding.vcpus.add((alert.pid, alert.vcpu_id))

    def add_snapshot(self, alert: SnapshotAlert) -> None:
        ioctls = " + ".join(dict.fromkeys(alert.ioctls)) or "?"
        # The tracker gives a snapshot no stack: its saves' stacks are on their own findings.
        finding = self._finding("snapshot", SNAPSHOT_RULE, alert.exit_reason, ioctls,
                                UNKNOWN_CALL_SITE, alert, None, alert.severity)
        finding.threads.update((alert.pid, tid) for tid in alert.tids)
        finding.vcpus.add((alert.pid, alert.vcpu_id))

    def _finding(self, kind: str, rule: str, exit_reason: str, ioctl: str, site: CallSite,
                 alert: ViolationAlert | SnapshotAlert, stack: dict[str, Any] | None,
                 severity: str) -> Finding:
        key = (kind, exit_reason, ioctl, site)
        finding = self._findings.get(key)
        if finding is None:
            finding = Finding(kind, rule, exit_reason, ioctl, site, alert, stack, severity)
            self._findings[key] = finding
        elif severity_rank(severity) > severity_rank(finding.severity):
            finding.severity = severity
        finding.count += 1
        finding.pids.add(alert.pid)
        self.occurrences[kind] = self.occurrences.get(kind, 0) + 1
        return finding

    def set_inspections(self, count: int) -> None:
        """Lone reads of one kind of state, judged inspections by the kernel: correct use of
        the ABI, not findings."""
        self.inspections = count

    def set_unverified(self, by_process: Mapping[str, int]) -> None:
        self.unverified = {name: n for name, n in by_process.items() if n}

    def count_sanctioned(self, rule: str, count: int = 1) -> None:
        self.sanctioned[rule] = self.sanctioned.get(rule, 0) + count

    def set_losses(self, events_lost: int, maps_full: Mapping[str, int],
                   ringbuf_pages: int | None = None, max_vcpus: int | None = None) -> None:
        """What the probes dropped; the current sizes, when given, make the rerun hint concrete."""
        self.events_lost = events_lost
        self.maps_full = {name: n for name, n in maps_full.items() if n}
        self.ringbuf_pages = ringbuf_pages
        self.max_vcpus = max_vcpus

    def set_stacks_missed(self, by_reason: Mapping[str, int], captures_allowed: int) -> None:
        """Reports that went without their user stack, by reason: counted, never a loss (the
        finding is there, its call site may be unknown). ``captures_allowed``: the probes'
        stack captures between two reads of the ring (ProbeConfig.stack_tokens)."""
        self.stacks_missed = {reason: n for reason, n in by_reason.items() if n}
        self.captures_allowed = captures_allowed

    def set_exit_totals(self, exits_traced: int, pending_exits: int) -> None:
        """Exits seen and how many left a completion pending: what a clean run covered."""
        self.exits_traced = exits_traced
        self.pending_exits = pending_exits

    def set_meta(self, tool_version: str, kernel_release: str, bcc_version: str | None,
                 command: Sequence[str], policy: Mapping[str, Any], started_unix: float,
                 finished_unix: float, exit_status_of_command: int) -> None:
        self.meta = GateMeta(tool_version, kernel_release, bcc_version, list(command),
                             dict(policy), started_unix, finished_unix, exit_status_of_command)

    # -- judging

    @property
    def findings(self) -> list[Finding]:
        """Most severe first, then most frequent, then in the order they were first seen."""
        ordered = list(self._findings.values())
        return sorted(ordered, key=lambda f: (-severity_rank(f.severity), -f.count))

    @property
    def lossy(self) -> bool:
        """What the verdict cannot vouch for: unverified findings, or maps full (vCPUs or
        windows the kernel could not follow). Events lost alone are not: see the module doc."""
        return bool(self.unverified) or bool(self.maps_full)

    def verdict(self, fail_on: str | None = None, allow_lost: bool | None = None) -> GateVerdict:
        """Failed: a finding fails the gate under ``fail_on`` (see :func:`fails_gate`).
        Inconclusive: events were lost or a map was full and ``allow_lost`` is false."""
        fail_on = check_fail_on(fail_on if fail_on is not None else self.fail_on)
        allow_lost = self.allow_lost if allow_lost is None else allow_lost
        failing = sum(fails_gate(f, fail_on) for f in self._findings.values())
        threshold = ("--fail-on snapshot (snapshots and critical restores)"
                     if fail_on == "snapshot" else f"at or above severity {fail_on}")
        inconclusive = self.lossy and not allow_lost
        if failing:
            reason = f"{_plural(failing, 'finding')} {threshold}"
        elif self._findings:
            reason = f"no finding {threshold} ({_plural(len(self._findings), 'finding')} below)"
        else:
            reason = "no completion race seen" if self.lossy else "no completion race found"
        if self.suppressed:
            reason += f"; {_plural(self.suppressed, 'occurrence')} suppressed"
        if self.lossy:
            reason += f"; {self._losses_text()}"
            reason += ", allowed by --allow-lost" if allow_lost else ": cannot claim \"no race\""
        return GateVerdict(failed=failing > 0, inconclusive=inconclusive, reason=reason)

    # -- text

    def render_text(self, color: bool = False) -> str:
        """The sanitizer-style report for stderr; ``color`` for a TTY."""
        lines: list[str] = []
        for finding in self.findings:
            lines.extend(self._finding_lines(finding, color))
            lines.append("")
        lines.append(self._summary_line())
        if self.stacks_missed:
            lines.append(self._stacks_missed_line())
        lines.extend(self.suppression_lines)
        if self.lossy:
            lines.append(_paint(self._losses_line(), _YELLOW_BOLD, color))
        verdict = self.verdict()
        lines.append(f"{TOOL}: verdict: {verdict.status} ({verdict.reason})")
        return "\n".join(lines) + "\n"

    def _finding_lines(self, finding: Finding, color: bool) -> list[str]:
        first = finding.first
        level = "ERROR" if severity_rank(finding.severity) >= severity_rank("error") else "WARNING"
        header = (f"=={first.pid}=={level}: {TOOL}: {finding.title()} "
                  f"({finding.rule}, severity {finding.severity})")
        lines = [_paint(header, _RED_BOLD if level == "ERROR" else _YELLOW_BOLD, color),
                 f"  seen {_times(finding.count)} in {_plural(len(finding.pids), 'process')}, "
                 f"{_plural(len(finding.threads), 'thread')}, "
                 f"{_plural(len(finding.vcpus), 'vCPU')}",
                 f"  first: {_describe_first(first)}",
                 f"  why: {finding.why()}",
                 f"  fix: {finding.fix()}"]
        if finding.kind != "snapshot":
            lines.append(f"  call site: {finding.call_site.describe()}")
            if getattr(first, "judged_on", "ioctl") != "ioctl":
                lines.append("  note: held in the kernel as a lone read until its window "
                             "became a finding: its stack is rebuilt from the top of stack "
                             "kept at the read (none when the window's end made it one)")
            lines.extend(stack_lines(finding.stack))
        return lines

    def _summary_line(self) -> str:
        sanctioned = sum(self.sanctioned.values())
        tail = (f"{_plural(self.inspections, 'register peek')} judged benign; "
                f"{sanctioned} sanctioned; "
                + (f"{self.suppressed} suppressed; " if self.suppressed else "")
                + f"{_plural(self.events_lost, 'event')} lost")
        if self.events_lost and not self.unverified:
            tail += " (none of them a finding)"
        if not self._findings:
            traced = ""
            if self.exits_traced is not None:
                traced = f"{_plural(self.exits_traced, 'exit')} traced"
                if self.pending_exits is not None:
                    traced += f", {self.pending_exits} left a completion pending"
                traced += "; "
            # With events lost, "found" would be a claim the next line takes back.
            found = "seen in what was traced" if self.lossy else "found"
            return f"{TOOL}: no completion race {found} ({traced}{tail})"
        kinds = ", ".join(_plural(n, _KIND_NOUN.get(kind, kind))
                          for kind, n in self.occurrences.items() if n)
        total = sum(self.occurrences.values())
        processes = len(set().union(*(f.pids for f in self._findings.values())))
        return (f"SUMMARY: {TOOL}: {_plural(len(self._findings), 'finding')} "
                f"({_plural(total, 'occurrence')}: {kinds}) in "
                f"{_plural(processes, 'process')}; {tail}")

    def _stacks_missed_line(self) -> str:
        why = "; ".join(
            f"{reason} {n} "
            f"({_STACK_MISS_TEXT.get(reason, reason).format(allowed=self.captures_allowed)})"
            for reason, n in sorted(self.stacks_missed.items()))
        total = sum(self.stacks_missed.values())
        return (f"{TOOL}: {_plural(total, 'report')} went without a user stack, so without a "
                f"call site: {why}")

    def _losses_text(self) -> str:
        parts = []
        if self.unverified:
            procs = ", ".join(f"{name} ({n})" for name, n in sorted(self.unverified.items()))
            total = _plural(sum(self.unverified.values()), "finding")
            parts.append(f"unverified (events lost): {total} in {procs}")
        if self.maps_full:
            full = ", ".join(f"{name} {n}" for name, n in sorted(self.maps_full.items()))
            parts.append(f"maps full: {full}")
        return " / ".join(parts)

    def _losses_line(self) -> str:
        claim = ("the findings above may be incomplete" if self._findings
                 else "cannot claim \"no race\"")
        hints = []
        if self.unverified:
            pages = 4 * self.ringbuf_pages if self.ringbuf_pages else DEFAULT_RERUN_PAGES
            hints.append(f"--ringbuf-pages {pages}")
        if self.maps_full:
            hints.append(f"--max-vcpus {2 * self.max_vcpus}" if self.max_vcpus
                         else "--max-vcpus N (more than the vCPUs traced at once)")
        rerun = " (or ".join(hints) + (")" if len(hints) > 1 else "")
        allowed = " (--allow-lost given: not failing the gate)" if self.allow_lost else ""
        what = ("the kernel counted them, the ring buffer dropped their reports: no call site"
                if self.unverified else "")
        return (f"{TOOL}: {claim}: {self._losses_text()}{'; ' + what if what else ''}; "
                f"rerun with {rerun}, or pass --allow-lost{allowed}")

    # -- JSON

    def to_json(self) -> dict[str, Any]:
        """The whole result, JSON-ready (lists and dicts of plain values only)."""
        verdict = self.verdict()
        meta = self.meta
        out = {
            "schema": REPORT_SCHEMA,
            "verdict": verdict.status,
            "verdict_reason": verdict.reason,
            "gate": {"fail_on": self.fail_on, "allow_lost": self.allow_lost},
            "findings": [self._finding_json(f) for f in self.findings],
            "counts": {
                "findings": len(self._findings),
                "occurrences": sum(self.occurrences.values()),
                "violations": self.occurrences.get("save", 0),
                "restores": self.occurrences.get("restore", 0),
                "snapshots": self.occurrences.get("snapshot", 0),
                "inspections": self.inspections,
                "sanctioned": dict(sorted(self.sanctioned.items())),
                "suppressed": self.suppressed,
                "exits_traced": self.exits_traced,
                "pending_exits": self.pending_exits,
            },
            "events_lost": self.events_lost,
            "ringbuf_pages": self.ringbuf_pages,
            "reader_nice": self.reader_nice,
            "unverified": {"findings": sum(self.unverified.values()),
                           "processes": dict(sorted(self.unverified.items()))},
            "maps_full": dict(sorted(self.maps_full.items())),
            "meta": None if meta is None else {
                **asdict(meta),
                "duration_seconds": meta.duration_seconds,
                "command_exit_status": command_exit_status(meta.exit_status_of_command),
            },
        }
        if self.suppressions_json is not None:
            out["suppressions"] = self.suppressions_json
        return out

    def _finding_json(self, finding: Finding) -> dict[str, Any]:
        return {
            "kind": finding.kind,
            "rule": finding.rule,
            "severity": finding.severity,
            "fails_gate": fails_gate(finding, self.fail_on),
            "exit_reason": finding.exit_reason,
            "ioctl": finding.ioctl,
            "call_site": finding.call_site.to_json(),
            "count": finding.count,
            "pids": sorted(finding.pids),
            "threads": [{"pid": pid, "tid": tid} for pid, tid in sorted(finding.threads)],
            "vcpus": [{"pid": pid, "vcpu_id": vcpu} for pid, vcpu in sorted(finding.vcpus)],
            "why": finding.why(),
            "fix": finding.fix(),
            "first": asdict(finding.first),
            "stack": finding.stack,
        }

    def write_json(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as out:
            json.dump(self.to_json(), out, indent=2)
            out.write("\n")

    # -- JUnit

    def junit_cases(self) -> list[JunitCase]:
        """One case per finding (failed when it fails the gate); one passing case when there
        is none, so the reporter shows the gate ran; an error case when events were lost."""
        cases = []
        for finding in self.findings:
            block = "\n".join(self._finding_lines(finding, color=False))
            classname, name = f"{TOOL}.{finding.kind}", finding.case_name()
            if fails_gate(finding, self.fail_on):
                message = (f"{finding.title()} ({finding.rule}, severity {finding.severity}), "
                           f"seen {_times(finding.count)}")
                cases.append(JunitCase(classname, name, "failure", message, "completion-race",
                                       block))
            else:
                cases.append(JunitCase(classname, name, "passed",
                                       text=f"below --fail-on {self.fail_on}:\n{block}"))
        if not self._findings:
            cases.append(JunitCase(f"{TOOL}.gate", "no completion race", "passed",
                                   text=self._summary_line()))
        if self.lossy:
            line = self._losses_line()
            if self.allow_lost:
                cases.append(JunitCase(f"{TOOL}.gate", "events lost", "passed", text=line))
            else:
                cases.append(JunitCase(f"{TOOL}.gate", "events lost", "error",
                                       self._losses_text(), "events-lost", line))
        return cases

    def write_junit(self, path: str | os.PathLike[str]) -> None:
        meta = self.meta
        verdict = self.verdict()
        properties = {"verdict": verdict.status, "verdict_reason": verdict.reason,
                      "fail_on": self.fail_on}
        if meta is not None:
            properties.update({
                "tool_version": meta.tool_version, "kernel_release": meta.kernel_release,
                "bcc_version": meta.bcc_version or "unknown",
                "command": " ".join(meta.command),
                "command_exit_status": str(command_exit_status(meta.exit_status_of_command)),
            })
        tree = junit_tree(TOOL, self.junit_cases(), properties,
                          meta.duration_seconds if meta else 0.0,
                          meta.started_unix if meta else None)
        write_junit_file(path, tree)


class GateSink:
    """An :class:`tracer.alerts.AlertSink` that feeds a :class:`GateReport`."""

    def __init__(self, report: GateReport) -> None:
        self.report = report

    def violation(self, alert: ViolationAlert) -> None:
        self.report.add_violation(alert)

    def sanctioned(self, alert: ViolationAlert) -> None:
        self.report.count_sanctioned(alert.rule)

    def snapshot(self, alert: SnapshotAlert) -> None:
        self.report.add_snapshot(alert)

    def notice(self, event: str, level: str, **fields: Any) -> None:
        pass  # losses come in once, from the probes' final counters (set_losses)


# ---- text helpers -------------------------------------------------------------------------------

_KIND_NOUN: Final = {"save": "save", "restore": "restore", "snapshot": "snapshot"}
_IRREGULAR_PLURALS: Final = {"process": "processes"}


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun if n == 1 else _IRREGULAR_PLURALS.get(noun, noun + 's')}"


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


def _paint(line: str, style: str, color: bool) -> str:
    return f"{style}{line}{_RESET}" if color else line


def _duration(ns: int) -> str:
    if ns < 1_000:
        return f"{ns} ns"
    if ns < 1_000_000:
        return f"{ns / 1e3:.1f} us"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.1f} ms"
    return f"{ns / 1e9:.2f} s"


def _access(access: Mapping[str, object]) -> str:
    """The kvm_run exit union as the alert describes it (tracer.events ``describe()``)."""
    if "port" in access:
        text = f"port {access['port']} {str(access.get('direction', '?')).upper()}"
        return text + (f" size {access['size']}" if "size" in access else "")
    if "gpa" in access:
        return (f"MMIO {access.get('direction', 'access')} of {access['gpa']}"
                + (f" length {access['length']}" if "length" in access else ""))
    if "msr" in access:
        op = "WRMSR" if access.get("direction") == "write" else "RDMSR"
        return f"{op} {access['msr']}"
    if "hypercall_nr" in access:
        return f"hypercall nr {access['hypercall_nr']}"
    return ", ".join(f"{key} {value}" for key, value in access.items())


def _describe_first(alert: ViolationAlert | SnapshotAlert) -> str:
    access = _access(alert.access)
    if isinstance(alert, SnapshotAlert):
        threads = ", ".join(str(tid) for tid in alert.tids)
        parts = [f"pid {alert.pid}", f'VM "{alert.vm}"', f"vCPU {alert.vcpu_id}",
                 f"thread{'s' if len(alert.tids) != 1 else ''} {threads}", access,
                 f"pending {_duration(alert.pending_ns)} at the last save",
                 f"closed by {alert.closed_by.replace('_', ' ')}"]
    else:
        parts = [f"pid {alert.pid} ({alert.comm}) thread {alert.tid}", f'VM "{alert.vm}"',
                 f"vCPU {alert.vcpu_id} (fd {alert.vcpu_fd})", access,
                 f"pending {_duration(alert.pending_ns)}",
                 f"detected at {alert.detected_at.replace('_', ' ')}"]
        judged_on = getattr(alert, "judged_on", "ioctl")
        if judged_on != "ioctl":
            parts.append(f"judged on {judged_on.replace('_', ' ')}")
    return ", ".join(part for part in parts if part)


def _reason(alert: ViolationAlert | SnapshotAlert) -> str:
    if alert.reason:
        return alert.reason
    if isinstance(alert, SnapshotAlert):
        return (f"{len(alert.ioctls)} save ioctls read vCPU state inside one window while "
                f"{alert.exit_reason} was pending: the snapshot holds the state from before "
                "the completion, which a restore would replay or lose")
    return "a state ioctl was issued while a completion was pending"
