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
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

from tracer import __version__
from tracer.alerts import AlertSink, SnapshotAlert, ViolationAlert
from tracer.counters import STACK_MISS_REASONS, maps_full
from tracer.daemon import Daemon, DaemonOptions
from tracer.gate import GateReport, exit_status
from tracer.gate_ci import CiOptions, account, write_outputs
from tracer.policy import describe
from tracer.probes import bcc_version
from tracer.suppressions import Ledger

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
INIT_PID_NS_INO = 0xEFFFFFFC  # PROC_PID_INIT_INO (include/linux/proc_ns.h): the host's ns
WATCH_POLL_MS = 100  # how soon CMD's exit is noticed (SIGCHLD also wakes the poll)
EXIT_CANNOT_RUN = 127  # like a shell: CMD could not be started
# The gate's ring buffer unless --ringbuf-pages says otherwise: 64 MiB of pages (4 KiB), the
# kernel's memory for as long as the gate runs. A correct VMM sends no event per exit (the
# kernel judges its peeks); this is for a buggy one's flood of findings, and the lifecycle
# events of a test suite's thousands of short VMM processes, while every core is busy.
WATCH_RINGBUF_PAGES = 16384
# The reader thread's nice value once CMD runs (CMD keeps ours: it is forked before): on a
# runner whose cores a parallel test suite saturates, the default weight gets the reader a
# share of a core too small to drain a flood of findings.
READER_NICE = -10
# Reports that went without a stack (kernel walk), or without the registers and stack bytes the
# CFI unwinder needs (then the kernel walk is what they have).


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
    # suppressions, --gen-suppressions, --sarif, --annotate (tracer.gate_ci)
    ci: CiOptions = field(default_factory=CiOptions)
    # --ringbuf-pages as given on the command line (None: the larger of the configured size
    # and WATCH_RINGBUF_PAGES)
    ringbuf_pages: int | None = None
    reader_nice: int = READER_NICE  # --reader-nice; 0 leaves the reader's priority alone


class GateSink:
    """Findings go to the gate's report; every line also to ``log`` (``--log-file``), or only
    the notices when ``log_alerts`` is false."""

    def __init__(self, report: GateReport, log: AlertSink | None = None,
                 log_alerts: bool = True, suppressions: Ledger | None = None) -> None:
        self.report = report
        self.log = log
        self.alert_log = log if log_alerts else None
        self.suppressions = suppressions  # a suppressed occurrence is counted, not reported

    def violation(self, alert: ViolationAlert) -> None:
        if self.suppressions is None or not self.suppressions.violation(alert):
            self.report.add_violation(alert, alert.user_stack)
        if self.alert_log is not None:
            self.alert_log.violation(alert)

    def sanctioned(self, alert: ViolationAlert) -> None:
        self.report.count_sanctioned(alert.rule)
        if self.alert_log is not None:
            self.alert_log.sanctioned(alert)

    def snapshot(self, alert: SnapshotAlert) -> None:
        if self.suppressions is None or not self.suppressions.snapshot(alert):
            self.report.add_snapshot(alert)
        if self.alert_log is not None:
            self.alert_log.snapshot(alert)

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


def raise_reader_priority(nice: int = READER_NICE) -> int | None:
    """This thread (the ring's reader) at ``nice`` (per thread on Linux: setpriority on its
    tid). Returns the nice value it runs at, None when not permitted (no CAP_SYS_NICE)."""
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError:
        return None
    return os.getpriority(os.PRIO_PROCESS, tid)


def watch(options: DaemonOptions, gate: WatchOptions, log: AlertSink | None = None) -> int:
    started = time.monotonic()
    started_unix = time.time()
    report = GateReport(gate.fail_on, gate.allow_lost)
    suppressions = gate.ci.ledger()
    child: subprocess.Popen[bytes] | None = None
    timings: dict[str, float] = {}
    stacks_missed: dict[str, int] = {}
    received: list[int] = []
    events_handled = 0

    def _forward(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        if child is not None and child.poll() is None:
            if signum == signal.SIGINT and _in_terminal_foreground():
                return  # the terminal sent it to CMD too
            child.send_signal(signum)

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, _forward)
    signal.signal(signal.SIGCHLD, lambda _s, _f: None)  # wakes the ring poll at CMD's exit
    pages = (gate.ringbuf_pages if gate.ringbuf_pages is not None
             else max(options.probe_config.ringbuf_pages, WATCH_RINGBUF_PAGES))
    probe_config = replace(options.probe_config, watch=True, guest_exits=False,
                           ringbuf_pages=pages)
    daemon = Daemon(replace(options, probe_config=probe_config, state_dir=None),
                    sink=GateSink(report, log, gate.log_alerts, suppressions))
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
        reader_nice = raise_reader_priority(gate.reader_nice) if gate.reader_nice else None
        daemon.poll_cap_ms = WATCH_POLL_MS
        running = child
        daemon.run_forever(until=lambda: running.poll() is not None)
        run_end = time.monotonic()  # CMD gone and the ring drained (CLOCK_MONOTONIC)
        status = child.wait()
        with daemon.lock:
            daemon.tracker.close_all("watch_end")
            report.set_inspections(sum(daemon.tracker.inspection_counts().values()))
            report.set_unverified(daemon.tracker.unverified())
        counters = daemon.probes.counters()
        # A full stack map costs a stack, not an event: the finding is still reported (its
        # call site unknown), so it does not make the run inconclusive; --max-vcpus, the
        # remedy for the other maps, would not help it either.
        full = {k: v for k, v in maps_full(counters).items() if v}
        stacks_missed = {k: int(counters.get(k, 0)) for k in STACK_MISS_REASONS}
        report.set_stacks_missed(stacks_missed, probe_config.stack_tokens)
        report.set_losses(counters["events_lost"], full,
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
        report.reader_nice = reader_nice
        events_handled = daemon.events_handled
        timings = {"startup_s": round(attached - started, 3),
                   "spawn_s": round(spawned - attached, 3),
                   "command_s": round(time.monotonic() - spawned, 3),
                   "run_end_monotonic": run_end}
    finally:
        daemon.close()
    account(report, suppressions)
    verdict = report.verdict()
    sys.stderr.write(report.render_text(color=sys.stderr.isatty()))
    sys.stderr.flush()
    if gate.junit is not None:
        report.write_junit(gate.junit)
    if gate.json is not None:
        result = report.to_json()
        result["timings"] = timings
        result["stacks_missed"] = stacks_missed
        result["events_handled"] = events_handled
        gate.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    # After CMD exited: workflow commands go to stdout last. A requested file that could not be
    # written (said on stderr) fails a run that would have passed.
    written = write_outputs(report, gate.ci)
    code = exit_status(status, verdict, gate.error_exitcode)
    return code if written or code else 1
