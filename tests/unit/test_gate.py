"""The ``watch`` gate's report: grouping, text, JSON, JUnit, verdicts and exit status."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from tracer.alerts import SnapshotAlert, ViolationAlert
from tracer.gate import (
    DEFAULT_ERROR_EXITCODE,
    INCONCLUSIVE_EXITCODE,
    CallSite,
    GateReport,
    GateSink,
    GateVerdict,
    call_site,
    exit_status,
)

LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"
VMM = "/tmp/testvmm"
PIO = {"port": "0x3f8", "direction": "out", "size": 1, "count": 1}


def violation(*, pid: int = 100, tid: int = 100, vcpu_id: int = 0, ioctl: str = "KVM_GET_REGS",
              kind: str = "save", exit_reason: str = "KVM_EXIT_IO", severity: str = "error",
              rule: str = "save-mid-completion") -> ViolationAlert:
    return ViolationAlert(
        pid=pid, tid=tid, comm="testvmm", vm=f"testvmm[{pid}]", vmm="testvmm", vcpu_id=vcpu_id,
        vcpu_fd=5, exit_reason=exit_reason, access=PIO, ioctl=ioctl, kind=kind,
        pending_ns=18_200, rule=rule, severity=severity, reason="KVM_GET_REGS read vCPU state",
        detected_at="ioctl_entry", window=1)


def restore(**kwargs: Any) -> ViolationAlert:
    return violation(ioctl="KVM_SET_REGS", kind="restore", severity="critical",
                     rule="restore-mid-completion", **kwargs)


def snapshot(severity: str = "critical") -> SnapshotAlert:
    return SnapshotAlert(pid=100, vm="testvmm[100]", vmm="testvmm", vcpu_id=0,
                         exit_reason="KVM_EXIT_IO", access=PIO,
                         ioctls=["KVM_GET_REGS", "KVM_GET_SREGS"], tids=[100], window=1,
                         pending_ns=40_000, closed_by="reentry", severity=severity)


def frame(function: str | None, module: str | None = VMM, offset: int | None = 0x1234,
          address: int = 0x5581_0000_1234, file: str | None = None, line: int | None = None,
          inlined: bool = False) -> dict[str, Any]:
    return {"address": address, "module": module, "build_id": "3f2a9c" if module else None,
            "file_offset": offset, "function": function,
            "function_offset": 0x2c if function else None, "file": file, "line": line,
            "column": 9 if line else None, "inlined": inlined}


def stack(*frames: dict[str, Any], partial: bool = False,
          why: str | None = None) -> dict[str, Any]:
    return {"frames": list(frames), "method": "cfi", "complete": not partial,
            "partial": partial, "why_partial": why}


def c_stack(caller: str, partial: bool = False) -> dict[str, Any]:
    return stack(frame("__GI___ioctl", LIBC, address=0x7F12_0000_001B), frame(caller),
                 frame("main"), partial=partial, why="frame pointers missing" if partial else None)


# ---- grouping -----------------------------------------------------------------------------------

def test_same_call_site_merges_into_one_finding() -> None:
    report = GateReport()
    for tid in (100, 101):
        report.add_violation(violation(tid=tid), c_stack("save_vcpu_state"))
    report.add_violation(violation(vcpu_id=1), c_stack("save_vcpu_state"))
    [finding] = report.findings
    assert finding.count == 3
    assert finding.call_site == CallSite(VMM, "save_vcpu_state")
    assert (len(finding.pids), len(finding.threads), len(finding.vcpus)) == (1, 2, 2)


def test_different_call_site_ioctl_or_exit_splits() -> None:
    report = GateReport()
    report.add_violation(violation(), c_stack("save_vcpu_state"))
    report.add_violation(violation(), c_stack("migrate_vcpu"))
    report.add_violation(violation(ioctl="KVM_GET_SREGS"), c_stack("migrate_vcpu"))
    report.add_violation(violation(exit_reason="KVM_EXIT_MMIO"), c_stack("migrate_vcpu"))
    assert len(report.findings) == 4


def test_finding_keeps_the_most_severe_severity_and_the_first_alert() -> None:
    report = GateReport()
    first = violation(severity="warning", tid=7)
    report.add_violation(first, c_stack("f"))
    report.add_violation(violation(severity="critical"), c_stack("f"))
    [finding] = report.findings
    assert finding.severity == "critical" and finding.first is first


@pytest.mark.parametrize("wrapper", [
    frame("ioctl", LIBC), frame("__ioctl", None, None), frame("syscall", None, None),
    frame("__libc_ioctl", "/lib/libfoo.so"), frame(None, "/lib/x86_64-linux-gnu/libc-2.31.so"),
    frame(None, "/lib64/ld-linux-x86-64.so.2"),
    frame("libc::unix::linux_like::ioctl"), frame("std::sys::pal::unix::cvt"),
    frame("<std::fs::File as std::os::fd::raw::AsRawFd>::as_raw_fd"),
    frame("core::ops::function::FnOnce::call_once"),
    frame("vmm_sys_util::ioctl::ioctl_with_mut_ref"),
    frame("kvm_ioctls::ioctls::vcpu::VcpuFd::get_regs"),
    frame("<kvm_ioctls::ioctls::vcpu::VcpuFd>::get_regs"),
    frame("kvm_vcpu_ioctl", "/usr/bin/qemu-system-x86_64"),
])
def test_wrapper_frames_are_skipped(wrapper: dict[str, Any]) -> None:
    site = call_site(stack(frame("__GI___ioctl", LIBC), wrapper, frame("vmm::save_state")))
    assert site == CallSite(VMM, "vmm::save_state")


def test_call_site_falls_back_to_the_file_offset_then_unknown() -> None:
    assert call_site(stack(frame("ioctl", LIBC), frame(None, offset=0x99))) == CallSite(
        VMM, None, 0x99)
    assert call_site(stack(frame("ioctl", LIBC), frame(None, None, None))) == CallSite()
    assert call_site(stack(frame("ioctl", LIBC))) == CallSite()
    assert call_site(None) == CallSite()


def test_unknown_call_sites_merge_and_a_missing_stack_is_read_from_the_alert() -> None:
    report = GateReport()
    report.add_violation(violation())
    report.add_violation(violation(), stack(frame("ioctl", LIBC)))
    [finding] = report.findings
    assert finding.count == 2 and finding.call_site.describe() == "unknown call site"


def test_snapshots_are_findings_of_their_own_kind() -> None:
    report = GateReport()
    report.add_violation(violation(ioctl="KVM_GET_SREGS"), c_stack("save"))
    report.add_snapshot(snapshot())
    report.add_snapshot(snapshot())
    kinds = {f.kind: f for f in report.findings}
    assert kinds["snapshot"].count == 2
    assert kinds["snapshot"].ioctl == "KVM_GET_REGS + KVM_GET_SREGS"
    assert report.findings[0].kind == "snapshot"  # critical before error


def test_findings_order_by_severity_then_count() -> None:
    report = GateReport()
    report.add_violation(violation(severity="warning"), c_stack("a"))
    for _ in range(3):
        report.add_violation(violation(), c_stack("b"))
    report.add_violation(violation(), c_stack("c"))
    report.add_violation(restore(), c_stack("d"))
    assert [f.call_site.function for f in report.findings] == ["d", "b", "c", "a"]


def test_sink_feeds_the_report() -> None:
    report = GateReport()
    sink = GateSink(report)
    sink.violation(violation())
    sink.snapshot(snapshot())
    sink.sanctioned(violation(rule="port-0x7e"))
    sink.notice("events_lost", "warning", lost=3)
    assert len(report.findings) == 2
    assert report.inspections == 0 and report.sanctioned == {"port-0x7e": 1}


# ---- text ---------------------------------------------------------------------------------------

def busy_report(**kwargs: Any) -> GateReport:
    report = GateReport(**kwargs)
    for _ in range(5):
        report.add_violation(violation(), c_stack("save_vcpu_state"))
    report.add_violation(restore(), c_stack("restore_vcpu_state"))
    report.add_snapshot(snapshot())
    report.set_inspections(3)
    report.count_sanctioned("port-0x7e", 17)
    report.set_meta("0.1.0", "6.1.0-test", "0.26.0", ["./testvmm", "--bug"],
                    {"arch": "x86_64"}, 1000.0, 1002.5, 0)
    return report


def test_text_has_one_block_per_finding_and_a_summary() -> None:
    text = busy_report().render_text()
    assert text.count("==100==ERROR: kvm-completion-tracer: ") == 3
    assert ("==100==ERROR: kvm-completion-tracer: KVM_GET_REGS while KVM_EXIT_IO is pending "
            "(save-mid-completion, severity error)") in text
    assert "  seen 5 times in 1 process, 1 thread, 1 vCPU" in text
    assert ('  first: pid 100 (testvmm) thread 100, VM "testvmm[100]", vCPU 0 (fd 5), '
            "port 0x3f8 OUT size 1, pending 18.2 us, detected at ioctl entry") in text
    assert "  why: KVM_GET_REGS read vCPU state" in text
    assert "  fix: complete the exit first" in text
    assert "    #0 0x7f120000001b in __GI___ioctl+0x2c (libc.so.6+0x1234)" in text
    assert "    #1 0x558100001234 in save_vcpu_state+0x2c (testvmm+0x1234)" in text
    assert "snapshot (KVM_GET_REGS + KVM_GET_SREGS) while KVM_EXIT_IO is pending" in text
    assert ("SUMMARY: kvm-completion-tracer: 3 findings (7 occurrences: 5 saves, 1 restore, "
            "1 snapshot) in 1 process; 3 register peeks judged benign; 17 sanctioned; "
            "0 events lost") in text
    assert "verdict: fail" in text
    assert "\x1b[" not in text and "may be partial" not in text


def test_text_block_order_is_severity_first() -> None:
    text = busy_report().render_text()
    assert text.index("KVM_SET_REGS while") < text.index("KVM_GET_REGS while")


def test_partial_stack_is_flagged_and_missing_stack_said() -> None:
    report = GateReport()
    report.add_violation(violation(), c_stack("save_vcpu_state", partial=True))
    report.add_violation(violation(ioctl="KVM_GET_SREGS"))
    text = report.render_text()
    assert "  stack (cfi, incomplete: frame pointers missing):" in text
    assert "  stack: not captured" in text


def test_reports_without_their_user_stack_are_said_with_the_reason() -> None:
    """watch of a VMM whose reports outran the probes' stack captures (8 between two reads of
    the ring here): the findings of the rest say "unknown call site", and the report says why
    and how many captures were allowed (counted, never a loss: the verdict is unchanged)."""
    report = GateReport()
    report.add_violation(violation(ioctl="KVM_GET_MSRS"))
    report.set_stacks_missed({"stack_map_full": 0, "stack_failed": 0, "user_stack_failed": 0,
                              "user_stack_dropped": 12}, captures_allowed=8)
    text = report.render_text()
    assert ("kvm-completion-tracer: 12 reports went without a user stack, so without a call "
            "site: user_stack_dropped 12 (not sent: more reports at once than the 8 stack "
            "captures allowed between two reads of the ring, or the ring full)") in text
    assert text.index("SUMMARY:") < text.index("went without a user stack")
    assert report.verdict().status == "fail" and not report.lossy
    report.set_stacks_missed({"user_stack_dropped": 0, "user_stack_failed": 0}, 8)
    assert "without a user stack" not in report.render_text()


def test_frames_without_symbols_show_module_offsets() -> None:
    report = GateReport()
    report.add_violation(violation(), stack(frame(None, offset=0xABC), frame(None, None, None,
                                                                          address=0x10)))
    text = report.render_text()
    assert "    #0 0x558100001234 (testvmm+0xabc)" in text
    assert "    #1 0x10 (unknown module)" in text
    assert "  call site: testvmm+0xabc" in text


def test_call_site_is_the_vmms_own_code_with_file_and_line() -> None:
    """Past the ioctl wrapper and every frame of libc, the loader or the vDSO; an inlined
    frame counts (it is the VMM's code); its file:line is in the report."""
    report = GateReport()
    report.add_violation(violation(), stack(
        frame("__GI___ioctl", LIBC, address=0x7F12_0000_001B),
        frame("__some_libc_helper", LIBC, address=0x7F12_0000_0100),
        frame("save_vcpu_state", file="src/vcpu.c", line=119, inlined=True),
        frame("vmm_run", file="src/vcpu.c", line=137)))
    [finding] = report.findings
    assert finding.call_site == CallSite(VMM, "save_vcpu_state", file="src/vcpu.c", line=119)
    text = report.render_text()
    assert "  call site: save_vcpu_state src/vcpu.c:119 (testvmm)" in text
    assert ("    #2 0x558100001234 in save_vcpu_state src/vcpu.c:119:9 (testvmm+0x1234) "
            "[inlined]") in text
    assert report.to_json()["findings"][0]["call_site"]["line"] == 119


def test_color_only_when_asked() -> None:
    report = busy_report()
    assert "\x1b[1;31m==100==ERROR" in report.render_text(color=True)
    assert "\x1b[" not in report.render_text(color=False)


def test_clean_run_says_no_race_with_the_coverage() -> None:
    report = GateReport()
    report.set_exit_totals(1200, 40)
    report.set_inspections(1)
    text = report.render_text()
    assert text.startswith("kvm-completion-tracer: no completion race found (1200 exits traced, "
                           "40 left a completion pending; 1 register peek judged benign; "
                           "0 sanctioned; 0 events lost)")
    assert "ERROR" not in text and "verdict: pass" in text


def test_unverified_findings_refuse_to_claim_no_race() -> None:
    report = GateReport()
    report.set_losses(12, {"vcpus": 3, "fds": 0}, ringbuf_pages=16384, max_vcpus=4096)
    report.set_unverified({"vmm[41]": 2, "vmm[40]": 1, "ok[7]": 0})
    text = report.render_text()
    assert ('kvm-completion-tracer: cannot claim "no race": unverified (events lost): 3 findings '
            "in vmm[40] (1), vmm[41] (2) / maps full: vcpus 3; the kernel counted them, the "
            "ring buffer dropped their reports: no call site; rerun with --ringbuf-pages 65536 "
            "(or --max-vcpus 8192), or pass --allow-lost") in text
    assert "verdict: inconclusive" in text
    assert "no completion race found" not in text
    assert "kvm-completion-tracer: no completion race seen in what was traced (" in text


# ---- JSON ---------------------------------------------------------------------------------------

def test_json_round_trips_and_holds_the_whole_result(tmp_path: Path) -> None:
    report = busy_report()
    report.set_losses(0, {})
    data = report.to_json()
    assert json.loads(json.dumps(data)) == data
    path = tmp_path / "report.json"
    report.write_json(path)
    assert json.loads(path.read_text()) == data
    assert data["verdict"] == "fail"
    assert data["counts"] | {"sanctioned": None} == {
        "findings": 3, "occurrences": 7, "violations": 5, "restores": 1, "snapshots": 1,
        "inspections": 3, "sanctioned": None, "exits_traced": None, "pending_exits": None,
        "suppressed": 0}
    assert data["counts"]["sanctioned"] == {"port-0x7e": 17}
    assert data["events_lost"] == 0 and data["maps_full"] == {}
    assert data["meta"]["command"] == ["./testvmm", "--bug"]
    assert data["meta"]["duration_seconds"] == 2.5
    save = next(f for f in data["findings"] if f["kind"] == "save")
    assert save["count"] == 5 and save["severity"] == "error" and save["fails_gate"]
    assert save["call_site"]["function"] == "save_vcpu_state"
    assert save["first"]["ioctl"] == "KVM_GET_REGS" and save["pids"] == [100]
    assert save["stack"]["frames"][1]["function"] == "save_vcpu_state"


def test_json_command_killed_by_signal() -> None:
    report = busy_report()
    report.set_meta("0.1.0", "6.1.0", None, ["vmm"], {}, 1.0, 2.0, -9)
    assert report.to_json()["meta"]["command_exit_status"] == 137


# ---- JUnit --------------------------------------------------------------------------------------

def junit(report: GateReport, tmp_path: Path) -> ET.Element:
    path = tmp_path / "junit.xml"
    report.write_junit(path)
    [suite] = ET.parse(path).getroot().iter("testsuite")
    return suite


def test_junit_has_one_failing_testcase_per_finding(tmp_path: Path) -> None:
    suite = junit(busy_report(), tmp_path)
    cases = suite.findall("testcase")
    assert suite.get("name") == "kvm-completion-tracer"
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "3", "0")
    assert suite.get("time") == "2.500"
    assert {c.get("classname") for c in cases} == {
        "kvm-completion-tracer.save", "kvm-completion-tracer.restore",
        "kvm-completion-tracer.snapshot"}
    save = next(c for c in cases if c.get("classname") == "kvm-completion-tracer.save")
    assert save.get("name") == ("KVM_GET_REGS while KVM_EXIT_IO pending at save_vcpu_state "
                                "(testvmm)")
    failure = save.find("failure")
    assert failure is not None and failure.get("type") == "completion-race"
    assert "seen 5 times" in (failure.text or "")


