"""``run``: attach the probes, feed their events to the tracker, until SIGINT/SIGTERM."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, ProcessCollector

from tracer import __version__, handover, vmident
from tracer.alerts import AlertSink, LogSink
from tracer.counters import (
    PATHS,
    RunState,
    VcpuCounters,
    events_lost_by_type,
    maps_full,
    total,
)
from tracer.events import CapturePairer, KernelEvent, MalformedEvent, UserCapture, decode_event
from tracer.fairlock import FairLock
from tracer.metrics import CompletionCollector, ExporterHealth, MetricsOptions, start_server
from tracer.policy import CompletionPolicy, describe
from tracer.preflight import effective_caps
from tracer.probes import ProbeConfig, ProbeError, Probes, bcc_version
from tracer.sdnotify import Notifier
from tracer.symbolize import Symbolizer
from tracer.tracker import Tracker
from tracer.vmident import VmIdentity

# Ring-buffer poll timeout. Events wake the poll at once (epoll), and so do signals: the timeout
# only paces the housekeeping (idle snapshot windows, watchdog, reload), so it is as long as
# --snapshot-idle allows: an idle daemon then costs next to no CPU.
POLL_MS = 100
MAX_POLL_MS = 500
SWEEP_S = 5.0  # how often to look for processes whose exit event was lost
LOSS_CHECK_S = 2.0
# /-/healthy fails when the loop has not polled for this long. An iteration waits at most
# MAX_POLL_MS in the poll, then handles what it returned and the housekeeping (the /proc sweep
# every SWEEP_S, the loss check, the watchdog, a reload): twenty poll timeouts (10 s) is far
# above a busy iteration on a loaded node (a full ring, a sweep, CPU throttled to the pod's
# limit), yet one liveness period shows a stuck loop (the kubelet restarts it after three).
STALL_AFTER_S = 20 * MAX_POLL_MS / 1000


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


MAX_SYMBOLIZED_STACKS = 4096


class ProbeStacks:
    """The tracker's StackResolver: addresses from the probes' stack map, names from the
    symbolizer (tracer.symbolize).

    Identical user stacks share one bucket of the stack map (its id is the stack's hash), and
    the first take frees it: a VMM that saves in a loop reports the next save with the same id
    before Python has read the first, so that save's stack (and its call site) would be
    missing. A miss on an id taken before is the stack that id held then; a bucket refilled
    since (the same stack again, or another) is read from the map first."""

    def __init__(self, probes: Probes, symbolizer: Symbolizer | None = None) -> None:
        self.probes = probes
        self.symbolizer = symbolizer or Symbolizer()
        self._taken: dict[int, list[Any]] = {}  # ids are < max_stacks: bounded
        # (pid, frames) -> the symbolized stack: a VMM that races in a loop reports the same
        # stack thousands of times, and building its dict was most of the reader's time per
        # event in a flood. Shared by the alerts (read-only); bounded, dropped with the pid.
        self._symbolized: dict[tuple[int, tuple[Any, ...]], dict[str, Any]] = {}

    def take(self, stack_id: int) -> list[Any] | None:
        frames = self.probes.take_stack(stack_id)
        if frames is None:
            return self._taken.get(stack_id)
        self._taken[stack_id] = frames
        return frames

    def symbolize(self, pid: int, frames: list[Any],
                  capture: UserCapture | None = None) -> dict[str, Any]:
        if capture is not None:  # registers and stack bytes: unwound for this report
            return self.symbolizer.symbolize(pid, frames, capture).to_dict()
        key = (pid, tuple(frames))
        known = self._symbolized.get(key)
        if known is None:
            known = self.symbolizer.symbolize(pid, frames).to_dict()
            if len(self._symbolized) >= MAX_SYMBOLIZED_STACKS:
                del self._symbolized[next(iter(self._symbolized))]
            self._symbolized[key] = known
        return known

    def remember(self, pid: int) -> None:
        self.symbolizer.remember(pid)

    def index_binary(self, pid: int, path: str) -> None:
        self.symbolizer.index_binary(pid, path)

    def forget(self, pid: int) -> None:
        self.symbolizer.forget(pid)
        for key in [k for k in self._symbolized if k[0] == pid]:
            del self._symbolized[key]


class ReloadHook(Protocol):
    """SIGHUP handling (tracer.reload.Reloader): ``request`` from the signal handler, ``poll``
    from the loop's housekeeping."""

    def request(self) -> None: ...

    def poll(self, daemon: Daemon, notifier: Notifier) -> None: ...


@dataclass
class DaemonOptions:
    policy: CompletionPolicy
    probe_config: ProbeConfig = field(default_factory=ProbeConfig)
    snapshot_idle_s: float = 1.0
    metrics: MetricsOptions = field(default_factory=MetricsOptions)
    labels: dict[str, str] = field(default_factory=dict)  # static labels on alerts and metrics
    state_dir: Path | None = None  # holds the restart hand-over (tracer.handover)


class Daemon:
    """Probes -> events -> tracker -> sinks, driven from one thread."""

    def __init__(self, options: DaemonOptions, sink: AlertSink | None = None,
                 stop: threading.Event | None = None,
                 registry: CollectorRegistry | None = None,
                 health: ExporterHealth | None = None) -> None:
        self.options = options
        self.sink: AlertSink = sink or LogSink()
        # Held by the loop while it handles events and by a scrape while it reads: the exporter's
        # HTTP thread sees the tracker between two events, never in the middle of one. Taken in
        # turn (tracer.fairlock): a scrape waits for one event, not for the loop's backlog.
        self.lock = FairLock()
        self.probes = Probes(options.policy, options.probe_config)
        stacks = ProbeStacks(self.probes) if options.probe_config.stacks else None
        if stacks is not None:
            stacks.symbolizer.warm_system_libraries()
        self.tracker = Tracker(options.policy, self.sink, SystemProcView(), self.probes,
                               snapshot_idle_s=options.snapshot_idle_s, stacks=stacks)
        missing = self.probes.missing()
        if missing:
            self.probes.close()
            raise ProbeError(f"probes not attached: {', '.join(missing)}; run "
                             "'kvm-completion-tracer check'")
        self.probes.on_event(self._on_raw_event)
        # ``health`` may already be served (/-/ready, /-/healthy) while the probes compiled.
        self.health = health if health is not None else ExporterHealth()
        self.health.expected_probes = self.probes.expected()
        self.health.bcc_version = bcc_version()
        self.set_labels(options.labels)  # on every series and alert line from the first on
        self.health.stall_after_s = STALL_AFTER_S
        if registry is not None:
            registry.register(CompletionCollector(self.tracker, self.probes, self.lock,
                                                  self.health, options.metrics))
        self.stop_requested = stop or threading.Event()
        # Called once per loop iteration (at most MAX_POLL_MS apart): sd_notify watchdog, reload.
        self.housekeeping: list[Callable[[], None]] = []
        self.poll_cap_ms: float = MAX_POLL_MS
        self.started = False
        self.events_handled = 0
        self.pairer = CapturePairer()  # a violation's user stack record joins it
        self._lost_reported = 0

    def set_labels(self, labels: dict[str, str]) -> None:
        """Static labels on every metric series and alert line (config reload)."""
        with self.lock:
            self.options.labels = dict(labels)
            self.health.labels = dict(labels)
            if isinstance(self.sink, LogSink):
                self.sink.labels = dict(labels)

    def _on_raw_event(self, raw: bytes) -> None:
        with self.lock:
            self.events_handled += 1
            self._handle_raw_event(raw)

    def _handle_raw_event(self, raw: bytes) -> None:
        # Runs inside bcc's ctypes callback: an exception escaping here would be printed as a
        # traceback and the event dropped silently, so every failure becomes a counted notice.
        try:
            event = decode_event(raw)
        except MalformedEvent as err:
            self.tracker.stats.malformed_events += 1
            self.sink.notice("malformed_event", "warning", error=str(err))
            return
        self._to_tracker(self.pairer.feed(event))

    def _to_tracker(self, events: list[KernelEvent]) -> None:
        for event in events:
            self._to_tracker_one(event)

    def _to_tracker_one(self, event: KernelEvent) -> None:
        try:
            self.tracker.handle(event)
        except Exception as err:
            self.tracker.stats.internal_errors += 1
            self.sink.notice("internal_error", "error", error=f"{type(err).__name__}: {err}",
                             event_type=event.type.name, pid=event.tgid)

    def _handover_path(self) -> Path | None:
        state_dir = self.options.state_dir
        return state_dir / handover.HANDOVER_FILE if state_dir is not None else None

    def start(self, adopt: bool = True) -> None:
        """Adopt VMs that predate us (after attaching, so none slips between), in the state
        re-learned from /proc and the previous instance's hand-over, and say ready.
        ``adopt=False`` (``watch``: only processes started after the probes matter) skips that."""
        inherited: list[handover.PendingVcpu] = []
        path = self._handover_path()
        if not adopt:
            self._say_ready(0, vmident.VcpuScan([], {}))
            return
        if path is not None:
            try:
                inherited = handover.load(path)
            except handover.HandoverError as err:
                self.sink.notice("handover_ignored", "warning", reason=str(err),
                                 hint="pending completions of older VMs start unknown (idle)")
        relearner = handover.Relearner(inherited)
        scan = vmident.scan_vcpus()
        with self.lock:
            adopted = self.tracker.adopt_existing(scan.vcpus, relearner)
        if inherited:
            self.sink.notice("handover", "info", pending_kept=len(relearner.kept),
                             pending_dropped=len(relearner.dropped) + len(relearner.inherited),
                             why_dropped="completed, re-run or gone since the previous "
                                         "instance stopped (or not provably unchanged)")
        self._say_ready(adopted, scan)

    def _say_ready(self, adopted: int, scan: vmident.VcpuScan) -> None:
        attached = self.probes.attached()
        self.health.mark_ready(attached, time.monotonic())  # /-/ready from the ready line on
        self.sink.notice("ready", "info", version=__version__, pid=os.getpid(),
                         probes=attached, probes_origin=self.probes.origin,
                         vcpus_adopted=adopted,
                         processes_unreadable=len(scan.unreadable),
                         vmms_unreadable=len(scan.unreadable_vmms),
                         policy=describe(self.options.policy))
        # A warning only for processes named as VMMs: other unreadable ones (a container's own
        # init, say) are common and harmless, so they are only counted in the ready line.
        if scan.unreadable_vmms:  # after ready, which stays the line right after starting
            self._warn_unreadable(scan)
        self.started = True

    def _warn_unreadable(self, scan: vmident.VcpuScan) -> None:
        # Once per start: without /proc/PID/fd and /maps of the VMMs, their running vCPUs are
        # not adopted (their exits go untracked until their next state ioctl), and the kvm_run
        # page of a vCPU cannot be located.
        cause, fix = vmident.explain_denied(effective_caps(), vmident.lsm_label())
        vmms = {str(pid): vmm for pid, vmm in sorted(scan.unreadable_vmms.items())}
        self.sink.notice("vcpu_discovery_incomplete", "warning",
                         processes_unreadable=len(scan.unreadable),
                         vmm_pids=dict(list(vmms.items())[:10]), likely_cause=cause, fix=fix,
                         impact="vCPUs of VMs already running are not adopted")

    def poll_once(self, timeout_ms: int = POLL_MS) -> None:
        # The beat comes before the poll: it blocks up to timeout_ms, and the events it hands
        # to the tracker are where a stuck loop would hang.
        self.health.loop_beat = time.monotonic()
        self.probes.poll(timeout_ms)
        with self.lock:
            self._to_tracker(self.pairer.polled())
            self.health.ringbuf_polls += 1
            self.health.last_poll_unix = time.time()
            self.tracker.tick()

    def check_losses(self) -> None:
        counters = self.probes.counters()
        lost = counters["events_lost"]
        if lost > self._lost_reported:
            by_type = {k: v for k, v in events_lost_by_type(counters).items() if v}
            self.sink.notice("events_lost", "warning", lost=lost - self._lost_reported,
                             total=lost, by_type=by_type,
                             hint="raise --ringbuf-pages; alerts may be missing")
            self._lost_reported = lost
        full = {k: v for k, v in maps_full(counters).items() if v}
        if full:
            self.sink.notice("maps_full", "warning", **full)

    def loop_poll_ms(self) -> int:
        """Half the snapshot idle time, between POLL_MS/2 and MAX_POLL_MS, and no longer than
        ``poll_cap_ms`` (the watchdog's ping interval under systemd)."""
        wanted = min(MAX_POLL_MS, self.poll_cap_ms, self.tracker.snapshot_idle_s * 500)
        return int(max(POLL_MS // 2, wanted))

    def run_forever(self, until: Callable[[], bool] | None = None) -> None:
        """The loop of ``run`` and ``watch``: until stopped (or ``until()`` says so), then the
        ring is drained and the idle windows flushed."""
        next_sweep = next_loss = time.monotonic()
        while not self.stop_requested.is_set() and not (until is not None and until()):
            self.poll_once(self.loop_poll_ms())
            now = time.monotonic()
            if now >= next_sweep:
                # Every event already submitted first: a process the sweep finds gone sent its
                # exit event before it was gone, so only a lost one leaves its reads unjudged.
                self.probes.poll(0)
                with self.lock:
                    self.tracker.sweep()
                    self.tracker.prune_gone(self.options.metrics.retain_gone_s)
                next_sweep = now + SWEEP_S
            if now >= next_loss:
                with self.lock:
                    self.check_losses()
                next_loss = now + LOSS_CHECK_S
            for hook in self.housekeeping:
                hook()
        self.health.stopping = True  # also when stopped other than by a signal
        self.drain()
        with self.lock:
            self._to_tracker(self.pairer.flush())
            self.tracker.tick()
            self.check_losses()
            self.tracker.unresolved_held()

    def drain(self) -> None:
        """Hand every event already in the ring to the tracker (a violation of the last
        instant before a watched command exits is in there)."""
        while True:
            before = self.events_handled
            self.probes.poll(0)
            if self.events_handled == before:
                return

    def write_handover(self) -> int:
        """Before the probes detach: the vCPUs with a completion pending, for the next
        instance (tracer.handover). Returns how many."""
        path = self._handover_path()
        if path is None or not self.started:
            return 0  # stopped before start(): a previous hand-over stays for the next start
        first = {s["uid"]: s for s in self.probes.vcpu_states()
                 if s["state"] == RunState.PENDING}
        runtimes = {uid: handover.thread_runtime_ns(s["pid"], s["run_tid"])
                    for uid, s in first.items()}
        # Read again after the thread times: a KVM_RUN between the two reads changed the
        # window (seq) or the state, and that vCPU is left out.
        again = {s["uid"]: s for s in self.probes.vcpu_states()}
        pending = []
        for uid, s in first.items():
            now = again.get(uid)
            runtime = runtimes[uid]
            start_time = vmident.process_start_time(s["pid"])
            if (now is None or now["state"] != RunState.PENDING or now["seq"] != s["seq"]
                    or runtime is None or start_time is None):
                continue
            pending.append(handover.PendingVcpu(
                pid=s["pid"], start_time=start_time, vcpu_id=s["vcpu_id"],
                exit_reason=s["exit_reason"], run_tid=s["run_tid"], thread_runtime_ns=runtime,
                pending_since_ns=s["pending_since_ns"]))
        try:
            handover.save(path, pending)
        except OSError as err:
            self.sink.notice("handover_not_written", "warning", path=str(path),
                             reason=err.strerror or str(err))
            return 0
        return len(pending)

    def vcpu_totals(self) -> VcpuCounters:
        """Statistics of every vCPU seen, live and gone."""
        return total([*(e.counters for e in self.probes.vcpu_entries()),
                      *self.tracker.ledger.retired.values()])

    def summary(self) -> dict[str, object]:
        """What this run saw, for the ``stopped`` line."""
        counters = self.probes.counters()
        stats = self.tracker.stats
        vcpu = self.vcpu_totals()
        return {
            "userspace_exits": vcpu.userspace_exits,
            "pending_exits": vcpu.pending_exits(self.tracker.policy.pending_exits),
            "completions": dict(zip(PATHS, vcpu.completions, strict=True)),
            "guest_exits": sum(self.probes.guest_exit_counts().values()),
            "guest_entries": sum(self.probes.guest_entry_counts().values()),
            "violations": sum(stats.violations.values()),
            "sanctioned": sum(stats.sanctioned.values()),
            "inspections": sum(self.tracker.inspection_counts().values()),
            "unverified": sum(self.tracker.unverified().values()),
            "snapshots": sum(stats.snapshots.values()),
            "events_lost": counters["events_lost"],
        }

    def close(self) -> None:
        with self.lock:  # a scrape in flight finishes first; later ones skip the maps
            self.health.probes_closed = True
            self.probes.close()


GIL_SWITCH_INTERVAL_S = 0.0005


def run(options: DaemonOptions, reloader: ReloadHook | None = None) -> int:
    # Handlers first: a SIGTERM while the probes compile (a second or two) must still end in a
    # clean detach and exit 0, not the default kill; a SIGHUP then (default: terminate) is kept
    # for the loop. Handlers only set flags: the loop's housekeeping does the work.
    stop = threading.Event()
    notifier = Notifier()

    health = ExporterHealth()  # served from the bind on: /-/ready says 503 until the ready line

    def _stop(signum: int, _frame: FrameType | None) -> None:
        health.stopping = True  # /-/ready: 503 at once, not after the loop's next poll
        stop.set()

    def _hup(signum: int, _frame: FrameType | None) -> None:
        if reloader is not None:
            reloader.request()

    # The ring buffer hands each event to Python in its own callback, each taking the GIL
    # anew: with the default 5 ms switch interval, a scrape formatting the exposition in the
    # exporter's thread made every callback wait up to 5 ms, and a flood's alerts 100-200 ms.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _hup)
    LogSink().notice("starting", "info", version=__version__, pid=os.getpid(),
                     step="compiling and attaching the probes")
    notifier.status("compiling and attaching the probes")
    # The exporter binds first: a taken port fails in a moment, not after the compile. Until the
    # probes are attached a scrape shows only the process metrics.
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    stop_metrics = (start_server(options.metrics.addr, registry, health)
                    if options.metrics.addr else None)
    try:
        daemon = Daemon(options, stop=stop, registry=registry, health=health)
    except BaseException:
        notifier.stopping()
        if stop_metrics is not None:
            stop_metrics()
        raise
    try:
        if not stop.is_set():
            daemon.start()
            notifier.ready(status=f"watching; {len(daemon.probes.attached())} probes attached")
            daemon.housekeeping.append(notifier.watchdog_tick)
            if notifier.watchdog_interval_s is not None:
                daemon.poll_cap_ms = notifier.watchdog_interval_s * 1000
            if reloader is not None:
                daemon.housekeeping.append(lambda: reloader.poll(daemon, notifier))
            daemon.run_forever()
        notifier.stopping()
        with daemon.lock:  # the exporter still serves until the finally below
            handover_pending = daemon.write_handover()
            summary = daemon.summary()
        daemon.sink.notice("stopped", "info", reason="signal",
                           handover_pending=handover_pending, **summary)
    finally:
        daemon.close()
        if stop_metrics is not None:
            stop_metrics()
        notifier.close()
    return 0
