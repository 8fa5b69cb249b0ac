"""The log sink: the JSON-lines contract operators and log pipelines parse."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
import structlog

from tracer.alerts import LogSink, SnapshotAlert, ViolationAlert, configure_logging

VIOLATION = ViolationAlert(
    pid=42, tid=43, comm="qemu-system-x86", vm="web-1", vmm="qemu", vcpu_id=0, vcpu_fd=12,
    exit_reason="KVM_EXIT_MMIO", access={"gpa": "0xfed00000", "length": 4, "direction": "write"},
    ioctl="KVM_GET_SREGS", kind="save", pending_ns=1234, rule="save-mid-completion",
    severity="error", reason="why", detected_at="ioctl_entry", window=7)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_violation_is_one_json_line_with_event_level_timestamp_first() -> None:
    out = io.StringIO()
    configure_logging("json", "info", out)
    LogSink().violation(VIOLATION)
    [line] = lines(out)
    assert list(line)[:3] == ["event", "level", "timestamp"]
    assert line["event"] == "completion_violation" and line["level"] == "error"
    assert str(line["timestamp"]).endswith("Z")
    for key in ("pid", "tid", "comm", "vm", "vcpu_id", "vcpu_fd", "exit_reason", "access",
                "ioctl", "kind", "pending_ns", "rule", "severity", "reason", "detected_at",
                "window"):
        assert key in line, key
    assert "sanctioned" not in line


@pytest.mark.parametrize(("severity", "level"), [
    ("info", "warning"), ("warning", "warning"), ("error", "error"), ("critical", "critical")])
def test_violation_level_follows_severity_but_never_below_warning(severity: str,
                                                                   level: str) -> None:
    from dataclasses import replace

    out = io.StringIO()
    configure_logging("json", "debug", out)
    LogSink().violation(replace(VIOLATION, severity=severity))
    assert lines(out)[0]["level"] == level


def test_sanctioned_cases_are_debug_and_filtered_at_info() -> None:
    out = io.StringIO()
    configure_logging("json", "info", out)
    sink = LogSink()
    sink.sanctioned(VIOLATION)
    sink.notice("vcpu_created", "debug", pid=1)
    assert out.getvalue() == ""
    configure_logging("json", "debug", out)
    sink.sanctioned(VIOLATION)
    assert [e["event"] for e in lines(out)] == ["completion_sanctioned"]


def test_warning_level_keeps_violations_and_snapshots_only() -> None:
    out = io.StringIO()
    configure_logging("json", "warning", out)
    sink = LogSink()
    sink.notice("ready", "info", probes=[])
    sink.violation(VIOLATION)
    sink.snapshot(SnapshotAlert(pid=42, vm="web-1", vmm="qemu", vcpu_id=0,
                                exit_reason="KVM_EXIT_IO", access={}, ioctls=["A", "B"],
                                tids=[43], window=7, pending_ns=9, closed_by="reentry"))
    assert [(e["event"], e["level"]) for e in lines(out)] == [
        ("completion_violation", "error"), ("completion_snapshot", "critical")]


def test_auto_format_is_console_on_a_tty_and_json_otherwise() -> None:
    tty = Tty()
    configure_logging("auto", "info", tty)
    LogSink().violation(VIOLATION)
    text = tty.getvalue()
    assert "completion_violation" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])
    pipe = io.StringIO()
    configure_logging("auto", "info", pipe)
    LogSink().violation(VIOLATION)
    assert lines(pipe)[0]["event"] == "completion_violation"


def test_json_is_forced_even_on_a_tty() -> None:
    tty = Tty()
    configure_logging("json", "info", tty)
    LogSink().notice("ready", "info", probes=["raw:kvm_userspace_exit"])
    assert json.loads(tty.getvalue())["probes"] == ["raw:kvm_userspace_exit"]