def test_junit_clean_run_has_one_passing_testcase(tmp_path: Path) -> None:
    suite = junit(GateReport(), tmp_path)
    [case] = suite.findall("testcase")
    assert case.get("name") == "no completion race"
    assert case.find("failure") is None and case.find("error") is None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("1", "0", "0")


def test_junit_lost_events_is_an_error_unless_allowed(tmp_path: Path) -> None:
    report = GateReport()
    report.set_losses(5, {})
    report.set_unverified({"vmm[9]": 1})
    suite = junit(report, tmp_path)
    assert (suite.get("tests"), suite.get("errors")) == ("2", "1")
    lost = next(c for c in suite.findall("testcase") if c.get("name") == "events lost")
    assert lost.find("error") is not None
    allowed = GateReport(allow_lost=True)
    allowed.set_losses(5, {})
    allowed.set_unverified({"vmm[9]": 1})
    assert junit(allowed, tmp_path).get("errors") == "0"


def test_junit_survives_control_characters(tmp_path: Path) -> None:
    report = GateReport()
    report.add_violation(violation(), c_stack("bad\x01name"))
    suite = junit(report, tmp_path)
    assert suite.get("failures") == "1"


def test_junit_findings_below_the_threshold_pass(tmp_path: Path) -> None:
    report = GateReport(fail_on="critical")
    report.add_violation(violation(), c_stack("f"))
    suite = junit(report, tmp_path)
    assert (suite.get("tests"), suite.get("failures")) == ("1", "0")


