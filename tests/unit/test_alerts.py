"""The log sink: the JSON-lines contract operators and log pipelines parse."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

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


# ---- every renderer renders every alert kind --------------------------------------------------

STACK = {"frames": [
    {"address": 0x7F12_0000_001B, "module": "/usr/lib/x86_64-linux-gnu/libc.so.6",
     "build_id": "ab12", "file_offset": 0x1B, "function": "__GI___ioctl",
     "function_offset": 0x1B, "inferred": False},
    {"address": 0x5555_0000_1234, "module": "/opt/vmm/buggy_vmm", "build_id": "cd34",
     "file_offset": 0x1234, "function": "save_vcpu_state", "function_offset": 0x24,
     "inferred": False}],
    "partial": False, "why_partial": None}
SNAPSHOT = SnapshotAlert(pid=42, vm="web-1", vmm="qemu", vcpu_id=0, exit_reason="KVM_EXIT_IO",
                         access={"port": "0x70"}, ioctls=["KVM_GET_REGS", "KVM_GET_SREGS"],
                         tids=[43], window=7, pending_ns=9, closed_by="reentry")


def _emit_every_kind(sink: LogSink) -> None:
    from dataclasses import replace

    sink.violation(replace(VIOLATION, user_stack=STACK))
    sink.violation(VIOLATION)  # without a stack
    sink.sanctioned(replace(VIOLATION, user_stack=STACK, sanctioned=True))
    sink.snapshot(SNAPSHOT)
    sink.notice("ready", "info", probes=["raw:kvm_userspace_exit"])


KINDS = ["completion_violation", "completion_violation", "completion_sanctioned",
         "completion_snapshot", "ready"]


@pytest.mark.parametrize("colors", [True, False], ids=["colour", "plain"])
def test_console_renders_every_alert_kind_with_its_stack(colors: bool) -> None:
    out: io.StringIO = Tty() if colors else io.StringIO()
    configure_logging("console", "debug", out)
    _emit_every_kind(LogSink())
    text = out.getvalue()
    assert ("\x1b[" in text) == colors
    assert "internal_error" not in text and "render_error" not in text
    # One rendered line per event, in order, the stack's frames under the violation's line.
    heads = [line for line in text.splitlines() if "completion_" in line or "ready" in line]
    assert [next(k for k in dict.fromkeys(KINDS) if k in line) for line in heads] == KINDS
    first = text.split("completion_violation", 2)[1]
    assert "#0 0x7f120000001b in __GI___ioctl" in first
    assert "#1 0x555500001234 in save_vcpu_state+0x24 (buggy_vmm+0x1234)" in first
    assert "KVM_GET_SREGS" in first and "KVM_EXIT_MMIO" in first


@pytest.mark.parametrize("to_file", [False, True], ids=["stdout", "log-file"])
def test_json_renders_every_alert_kind_with_its_stack(to_file: bool, tmp_path: Path) -> None:
    path = tmp_path / "watch.log"
    with path.open("a", encoding="utf-8") if to_file else io.StringIO() as out:
        configure_logging("json", "debug", out)
        _emit_every_kind(LogSink())
        text = out.getvalue() if isinstance(out, io.StringIO) else ""
    if to_file:
        text = path.read_text()
    events = [json.loads(line) for line in text.splitlines()]
    assert [e["event"] for e in events] == KINDS
    assert events[0]["user_stack"] == STACK
    assert "user_stack" not in events[1]


def test_no_alert_field_is_a_key_a_renderer_reserves() -> None:
    from dataclasses import fields

    from tracer.alerts import RENDERER_RESERVED_KEYS

    for alert in (ViolationAlert, SnapshotAlert):
        names = {f.name for f in fields(alert)}
        assert not names & RENDERER_RESERVED_KEYS, (alert.__name__, names & RENDERER_RESERVED_KEYS)


def test_an_event_the_console_cannot_render_is_printed_as_json_not_lost() -> None:
    out = io.StringIO()
    configure_logging("console", "debug", out)
    # structlog's console renderer takes ``exception`` as traceback text: a dict breaks it.
    LogSink().notice("odd", "warning", exception={"not": "text"}, pid=7)
    [line] = out.getvalue().splitlines()
    event = json.loads(line)
    assert event["event"] == "odd" and event["pid"] == 7 and "render_error" in event
