"""The one-line reasons tracer.probes gives for a failed load (bcc's errors arrive as a bare
Exception plus what clang/libbcc printed to stderr)."""

from __future__ import annotations

import pytest

from tracer import probes


@pytest.fixture(autouse=True)
def as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probes.os, "geteuid", lambda: 0)


def test_eperm_from_bpf_names_privileges_and_seccomp() -> None:
    # What a SystemCallFilter= without `bpf` looks like: the errno is only in bcc's stderr.
    got = probes._explain_load_failure(
        Exception("Failed to load BPF program"),
        "could not open bpf map: guest_entries, error: Operation not permitted\n")
    assert got.startswith("the kernel refused the BPF programs (could not open bpf map")
    assert "CAP_BPF" in got and "SystemCallFilter=" in got and "headers" not in got


def test_eperm_from_perf_event_open_is_not_blamed_on_tracefs() -> None:
    got = probes._explain_load_failure(
        Exception("Failed to attach BPF program b'x' to tracepoint b'kvm:kvm_entry'"),
        "perf_event_open(/sys/kernel/tracing/events/kvm/kvm_entry/id): Operation not permitted\n")
    assert "kernel refused" in got and "mount tracefs" not in got


def test_a_missing_tracepoint_points_at_tracefs() -> None:
    got = probes._explain_load_failure(
        Exception("Failed to attach BPF program b'x' to tracepoint b'kvm:kvm_entry'"), "")
    assert "mount -t tracefs" in got


def test_a_compile_error_points_at_the_headers() -> None:
    got = probes._explain_load_failure(
        Exception("Failed to compile BPF module <text>"),
        "<built-in>:1:10: fatal error: './include/linux/kconfig.h' file not found\n")
    assert "kernel headers must be installed" in got and "kconfig.h" in got


def test_not_root_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probes.os, "geteuid", lambda: 1000)
    assert "needs root" in probes._explain_load_failure(Exception("anything"), "")


def test_an_unreadable_header_is_a_header_problem() -> None:
    got = probes._explain_load_failure(
        Exception("Failed to compile BPF module <text>"),
        "/lib/modules/6.1/build/include/linux/types.h:1:1: fatal error: cannot open file: "
        "Permission denied\n")
    assert "kernel headers must be installed" in got