# ---- verdicts and exit status -------------------------------------------------------------------

@pytest.mark.parametrize(("fail_on", "severities", "failed"), [
    ("warning", ["warning"], True),
    ("warning", ["info"], False),
    ("error", ["warning"], False),
    ("error", ["error"], True),
    ("critical", ["error", "warning"], False),
    ("critical", ["critical"], True),
])
def test_verdict_by_severity(fail_on: str, severities: list[str], failed: bool) -> None:
    report = GateReport()
    for n, severity in enumerate(severities):
        report.add_violation(violation(severity=severity), c_stack(f"site{n}"))
    verdict = report.verdict(fail_on, allow_lost=False)
    assert verdict.failed is failed and not verdict.inconclusive


def test_verdict_snapshot_fails_only_on_snapshots_and_critical_restores() -> None:
    saves = GateReport()
    saves.add_violation(violation(severity="critical"), c_stack("f"))
    saves.add_violation(restore(), c_stack("g"))  # critical restore
    assert saves.verdict("snapshot", False).failed
    minor = GateReport()
    minor.add_violation(violation(severity="critical"), c_stack("f"))
    minor.add_violation(violation(kind="restore", ioctl="KVM_SET_REGS", severity="error"),
                        c_stack("g"))
    assert not minor.verdict("snapshot", False).failed
    snap = GateReport()
    snap.add_snapshot(snapshot(severity="warning"))
    assert snap.verdict("snapshot", False).failed


