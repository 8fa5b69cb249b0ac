"""``selftest``: run the built-in VMM's scenarios under the live probes and compare verdicts.

Each scenario runs as its own process (``python -m tracer.vmm``), so the probes see a real VMM
with its own pid and threads; its report says which ioctls went in mid-completion. The alerts
the daemon raised for that pid must match exactly: same thread, vCPU, fd, exit, ioctl, kind and
access, nothing more and nothing less.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from tracer.alerts import MemorySink
from tracer.daemon import Daemon, DaemonOptions
from tracer.metrics import MetricsConfigError, start_server
from tracer.policy import build_policy
from tracer.probes import ProbeConfig
from tracer.vmm.report import ExpectedViolation, ScenarioReport

# Scenarios that need no extra process around them, in the order selftest runs them.
SELFTEST_SCENARIOS = (
    "correct-io", "correct-mmio", "correct-msr", "buggy-io-out", "buggy-io-in",
    "buggy-mmio-write", "buggy-mmio-read", "buggy-rdmsr", "buggy-wrmsr", "buggy-other-thread",
    "save-while-running", "save-while-running-kicked",
    "restore-mmio", "restore-pio", "restore-pio-in", "restore-pio-rep-ins",
    "restore-pio-rep-outs", "hlt", "eintr", "port-7e", "port-7e-quirk-disabled",
    "dup-fd", "dup2-fd", "dup3-fd", "fd-reuse", "multi", "process-exit",
    "peek-io", "peek-mmio", "peek-then-snapshot", "peek-then-restore", "peek-then-close",
    "peek-two-vcpus", "peek-then-exit", "peek-events",
)
SETTLE_S = 0.3  # after the VMM exits: ring buffer drained, idle windows flushed


AlertKey = tuple[int, int, int, str, str, str, tuple[tuple[str, Any], ...]]


def _access_of_expected(e: ExpectedViolation) -> tuple[tuple[str, Any], ...]:
    if e.port is not None:
        return (("port", e.port),)
    if e.gpa is not None:
        return (("gpa", e.gpa),)
    if e.msr_index is not None:
        return (("msr", e.msr_index),)
    return ()


def _access_of_alert(access: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    for key in ("port", "gpa", "msr"):
        if key in access:
            return ((key, int(str(access[key]), 16)),)
    return ()


def expected_key(e: ExpectedViolation) -> AlertKey:
    return (e.tid, e.vcpu_id, e.vcpu_fd, e.exit_reason, e.ioctl, e.kind,
            _access_of_expected(e))


def alert_key(a: Mapping[str, Any]) -> AlertKey:
    """From a ViolationAlert as a dict, or a ``completion_violation`` JSON log line."""
    return (int(a["tid"]), int(a["vcpu_id"]), int(a["vcpu_fd"]), str(a["exit_reason"]),
            str(a["ioctl"]), str(a["kind"]), _access_of_alert(a.get("access") or {}))


def expected_snapshots(report: ScenarioReport) -> int:
    """Windows in which the VMM read two or more kinds of state (save ioctls), unsanctioned."""
    per_window: dict[tuple[int, int, int], set[str]] = {}
    for e in report.violations:
        if e.kind == "save":
            per_window.setdefault((e.vm_fd, e.vcpu_id, e.pending_since_ns), set()).add(e.ioctl)
    return sum(1 for kinds in per_window.values() if len(kinds) >= 2)


def compare(report: ScenarioReport, violations: Iterable[Mapping[str, Any]],
            sanctioned: Iterable[Mapping[str, Any]], snapshots: int,
            inspections: Mapping[tuple[str, str], int] | None = None) -> list[str]:
    """Every difference between what the VMM did and what the tracer said, as text.
    ``inspections``: the kernel's count by (ioctl, exit reason): it keeps no more of them."""
    problems = []
    want_i = Counter((e.ioctl, e.exit_reason) for e in report.inspections)
    got_i = Counter(inspections or {})
    for ikey in sorted((want_i - got_i).elements()):
        problems.append(f"missed inspection {ikey}")
    for ikey in sorted((got_i - want_i).elements()):
        problems.append(f"unexpected inspection {ikey}")
    want, got = Counter(map(expected_key, report.violations)), Counter(map(alert_key, violations))
    for key in sorted((want - got).elements()):
        problems.append(f"missed violation {key}")
    for key in sorted((got - want).elements()):
        problems.append(f"unexpected violation {key}")
    want_s = Counter((expected_key(e), str(e.rule)) for e in report.sanctioned)
    got_s = Counter((alert_key(a), str(a["rule"])) for a in sanctioned)
    for rule_key in sorted((want_s - got_s).elements()):
        problems.append(f"missed sanctioned case {rule_key}")
    for rule_key in sorted((got_s - want_s).elements()):
        problems.append(f"unexpected sanctioned case {rule_key}")
    if snapshots != expected_snapshots(report):
        problems.append(f"{snapshots} snapshot alerts, expected {expected_snapshots(report)}")
    return problems


