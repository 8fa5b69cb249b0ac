"""``watch -- CMD``: the daemon's pipeline as a CI gate over one command's process tree.

The same probes, policy and tracker as ``run`` (:class:`tracer.daemon.Daemon` and its loop),
built with the in-kernel process filter (``ProbeConfig.watch``): the probes follow only CMD and
the processes forked from it, so other users' VMs on the host are neither reported nor decoded.
CMD starts once the probes are attached, keeps its stdin/stdout/stderr, and gets the signals
sent to us. When it exits the ring is drained, the findings are grouped into a sanitizer-style
report on stderr (tracer.gate), and the exit status says "race found" apart from "tests failed".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

from tracer import __version__
from tracer.alerts import AlertSink, SnapshotAlert, ViolationAlert
from tracer.daemon import Daemon, DaemonOptions
from tracer.gate import GateReport, exit_status
from tracer.policy import describe
from tracer.probes import bcc_version

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
INIT_PID_NS_INO = 0xEFFFFFFC  # PROC_PID_INIT_INO (include/linux/proc_ns.h): the host's ns
WATCH_POLL_MS = 100  # how soon CMD's exit is noticed (SIGCHLD also wakes the poll)
EXIT_CANNOT_RUN = 127  # like a shell: CMD could not be started
# Reports that went without a stack (kernel walk), or without the registers and stack bytes the
# CFI unwinder needs (then the kernel walk is what they have).
STACK_COUNTERS = ("stack_map_full", "stack_failed", "user_stack_failed", "user_stack_dropped")


@dataclass(frozen=True)
class WatchOptions:
    command: list[str]
    fail_on: str = "warning"  # a severity, or "snapshot"
    error_exitcode: int = 66
    allow_lost: bool = False
    junit: Path | None = None
    json: Path | None = None
    # Alerts also to the log (--log-file); without one only notices reach it (stderr, errors
    # only), so the report is the one account of the findings there.
    log_alerts: bool = True


class GateSink:
    """Findings go to the gate's report; every line also to ``log`` (``--log-file``), or only
    the notices when ``log_alerts`` is false."""

    def __init__(self, report: GateReport, log: AlertSink | None = None,
                 log_alerts: bool = True) -> None:
        self.report = report
        self.log = log
        self.alert_log = log if log_alerts else None

    def violation(self, alert: ViolationAlert) -> None:
        self.report.add_violation(alert, alert.user_stack)
        if self.alert_log is not None:
            self.alert_log.violation(alert)

    def sanctioned(self, alert: ViolationAlert) -> None:
        self.report.count_sanctioned(alert.rule)
        if self.alert_log is not None:
            self.alert_log.sanctioned(alert)

    def snapshot(self, alert: SnapshotAlert) -> None:
        self.report.add_snapshot(alert)
        if self.alert_log is not None:
            self.alert_log.snapshot(alert)

    def inspection(self, alert: ViolationAlert) -> None:
        self.report.count_inspection()
        if self.alert_log is not None:
            self.alert_log.inspection(alert)

    def notice(self, event: str, level: str, **fields: Any) -> None:
        if self.log is not None:
            self.log.notice(event, level, **fields)


def pid_namespace_error(ns_path: Path = Path("/proc/self/ns/pid")) -> str | None:
    """Why CMD cannot be followed from here, or None. The probes know processes by their pids
    in the host's PID namespace; from a namespace of our own (a container without
    ``--pid=host``) the pid we put in the watched tree is not ours there, nothing would be
    followed, and every run would pass."""
    try:
        inode = os.stat(ns_path).st_ino
    except OSError:
        return None  # no /proc/self/ns (no /proc): nothing to tell
    if inode == INIT_PID_NS_INO:
        return None
    return ("watch: this process runs in a PID namespace of its own (a container without "
            "--pid=host?), and the probes know processes only by their host pids: CMD could "
            "not be followed; run it in the host's PID namespace (docker/podman run "
            "--pid=host, Kubernetes hostPID: true)")


def _in_terminal_foreground() -> bool:
    """Whether our process group owns the terminal: a Ctrl-C there already reached CMD (same
    group), so forwarding SIGINT again would deliver it twice."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError):
        return False