def test_verdict_rejects_unknown_fail_on() -> None:
    with pytest.raises(ValueError, match="fail_on"):
        GateReport().verdict("info", False)
    with pytest.raises(ValueError, match="fail_on"):
        GateReport(fail_on="bogus")


def test_lost_events_that_carried_no_finding_keep_a_clean_verdict() -> None:
    """The kernel judges every window: a lost lifecycle event neither makes nor hides one."""
    report = GateReport()
    report.set_losses(40, {})
    verdict = report.verdict()
    assert not verdict.inconclusive and verdict.status == "pass"
    assert "40 events lost (none of them a finding)" in report.render_text()


@pytest.mark.parametrize("losses", [(3, {}, {"vmm[3]": 1}), (0, {"vcpus": 1}, {})])
def test_unverified_or_maps_full_make_a_clean_run_inconclusive_unless_allowed(
        losses: tuple[int, dict[str, int], dict[str, int]]) -> None:
    report = GateReport()
    report.set_losses(losses[0], losses[1])
    report.set_unverified(losses[2])
    verdict = report.verdict("warning", allow_lost=False)
    assert verdict.inconclusive and not verdict.failed and "cannot claim" in verdict.reason
    assert report.to_json()["verdict"] == "inconclusive"
    allowed = report.verdict("warning", allow_lost=True)
    assert not allowed.inconclusive and "allowed by --allow-lost" in allowed.reason


