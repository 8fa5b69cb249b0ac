"""``run``: attach the probes, feed their events to the tracker, until SIGINT/SIGTERM."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from tracer import __version__, vmident
from tracer.alerts import AlertSink, LogSink
from tracer.events import MalformedEvent, decode_event
from tracer.metrics import MetricsOptions
from tracer.policy import CompletionPolicy, describe
from tracer.probes import ProbeConfig, ProbeError, Probes
from tracer.tracker import Tracker
from tracer.vmident import VmIdentity

POLL_MS = 100  # ring buffer poll timeout: bounds alert latency when events trickle in
SWEEP_S = 5.0  # how often to look for processes whose exit event was lost
LOSS_CHECK_S = 2.0


class SystemProcView:
    """The tracker's window on /proc (tracer.vmident)."""

    def __init__(self, proc_root: Path = vmident.PROC) -> None:
        self.proc_root = proc_root

    def identify(self, pid: int) -> VmIdentity:
        return vmident.identify_vm(pid, self.proc_root)

    def resolve_fd(self, pid: int, fd: int) -> int | None:
        return vmident.resolve_fd(pid, fd, self.proc_root)

    def run_addr(self, pid: int, vcpu_id: int) -> int | None:
        return vmident.vcpu_run_addr(pid, vcpu_id, self.proc_root)

    def start_time(self, pid: int) -> int | None:
        return vmident.process_start_time(pid, self.proc_root)

    def alive(self, pid: int, start_time: int) -> bool:
        return vmident.process_alive(pid, start_time, self.proc_root)


@dataclass
class DaemonOptions:
    policy: CompletionPolicy
    probe_config: ProbeConfig = field(default_factory=ProbeConfig)
    snapshot_idle_s: float = 1.0
    metrics: MetricsOptions = field(default_factory=MetricsOptions)
    labels: dict[str, str] = field(default_factory=dict)  # static labels on alerts and metrics


class Daemon:
    """Probes -> events -> tracker -> sinks, driven from one thread."""

    def __init__(self, options: DaemonOptions, sink: AlertSink | None = None,
                 stop: threading.Event | None = None) -> None:
        self.options = options
        self.sink: AlertSink = sink or LogSink()
        self.probes = Probes(options.policy, options.probe_config)
        self.tracker = Tracker(options.policy, self.sink, SystemProcView(), self.probes,
                               snapshot_idle_s=options.snapshot_idle_s)
        missing = self.probes.missing()
        if missing:
            self.probes.close()
            raise ProbeError(f"probes not attached: {', '.join(missing)}; run "
                             "'kvm-completion-tracer check'")
        self.probes.on_event(self._on_raw_event)
        self.stop_requested = stop or threading.Event()
        # Called once per loop iteration (about every POLL_MS): sd_notify watchdog, SIGHUP reload.
        self.housekeeping: list[Callable[[], None]] = []
        self._lost_reported = 0

    def _on_raw_event(self, raw: bytes) -> None:
        # Runs inside bcc's ctypes callback: an exception escaping here would be printed as a
        # traceback and the event dropped silently, so every failure becomes a counted notice.
        try:
            event = decode_event(raw)
        except MalformedEvent as err:
            self.tracker.stats.malformed_events += 1
            self.sink.notice("malformed_event", "warning", error=str(err))
            return
        try:
            self.tracker.handle(event)
        except Exception as err:
            self.tracker.stats.internal_errors += 1
            self.sink.notice("internal_error", "error", error=f"{type(err).__name__}: {err}",
                             event_type=event.type.name, pid=event.tgid)

    def start(self) -> None:
        """Adopt VMs that predate us (after attaching, so none slips between) and say ready."""
        adopted = self.tracker.adopt_existing(vmident.discover_vcpus())
        self.sink.notice("ready", "info", version=__version__, pid=os.getpid(),
                         probes=self.probes.attached(), vcpus_adopted=adopted,
                         policy=describe(self.options.policy))

    def poll_once(self, timeout_ms: int = POLL_MS) -> None:
        self.probes.poll(timeout_ms)
        self.tracker.tick()

    def check_losses(self) -> None:
        counters = self.probes.counters()
        lost = counters["events_lost"]
        if lost > self._lost_reported:
            by_type = {k.removeprefix("lost_"): v for k, v in counters.items()
                       if k.startswith("lost_") and v}
            self.sink.notice("events_lost", "warning", lost=lost - self._lost_reported,
                             total=lost, by_type=by_type,
                             hint="raise --ringbuf-pages; alerts may be missing")
            self._lost_reported = lost
        full = {k: v for k, v in counters.items() if k.endswith("_map_full") and v}
        if full:
            self.sink.notice("maps_full", "warning", **full)

    def run_forever(self) -> None:
        next_sweep = next_loss = time.monotonic()
        while not self.stop_requested.is_set():
            self.poll_once()
            now = time.monotonic()
            if now >= next_sweep:
                self.tracker.sweep()
                next_sweep = now + SWEEP_S
            if now >= next_loss:
                self.check_losses()
                next_loss = now + LOSS_CHECK_S
            for hook in self.housekeeping:
                hook()
        self.probes.poll(0)  # drain what is already in the ring
        self.tracker.tick()

    def summary(self) -> dict[str, object]:
        """What this run saw, for the ``stopped`` line."""
        counters = self.probes.counters()
        stats = self.tracker.stats
        return {
            "userspace_exits": counters["userspace_exits"],
            "pending_exits": counters["pending_exits"],
            "completions": {"reentry": counters["completions_reentry"],
                            "immediate_exit": counters["completions_immediate_exit"]},
            "guest_exits": sum(self.probes.guest_exit_counts().values()),
            "guest_entries": sum(self.probes.guest_entry_counts().values()),
            "violations": sum(stats.violations.values()),
            "sanctioned": sum(stats.sanctioned.values()),
            "snapshots": sum(stats.snapshots.values()),
            "events_lost": counters["events_lost"],
        }

    def close(self) -> None:
        self.probes.close()


def run(options: DaemonOptions) -> int:
    # Handlers first: a SIGTERM while the probes compile (a second or two) must still end in a
    # clean detach and exit 0, not the default kill.
    stop = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    LogSink().notice("starting", "info", version=__version__, pid=os.getpid(),
                     step="compiling and attaching the probes")
    daemon = Daemon(options, stop=stop)
    try:
        if not stop.is_set():
            daemon.start()
            daemon.run_forever()
        daemon.sink.notice("stopped", "info", reason="signal", **daemon.summary())
    finally:
        daemon.close()
    return 0