def watch(options: DaemonOptions, gate: WatchOptions, log: AlertSink | None = None) -> int:
    started = time.monotonic()
    started_unix = time.time()
    report = GateReport(gate.fail_on, gate.allow_lost)
    child: subprocess.Popen[bytes] | None = None
    timings: dict[str, float] = {}
    stacks_missed: dict[str, int] = {}
    received: list[int] = []

    def _forward(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        if child is not None and child.poll() is None:
            if signum == signal.SIGINT and _in_terminal_foreground():
                return  # the terminal sent it to CMD too
            child.send_signal(signum)

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, _forward)
    signal.signal(signal.SIGCHLD, lambda _s, _f: None)  # wakes the ring poll at CMD's exit
    probe_config = replace(options.probe_config, watch=True, guest_exits=False)
    daemon = Daemon(replace(options, probe_config=probe_config, state_dir=None),
                    sink=GateSink(report, log, gate.log_alerts))
    try:
        daemon.start(adopt=False)
        attached = time.monotonic()
        if received:  # stopped while the probes compiled: CMD never ran
            return 128 + received[0]
        # Our own pid is watched while we fork, so the fork hook puts CMD in the tree before
        # it runs a single instruction; nothing else forks from us meanwhile.
        daemon.probes.watch(os.getpid(), True)
        try:
            child = subprocess.Popen(gate.command)
        except OSError as err:
            print(f"kvm-completion-tracer: error: cannot run {gate.command[0]!r}: "
                  f"{err.strerror}", file=sys.stderr)
            return EXIT_CANNOT_RUN
        finally:
            daemon.probes.watch(os.getpid(), False)
        spawned = time.monotonic()
        daemon.poll_cap_ms = WATCH_POLL_MS
        running = child
        daemon.run_forever(until=lambda: running.poll() is not None)
        status = child.wait()
        with daemon.lock:
            daemon.tracker.close_all("watch_end")
        counters = daemon.probes.counters()
        # A full stack map costs a stack, not an event: the finding is still reported (its
        # call site unknown), so it does not make the run inconclusive; --max-vcpus, the
        # remedy for the other maps, would not help it either.
        maps_full = {k: v for k, v in counters.items()
                     if k.endswith("_map_full") and v and k not in STACK_COUNTERS}
        stacks_missed = {k: int(counters.get(k, 0)) for k in STACK_COUNTERS}
        report.set_losses(counters["events_lost"], maps_full,
                          ringbuf_pages=probe_config.ringbuf_pages,
                          max_vcpus=probe_config.max_vcpus)
        with daemon.lock:
            totals = daemon.summary()
        report.set_exit_totals(int(str(totals["userspace_exits"])),
                               int(str(totals["pending_exits"])))
        report.set_meta(
            tool_version=__version__, kernel_release=os.uname().release,
            bcc_version=bcc_version(), command=list(gate.command),
            policy=describe(options.policy), started_unix=started_unix,
            finished_unix=time.time(), exit_status_of_command=status)
        timings = {"startup_s": round(attached - started, 3),
                   "spawn_s": round(spawned - attached, 3),
                   "command_s": round(time.monotonic() - spawned, 3)}
    finally:
        daemon.close()
    verdict = report.verdict()
    sys.stderr.write(report.render_text(color=sys.stderr.isatty()))
    sys.stderr.flush()
    if gate.junit is not None:
        report.write_junit(gate.junit)
    if gate.json is not None:
        result = report.to_json()
        result["timings"] = timings
        result["stacks_missed"] = stacks_missed
        gate.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return exit_status(status, verdict, gate.error_exitcode)
