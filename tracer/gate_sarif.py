"""SARIF 2.1.0 for the ``watch`` gate (``--sarif FILE``): what GitHub code scanning, GitLab and
IDE SARIF viewers show on the source line.

One result per finding: ``ruleId`` the rule (save-, restore-, snapshot-mid-completion), the
level from the severity (critical and error: ``error``, warning: ``warning``, info: ``note``),
the message, the why and the fix (the rule's help, the result's properties). Its location is
the call site's file:line relative to the source root (``uriBaseId`` SRCROOT, resolved through
``originalUriBaseIds``); when the call site is outside the root (a third-party crate, a
library), the first outer frame under the root; when no frame is, the call site's module (a
results viewer needs an artifact: GitHub refuses a whole file holding one result without).
The whole stack is the result's ``stacks`` entry, frames outside the root as module+offset.
``partialFingerprints`` holds a fingerprint of the rule, ioctl, exit reason, call-site function
and source file (tracer.gate_location.fingerprint): it survives edits that move lines.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from tracer import __version__
from tracer.gate import TOOL, Finding, GateReport, command_exit_status, fails_gate
from tracer.gate_location import (
    FINGERPRINT_KEY,
    Frame,
    call_site_frame,
    fingerprint,
    frames_of,
    module_name,
    relative_path,
    review_location,
    source_line,
)
from tracer.symbolize import frame_text

SARIF_VERSION: Final = "2.1.0"
SARIF_SCHEMA: Final = ("https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/"
                       "sarif-schema-2.1.0.json")
SRCROOT: Final = "SRCROOT"
LEVELS: Final = {"critical": "error", "error": "error", "warning": "warning", "info": "note"}
_RULE_TEXT: Final = {
    "save-mid-completion": (
        "vCPU state read while a KVM exit completion is pending",
        "A save ioctl (KVM_GET_REGS, KVM_GET_SREGS, ...) ran after KVM_RUN returned with an "
        "exit whose completion KVM performs only at the next KVM_RUN (an IN's data, an MMIO "
        "read's value, RIP past the instruction): the state read is from before the "
        "completion, and a snapshot or migration built from it replays or loses the access."),
    "restore-mid-completion": (
        "vCPU state written while a KVM exit completion is pending",
        "A restore ioctl (KVM_SET_REGS, ...) ran while an exit's completion was pending: the "
        "next KVM_RUN finishes the old exit over the state just written."),
    "snapshot-mid-completion": (
        "vCPU snapshot taken while a KVM exit completion is pending",
        "Several save ioctls read one vCPU inside one pending window: the snapshot holds the "
        "state from before the completion, which a restore would replay or lose."),
}


def level(severity: str) -> str:
    return LEVELS.get(severity, "warning")


def directory_uri(path: str) -> str:
    """A directory as a file URI ending in "/" (SARIF 3.14.14: a base URI ends with a slash)."""
    uri = "file://" + quote(os.path.abspath(path))
    return uri if uri.endswith("/") else uri + "/"


def _artifact(path: str, source_root: str) -> dict[str, Any]:
    """A file under the root relative to SRCROOT; one outside it as an absolute file URI."""
    rel = relative_path(path, source_root) if os.path.isabs(path) else None
    if rel is not None:
        return {"uri": quote(rel), "uriBaseId": SRCROOT}
    return {"uri": "file://" + quote(os.path.normpath(path))}


def _frame_location(frame: Frame, source_root: str) -> dict[str, Any]:
    """A frame under the root as its file:line; any other as module+offset."""
    location: dict[str, Any] = {"message": {"text": frame_text(dict(frame))}}
    where = source_line(frame, source_root)
    if where is not None and where.path is not None:
        region: dict[str, Any] = {"startLine": where.line}
        if where.column is not None:
            region["startColumn"] = where.column
        location["physicalLocation"] = {
            "artifactLocation": {"uri": quote(where.path), "uriBaseId": SRCROOT},
            "region": region}
    elif isinstance(frame.get("file_offset"), int):
        offset = int(frame["file_offset"])
        location["physicalLocation"] = {"address": {
            "relativeAddress": offset,
            "fullyQualifiedName": f"{module_name(frame) or '??'}+0x{offset:x}"}}
    if frame.get("function"):
        location["logicalLocations"] = [{"fullyQualifiedName": str(frame["function"]),
                                         "kind": "function"}]
    return location


def _stack_frame(frame: Frame, source_root: str, tid: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"location": _frame_location(frame, source_root)}
    if frame.get("module"):
        out["module"] = str(frame["module"])
    if tid is not None:
        out["threadId"] = tid
    return out


def _result_location(finding: Finding, source_root: str,
                     command: list[str] | None) -> dict[str, Any]:
    found = review_location(finding.stack, source_root)
    site = call_site_frame(finding.stack)
    logical = ([{"fullyQualifiedName": str(site["function"]), "kind": "function"}]
               if site is not None and site.get("function") else [])
    if found is not None:
        where, frame = found
        region: dict[str, Any] = {"startLine": where.line}
        if where.column is not None:
            region["startColumn"] = where.column
        location: dict[str, Any] = {"physicalLocation": {
            "artifactLocation": {"uri": quote(str(where.path)), "uriBaseId": SRCROOT},
            "region": region}}
        if frame is not site:
            location["message"] = {"text": f"the call site {finding.call_site.describe()} is "
                                           "outside the source root: the project's frame "
                                           "that led to it"}
    elif site is not None and site.get("module"):
        location = {"physicalLocation": {"artifactLocation": _artifact(str(site["module"]),
                                                                       source_root)},
                    "message": {"text": f"no source line under the source root: located at "
                                        f"the module, {frame_text(dict(site))}"}}
    else:
        # No stack (a snapshot, or stacks off): the command that ran is the artifact.
        program = (command or ["unknown"])[0]
        location = {"physicalLocation": {"artifactLocation": _artifact(
            os.path.abspath(program) if "/" in program else program, source_root)},
            "message": {"text": "no stack for this finding: located at the command that ran"}}
    if logical:
        location["logicalLocations"] = logical
    return location


def _rule(finding: Finding) -> dict[str, Any]:
    short, full = _RULE_TEXT.get(finding.rule, (finding.rule, finding.why()))
    return {
        "id": finding.rule,
        "name": "".join(part.capitalize() for part in finding.rule.split("-")),
        "shortDescription": {"text": short},
        "fullDescription": {"text": full},
        "help": {"text": f"{full}\nFix: {finding.fix()}",
                 "markdown": f"{full}\n\n**Fix:** {finding.fix()}"},
        "defaultConfiguration": {"level": level(finding.severity)},
        "properties": {"tags": ["kvm", "concurrency", "correctness"], "precision": "high",
                       "problem.severity": level(finding.severity)},
    }


def _result(finding: Finding, rule_index: int, source_root: str, fails: bool,
            command: list[str] | None) -> dict[str, Any]:
    seen = "once" if finding.count == 1 else f"{finding.count} times"
    message = (f"{finding.title()} at {finding.call_site.describe()} (seen {seen}): "
               f"{finding.why()}")
    first = finding.first
    tid = getattr(first, "tid", None)
    result: dict[str, Any] = {
        "ruleId": finding.rule,
        "ruleIndex": rule_index,
        "level": level(finding.severity),
        "message": {"text": message},
        "locations": [_result_location(finding, source_root, command)],
        "partialFingerprints": {FINGERPRINT_KEY: fingerprint(
            finding.rule, finding.ioctl, finding.exit_reason, finding.stack, source_root)},
        "properties": {
            "kind": finding.kind, "severity": finding.severity, "failsGate": fails,
            "exitReason": finding.exit_reason, "ioctl": finding.ioctl,
            "callSite": finding.call_site.describe(), "count": finding.count,
            "processes": len(finding.pids), "threads": len(finding.threads),
            "vcpus": len(finding.vcpus), "why": finding.why(), "fix": finding.fix()},
    }
    frames = frames_of(finding.stack)
    if frames:
        partial = (finding.stack or {}).get("partial")
        text = "user stack of the first occurrence" + (
            f" (may be partial: {(finding.stack or {}).get('why_partial')})" if partial else "")
        result["stacks"] = [{"message": {"text": text},
                             "frames": [_stack_frame(f, source_root,
                                                     tid if isinstance(tid, int) else None)
                                        for f in frames]}]
    return result


def sarif_log(report: GateReport, source_root: str | os.PathLike[str]) -> dict[str, Any]:
    """The report's findings as one SARIF run; ``source_root`` anchors the relative paths."""
    root = os.path.abspath(source_root)
    meta = report.meta
    command = meta.command if meta is not None else None
    rules: list[dict[str, Any]] = []
    index: dict[str, int] = {}
    results = []
    for finding in report.findings:
        if finding.rule not in index:
            index[finding.rule] = len(rules)
            rules.append(_rule(finding))
        results.append(_result(finding, index[finding.rule], root,
                               fails_gate(finding, report.fail_on), command))
    verdict = report.verdict()
    invocation: dict[str, Any] = {"executionSuccessful": True}
    if meta is not None:
        invocation["commandLine"] = " ".join(meta.command)
        invocation["exitCode"] = command_exit_status(meta.exit_status_of_command)
    if report.lossy:
        invocation["toolExecutionNotifications"] = [{
            "level": "warning", "message": {"text": report.verdict(allow_lost=False).reason}}]
    run: dict[str, Any] = {
        "tool": {"driver": {"name": TOOL, "version": __version__,
                            "semanticVersion": __version__, "rules": rules}},
        "originalUriBaseIds": {SRCROOT: {"uri": directory_uri(root),
                                         "description": {"text": "the source root "
                                                         "(--source-root)"}}},
        "invocations": [invocation],
        "results": results,
        "properties": {"verdict": verdict.status, "verdictReason": verdict.reason,
                       "failOn": report.fail_on, "suppressed": report.suppressed},
    }
    return {"$schema": SARIF_SCHEMA, "version": SARIF_VERSION, "runs": [run]}


def write_sarif(report: GateReport, path: str | os.PathLike[str],
                source_root: str | os.PathLike[str]) -> None:
    Path(path).write_text(json.dumps(sarif_log(report, source_root), indent=2) + "\n",
                          encoding="utf-8")