def alerts_for(sink: MemorySink, pid: int) -> tuple[list[dict[str, Any]],
                                                  list[dict[str, Any]], int,
                                                  Counter[tuple[str, str]]]:
    """(violations, sanctioned, snapshot count, inspections) of one process, in compare()'s
    shape; its inspections from the notice the tracker gives at its exit."""
    inspected: Counter[tuple[str, str]] = Counter()
    for event, fields in sink.notices:
        if event == "inspections" and fields.get("pid") == pid:
            for row in fields["counts"]:
                inspected[(str(row["ioctl"]), str(row["exit_reason"]))] += int(row["count"])
    return ([asdict(a) for a in sink.violations if a.pid == pid],
            [asdict(a) for a in sink.sanctions if a.pid == pid],
            sum(1 for s in sink.snapshots if s.pid == pid), inspected)


def run_vmm(scenario: str, iterations: int, daemon: Daemon | None = None,
            extra: Iterable[str] = (), timeout_s: float = 60.0) -> ScenarioReport:
    """Run one scenario in a child process; poll ``daemon`` meanwhile so its ring stays empty."""
    with tempfile.TemporaryDirectory(prefix="kct-selftest-") as tmp:
        report_path = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "tracer.vmm", scenario, "--iterations", str(iterations),
               "--report", str(report_path), *extra]
        # Probes built with the process filter (ProbeConfig.watch) follow only the processes
        # in their watched map: our pid is there while we fork, so the child is from its start.
        watching = daemon is not None and daemon.probes.config.watch
        if watching and daemon is not None:
            daemon.probes.watch(os.getpid(), True)
        try:
            child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        finally:
            if watching and daemon is not None:
                daemon.probes.watch(os.getpid(), False)
        deadline = time.monotonic() + timeout_s
        while child.poll() is None:
            if time.monotonic() > deadline:
                child.kill()
                raise RuntimeError(f"scenario {scenario} did not finish in {timeout_s:.0f} s")
            if daemon is not None:
                daemon.poll_once(20)
            else:
                time.sleep(0.02)
        stderr = child.stderr.read() if child.stderr else ""
        if child.returncode != 0:
            raise RuntimeError(f"scenario {scenario} failed (exit {child.returncode}): "
                               f"{stderr.strip().splitlines()[-1] if stderr.strip() else ''}")
        report = ScenarioReport.from_json(report_path.read_text())
    if daemon is not None:
        settle = time.monotonic() + max(SETTLE_S, daemon.options.snapshot_idle_s + 0.1)
        while time.monotonic() < settle:
            daemon.poll_once(20)
    return report


def _say(line: str) -> None:
    """One progress line, written out at once: on a pipe (a CI log, ``| tee``, a test reading
    the lines while the selftest runs) stdout is block-buffered, and the "serving metrics" line
    would arrive only when the selftest ends."""
    print(line, flush=True)


def _serve_metrics(addr: str | None) -> tuple[CollectorRegistry | None, Callable[[], None]]:
    """The selftest's exporter (to watch the counters rise with curl); a taken port costs the
    metrics, not the selftest."""
    if addr is None:
        return None, lambda: None
    registry = CollectorRegistry()
    try:
        stop = start_server(addr, registry)
    except MetricsConfigError as err:
        _say(f"selftest: no metrics ({err})")
        return None, lambda: None
    _say(f"selftest: metrics on http://{addr}/metrics")
    return registry, stop


def run_selftest(iterations: int, only: Iterable[str] = (), metrics_addr: str | None = None,
                 linger_s: float = 0.0) -> int:
    names = list(only) or list(SELFTEST_SCENARIOS)
    unknown = [n for n in names if n not in SELFTEST_SCENARIOS]
    if unknown:
        print(f"unknown scenario {unknown[0]!r}; known: {', '.join(SELFTEST_SCENARIOS)}",
              file=sys.stderr)
        return 2
    sink = MemorySink()
    registry, stop_metrics = _serve_metrics(metrics_addr)
    try:
        # Only its own scenarios' processes (the in-kernel filter `watch` uses): the other VMs
        # of the host are neither judged nor sent, so a busy host cannot fill the ring.
        daemon = Daemon(DaemonOptions(policy=build_policy(), snapshot_idle_s=0.2,
                                      probe_config=ProbeConfig(watch=True, guest_exits=False)),
                        sink=sink, registry=registry)
    except BaseException:
        stop_metrics()
        raise
    passed = failed = lost = 0
    try:
        daemon.start(adopt=False)
        for name in names:
            try:
                report = run_vmm(name, iterations, daemon)
            except RuntimeError as err:
                _say(f"FAIL {name}: {err}")
                failed += 1
                continue
            problems = compare(report, *alerts_for(sink, report.pid))
            _, _, snaps, _ = alerts_for(sink, report.pid)
            summary = (f"{len(report.violations)} violations, {len(report.sanctioned)} "
                       f"sanctioned, {len(report.inspections)} inspections, {snaps} "
                       f"snapshots, {sum(report.exits.values())} exits")
            if problems:
                failed += 1
                _say(f"FAIL {name}: {summary}")
                for problem in problems[:10]:
                    _say(f"     {problem}")
            else:
                passed += 1
                _say(f"ok   {name}: {summary}")
        lost = daemon.probes.counters()["events_lost"]
        failed += 1 if lost else 0
        if linger_s > 0 and registry is not None:
            _say(f"selftest: serving metrics for {linger_s:g} s more")
            deadline = time.monotonic() + linger_s
            while time.monotonic() < deadline:
                daemon.poll_once(100)
    finally:
        daemon.close()
        stop_metrics()
    print(f"selftest: {passed} passed, {failed} failed" + (f", {lost} events lost" if lost
                                                            else ""))
    return 0 if failed == 0 else 1