def test_lost_events_with_findings_still_fail() -> None:
    report = GateReport()
    report.add_violation(violation(), c_stack("f"))
    report.set_losses(3, {})
    report.set_unverified({"vmm[1]": 2})
    verdict = report.verdict()
    assert verdict.failed and verdict.inconclusive and verdict.status == "fail"
    assert "may be incomplete" in report.render_text()


PASS = GateVerdict(failed=False, inconclusive=False, reason="")
FAIL = GateVerdict(failed=True, inconclusive=False, reason="")
LOST = GateVerdict(failed=False, inconclusive=True, reason="")


@pytest.mark.parametrize(("command_status", "verdict", "expected"), [
    (0, PASS, 0),
    (3, PASS, 3),
    (-9, PASS, 137),  # subprocess's -S for a signal
    (137, PASS, 137),
    (0, FAIL, DEFAULT_ERROR_EXITCODE),
    (3, FAIL, DEFAULT_ERROR_EXITCODE),
    (0, LOST, INCONCLUSIVE_EXITCODE),
    (3, LOST, 3),
    (-15, LOST, 143),
])
def test_exit_status(command_status: int, verdict: GateVerdict, expected: int) -> None:
    assert exit_status(command_status, verdict) == expected


def test_exit_status_uses_the_given_error_exitcode() -> None:
    assert exit_status(0, FAIL, error_exitcode=23) == 23
    assert exit_status(0, PASS, error_exitcode=23) == 0


def test_a_held_peek_says_what_judged_it() -> None:
    from dataclasses import replace

    report = GateReport()
    report.add_violation(replace(violation(), judged_on="second_vcpu"), c_stack("f"))
    assert ", detected at ioctl entry, judged on second vcpu" in report.render_text()
