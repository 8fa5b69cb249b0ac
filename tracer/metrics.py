"""Prometheus exporter: a custom collector that reads the probes' maps and the tracker at scrape
time (no timers, no background copies), in the manner of the exporter-writing guide.

Everything is read under the daemon's lock, so a scrape sees the tracker between two events. A
scrape that cannot read the probes (they are detaching at shutdown, or a map read failed) still
returns a valid exposition: the tracker's metrics and the self-health ones, with
``kvm_completion_scrape_errors_total`` counting what went wrong.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import platform
import re
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol
from wsgiref.simple_server import WSGIRequestHandler, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from tracer import __version__, abi
from tracer.counters import (
    PATHS,
    STACK_MISS_REASONS,
    RunState,
    VcpuCounters,
    VcpuEntry,
    events_lost_by_type,
    exit_slot_name,
    maps_full,
    total,
)
from tracer.fairlock import FairLock
from tracer.guest_exits import guest_exit_name
from tracer.httppool import REQUEST_TIMEOUT_S, PooledWSGIServer
from tracer.midcounts import MidKey
from tracer.policy import Kind, Verdict
from tracer.tracker import Tracker
from tracer.vmident import VmIdentity

# 9100-9999 is the exporters' range; docs/metrics.md ("Metrics port") says why this one.
DEFAULT_METRICS_PORT: Final = 9110
PREFIX: Final = "kvm_completion"


class MetricsConfigError(ValueError):
    """A malformed --metrics-addr (the message says what is wrong)."""


@dataclass(frozen=True)
class MetricsOptions:
    addr: str | None = f"127.0.0.1:{DEFAULT_METRICS_PORT}"  # None: no exporter
    per_vcpu: bool = False  # per-vCPU series (label vcpu), capped by max_vcpu_series
    max_vcpu_series: int = 256
    retain_gone_s: float = 900.0  # keep a gone VM's series this long (Prometheus sees the last)


def parse_addr(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` (port 1-65535) -> (host, port). Raises
    MetricsConfigError saying what is wrong (the caller names the flag or key)."""
    if addr.startswith("["):
        host, sep, rest = addr[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise MetricsConfigError(f"expected [IPV6]:PORT, e.g. [::1]:{DEFAULT_METRICS_PORT}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise MetricsConfigError(f"{host!r} is not an IPv6 address") from None
        port = rest[1:]
    else:
        host, sep, port = addr.rpartition(":")
        if not sep:
            raise MetricsConfigError(f"expected HOST:PORT, e.g. 127.0.0.1:{DEFAULT_METRICS_PORT}")
        if ":" in host:
            raise MetricsConfigError("put an IPv6 address in brackets, e.g. "
                                     f"[::1]:{DEFAULT_METRICS_PORT}")
        if not host:
            raise MetricsConfigError("the host is missing (0.0.0.0 or [::] listen everywhere)")
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", host):
            raise MetricsConfigError(f"{host!r} is not a host name or IPv4 address")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise MetricsConfigError(f"port {port!r} must be a number from 1 to 65535")
    return host, int(port)


class ProbeStats(Protocol):
    """What a scrape reads from the loaded probes (tracer.probes.Probes)."""

    def vcpu_entries(self) -> list[VcpuEntry]: ...

    def counters(self) -> dict[str, int]: ...

    def guest_exit_counts(self) -> dict[tuple[int, int, int, int], int]: ...

    def mid_counts(self) -> dict[MidKey, int]: ...

    def attached(self) -> list[str]: ...


# /-/healthy fails once the loop has not beaten for this long, unless the daemon sets its own
# bound (tracer.daemon derives it from its poll timeout).
DEFAULT_STALL_AFTER_S: Final = 10.0


@dataclass
class ExporterHealth:
    """The daemon's own health, updated by its loop and read at scrape time.

    The lifecycle fields (``ready`` .. ``stall_after_s``) answer /-/ready and /-/healthy. Those
    read them without the daemon's lock: each is one attribute written by one thread, and a loop
    stuck while holding the lock must still get its 503 rather than hang the probe.
    """

    expected_probes: Sequence[str] = ()
    ringbuf_polls: int = 0
    last_poll_unix: float = 0.0
    scrape_errors: int = 0
    probes_closed: bool = False
    bcc_version: str = "unknown"
    labels: dict[str, str] = field(default_factory=dict)  # static labels on every series
    ready: bool = False  # set with the ``ready`` log line
    stopping: bool = False  # from SIGTERM/SIGINT on: no longer ready, whatever else holds
    ready_probes: frozenset[str] = frozenset()  # what was attached when the daemon said ready
    loop_beat: float | None = None  # time.monotonic() of the loop's last poll; None: no loop yet
    stall_after_s: float = DEFAULT_STALL_AFTER_S

    def mark_ready(self, attached: Iterable[str], now: float) -> None:
        """The daemon is about to log ``ready`` and enter its loop (which beats from then)."""
        self.ready_probes = frozenset(attached)
        self.loop_beat = now
        self.ready = True


def liveness(health: ExporterHealth, now: float) -> tuple[bool, str]:
    """/-/healthy: whether the event loop has polled within ``stall_after_s``, and why not."""
    if health.loop_beat is None:
        return False, "event loop not started: compiling and attaching the probes"
    age = max(0.0, now - health.loop_beat)
    if age > health.stall_after_s:
        return False, (f"event loop stalled: last ring-buffer poll {age:.1f} s ago "
                       f"(limit {health.stall_after_s:g} s)")
    return True, f"healthy: last ring-buffer poll {age:.1f} s ago"


def readiness(health: ExporterHealth, now: float) -> tuple[bool, str]:
    """/-/ready: whether the daemon is watching (said ready, every expected probe attached,
    its loop alive, not stopping), and why not."""
    if health.stopping:
        return False, "not ready: stopping"
    if not health.ready:
        return False, "not ready: compiling and attaching the probes"
    missing = [p for p in health.expected_probes if p not in health.ready_probes]
    if missing:
        return False, f"not ready: probes not attached: {', '.join(missing)}"
    alive, why = liveness(health, now)
    if not alive:
        return False, f"not ready: {why}"
    return True, f"ready: watching, {len(health.expected_probes)} probes attached"


# Prometheus's own paths for the same two questions.
HEALTH_CHECKS: Final[dict[str, Callable[[ExporterHealth, float], tuple[bool, str]]]] = {
    "/-/ready": readiness,
    "/-/healthy": liveness,
}


def with_health(metrics_app: WSGIApplication, health: ExporterHealth,
                clock: Callable[[], float] = time.monotonic) -> WSGIApplication:
    """``metrics_app`` with /-/ready and /-/healthy in front: 200 or 503 and a one-line reason.
    Every other path goes to ``metrics_app`` unchanged (prometheus_client serves any path)."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        check = HEALTH_CHECKS.get(environ.get("PATH_INFO", ""))
        if check is None:
            return metrics_app(environ, start_response)
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"),
                                                      ("Content-Length", "0")])
            return [b""]
        ok, reason = check(health, clock())
        body = f"{reason}\n".encode()
        start_response("200 OK" if ok else "503 Service Unavailable",
                       [("Content-Type", "text/plain; charset=utf-8"),
                        ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
        return [b""] if method == "HEAD" else [body]

    return app


class _Families:
    """Builds the metric families of one scrape with the static labels appended."""

    def __init__(self, static: dict[str, str]) -> None:
        self.names = list(static)
        self.values = [static[k] for k in self.names]
        self.out: list[Metric] = []

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
        fam = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=[*labels, *self.names])
        self.out.append(fam)
        return fam

    def gauge(self, name: str, doc: str, labels: Sequence[str] = (),
              unit: str = "") -> GaugeMetricFamily:
        fam = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=[*labels, *self.names],
                                unit=unit)
        self.out.append(fam)
        return fam

    def add(self, fam: CounterMetricFamily | GaugeMetricFamily, labels: Sequence[str],
            value: float) -> None:
        fam.add_metric([*labels, *self.values], value)


class CompletionCollector(Collector):
    """Reads the probes' maps and the tracker when Prometheus scrapes."""

    def __init__(self, tracker: Tracker, probes: ProbeStats, lock: FairLock,
                 health: ExporterHealth, options: MetricsOptions,
                 now: Callable[[], int] | None = None) -> None:
        self.tracker = tracker
        self.probes = probes
        self.lock = lock
        self.health = health
        self.options = options
        self._now_ns = now
        self._guest = _GuestExitLedger()
        # Counters never go down between scrapes, even when a report counted as lost at one
        # scrape turns out to have been in flight (tracer.tracker.TrackerStats.reported).
        self._exported: dict[tuple[str, tuple[str, ...]], float] = {}

    def describe(self) -> list[Metric]:
        return []  # no families at registration: collect() needs the live maps

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            families = self._collect_locked()
        yield from families

    # ---- one scrape ----------------------------------------------------------------------------
    def _collect_locked(self) -> list[Metric]:
        f = _Families(self.health.labels)
        entries: list[VcpuEntry] = []
        counters: dict[str, int] = {}
        guest: dict[tuple[int, int, int, int], int] = {}
        mid: dict[MidKey, int] = {}
        attached: list[str] = []
        read = False
        if not self.health.probes_closed:
            try:
                entries = self.probes.vcpu_entries()
                counters = self.probes.counters()
                guest = self.probes.guest_exit_counts()
                mid = self.probes.mid_counts()
                attached = self.probes.attached()
                read = True
            except Exception:  # a map read failing must not cost the whole exposition
                self.health.scrape_errors += 1
                entries, counters, guest, mid, attached = [], {}, {}, {}, []
        names = self._vm_names(entries, guest, {k.pid for k in mid})
        self._vm_metrics(f, entries, names)
        self._alert_metrics(f, self._unseen(mid, counters.get("lost_violation", 0), names))
        self._guest_exits(f, guest if read else None, names)
        self._health(f, counters, attached)
        return f.out

    def _vm_names(self, entries: list[VcpuEntry], guest: dict[tuple[int, int, int, int], int],
                  more: set[int]) -> dict[int, VmIdentity]:
        comm = {e.pid: e.comm for e in entries if e.comm}  # kept by the kernel at creation
        pids = {e.pid for e in entries} | {k[0] for k in guest} | more
        return {pid: self.tracker.identity(pid, comm.get(pid, "")) for pid in sorted(pids)}

    def _vm_metrics(self, f: _Families, entries: list[VcpuEntry],
                    names: dict[int, VmIdentity]) -> None:
        live: dict[str, list[VcpuCounters]] = defaultdict(list)
        vcpus: dict[str, int] = defaultdict(int)
        pending: dict[str, int] = defaultdict(int)
        oldest: dict[str, float] = defaultdict(float)
        per_vcpu: list[tuple[str, int, int, int]] = []
        now_ns = self._now_ns() if self._now_ns else _monotonic_ns()
        for entry in entries:
            vm = names[entry.pid].name
            live[vm].append(entry.counters)
            if entry.state == RunState.CLOSED:
                continue
            vcpus[vm] += 1
            is_pending = entry.state == RunState.PENDING
            if is_pending:
                pending[vm] += 1
                if entry.pending_since_ns:  # from the map: the window open now, not a mirror
                    oldest[vm] = max(oldest[vm], max(0, now_ns - entry.pending_since_ns) / 1e9)
            per_vcpu.append((vm, entry.pid, entry.vcpu_id, int(is_pending)))
        for vm in self.tracker.ledger.retired:
            live.setdefault(vm, [])
        sums = {vm: total([*parts, self.tracker.ledger.retired.get(vm, VcpuCounters())])
                for vm, parts in live.items()}

        exits = f.counter("userspace_exits", "Exits of KVM_RUN to userspace, by exit reason "
                          "(none_run_interrupted: KVM_RUN returned an error such as -EINTR).",
                          ["vm", "exit_reason"])
        completions = f.counter("completions", "Pending completions finished by the next "
                                "KVM_RUN, by path: a normal re-entry, or an immediate_exit run "
                                "that completes without running the guest.", ["vm", "path"])
        hist = HistogramMetricFamily(
            f"{PREFIX}_pending_seconds", "How long exits stayed pending until KVM_RUN "
            "completed them, of a sample of the windows (probes.pending_time_sample: 1 in 16 "
            "by default; log2 buckets, counted in the kernel).",
            labels=["vm", *f.names], unit="")
        f.out.append(hist)
        for vm, c in sorted(sums.items()):
            for slot, count in enumerate(c.exits):
                if count:
                    f.add(exits, [vm, exit_slot_name(slot)], count)
            for path, count in zip(PATHS, c.completions, strict=True):
                f.add(completions, [vm, path], count)
            hist.add_metric([vm, *f.values],
                            [(_le(bound), float(n)) for bound, n in c.cumulative_buckets()],
                            c.pending_ns_sum / 1e9)

        vcpu_gauge = f.gauge("vcpus", "vCPUs tracked now.", ["vm"])
        pending_gauge = f.gauge("pending_vcpus", "vCPUs with a completion pending now.", ["vm"])
        oldest_gauge = f.gauge("pending_oldest_seconds", "Age of the oldest completion pending "
                               "now in the VM (0 when none).", ["vm"])
        for vm in sorted(vcpus):
            f.add(vcpu_gauge, [vm], vcpus[vm])
            f.add(pending_gauge, [vm], pending[vm])
            f.add(oldest_gauge, [vm], oldest[vm])
        info = f.gauge("vm_info", "One series per VM process: its pid, VMM and UUID.",
                       ["vm", "pid", "vmm", "uuid"])
        live_pids = {e.pid for e in entries if e.state != RunState.CLOSED}
        for pid, ident in sorted(names.items()):
            if pid in live_pids:
                f.add(info, [ident.name, str(pid), ident.vmm, ident.uuid or ""], 1)
        if self.options.per_vcpu:
            self._per_vcpu(f, per_vcpu)

    def _per_vcpu(self, f: _Families, rows: list[tuple[str, int, int, int]]) -> None:
        # The pid tells apart two processes with the same VM name (two `-name guest=x`, or a
        # restarted VM whose old process lingers): both have a vCPU 0, and summing two 0/1 flags
        # would no longer be a flag. Joins with vm_info on pid; no more series than vCPUs.
        gauge = f.gauge("vcpu_pending", "1 while this vCPU has a completion pending "
                        "(--metrics-per-vcpu; capped).", ["vm", "pid", "vcpu"])
        rows.sort()
        for vm, pid, vcpu_id, value in rows[:self.options.max_vcpu_series]:
            f.add(gauge, [vm, str(pid), str(vcpu_id)], value)
        dropped = f.gauge("vcpu_series_dropped", "Per-vCPU series left out by the cap "
                          "(max_vcpu_series).")
        f.add(dropped, [], max(0, len(rows) - self.options.max_vcpu_series))

    def _unseen(self, mid: dict[MidKey, int], lost: int,
                names: dict[int, VmIdentity]) -> Counter[tuple[str, MidKey]]:
        """Reports the kernel counted (mid_counts) that never reached the tracker, by (vm, key
        with pid 0): the ring buffer dropped them. A report sent but not handled yet at this
        instant is not lost: in all never more than the kernel counted as lost."""
        stats = self.tracker.stats
        missed: Counter[tuple[str, MidKey]] = Counter(stats.unseen)
        for key, n in mid.items():
            d = n - stats.reported.get(key, 0)
            if d > 0:
                missed[(names[key.pid].name, key._replace(pid=0))] += d
        out: Counter[tuple[str, MidKey]] = Counter()
        budget = lost
        for vm_key in sorted(missed):
            take = min(missed[vm_key], budget)
            if take > 0:
                out[vm_key] = take
                budget -= take
        return out

    def _monotonic(self, family: str, labels: tuple[str, ...], value: float) -> float:
        key = (family, labels)
        value = max(value, self._exported.get(key, 0.0))
        self._exported[key] = value
        return value

    def _alert_metrics(self, f: _Families, unseen: Counter[tuple[str, MidKey]]) -> None:
        stats = self.tracker.stats
        violations = f.counter("violations", "State saves/restores issued while an exit "
                               "completion was pending (exact: counted in the kernel; those "
                               "whose alert the ring buffer dropped are in alerts_lost too).",
                               ["vm", "kind", "ioctl", "exit_reason", "severity"])
        counts: Counter[tuple[str, str, str, str, str]] = Counter(stats.violations)
        sanctioned_counts: Counter[tuple[str, str]] = Counter(stats.sanctioned)
        lost_alerts: Counter[str] = Counter()
        for (vm, mk), n in unseen.items():
            ioctl = abi.IOCTLS.get(mk.cmd)
            if ioctl is None or ioctl.kind not in (abi.IoctlKind.SAVE, abi.IoctlKind.RESTORE):
                continue
            kind = Kind.SAVE if ioctl.kind is abi.IoctlKind.SAVE else Kind.RESTORE
            # Judged on what the kernel kept of it: the sanctions' port and direction, the
            # Hyper-V exit type, the 0x7e quirk. A lost register peek cannot be held: it
            # counts as the violation it is unless its window completes untouched.
            ruling = self.tracker.policy.judge(kind, mk.exit_reason, mk.access(),
                                               mk.quirk_7e_disabled, ioctl.name)
            if ruling.verdict is Verdict.SANCTIONED:
                sanctioned_counts[(vm, ruling.rule)] += n
                continue
            if ruling.verdict is not Verdict.VIOLATION:
                continue
            counts[(vm, kind.value, ioctl.name, abi.exit_reason_name(mk.exit_reason),
                    ruling.severity.value)] += n
            lost_alerts[vm] += n
        exported: dict[tuple[str, tuple[str, ...]], float] = {}
        for key, count in sorted(counts.items()):
            exported[("violations", key)] = self._monotonic("violations", key, count)
            f.add(violations, list(key), exported[("violations", key)])
        lost_fam = f.counter("alerts_lost", "Violations counted in the kernel whose alert line "
                             "the ring buffer dropped (no detail: see events_lost).", ["vm"])
        for vm, n in sorted(lost_alerts.items()):
            exported[("alerts_lost", (vm,))] = self._monotonic("alerts_lost", (vm,), n)
            f.add(lost_fam, [vm], exported[("alerts_lost", (vm,))])
        snapshots = f.counter("snapshots", "Snapshots (two or more state saves) taken inside "
                              "one pending completion window (a window whose events the ring "
                              "buffer dropped is counted from the kernel's count of its "
                              "saves).", ["vm"])
        for vm, count in sorted(stats.snapshots.items()):
            f.add(snapshots, [vm], count)
        sanctioned = f.counter("sanctioned", "State ioctls mid-completion that the policy "
                               "allows (e.g. QEMU's port 0x7e sync; exact: counted in the "
                               "kernel).", ["vm", "rule"])
        for skey, count in sorted(sanctioned_counts.items()):
            exported[("sanctioned", skey)] = self._monotonic("sanctioned", skey, count)
            f.add(sanctioned, list(skey), exported[("sanctioned", skey)])
        self._exported = exported  # series of VMs pruned (retain_gone_s) are forgotten
        inspections = f.counter("inspections", "Lone reads of one kind of vCPU state (one "
                                "save ioctl, policy peek_ioctls) in a pending window that then "
                                "closed with nothing else read and nothing restored in the "
                                "process: correct use of the ABI, judged and counted in the "
                                "kernel, never alerted.", ["vm", "ioctl", "exit_reason"])
        for ikey, count in sorted(self.tracker.inspection_counts().items()):
            f.add(inspections, list(ikey), count)

    def _guest_exits(self, f: _Families, guest: dict[tuple[int, int, int, int], int] | None,
                     names: dict[int, VmIdentity]) -> None:
        fam = f.counter("guest_exits", "Guest exits to KVM (kvm:kvm_exit), by ISA and hardware "
                        "exit reason.", ["vm", "isa", "reason"])
        if guest is not None:  # else the maps could not be read: keep the last known counts
            self._guest.update({key: (names[key[0]].name, count) for key, count in guest.items()})
            self._guest.prune(self._kept_vms())
        for key, count in sorted(self._guest.sums().items()):
            f.add(fam, list(key), count)

    def _kept_vms(self) -> set[str]:
        """VMs whose series the tracker still keeps: known to its ledger until retain_gone_s
        after they are gone (tracer.tracker.Tracker.prune_gone)."""
        return set(self.tracker.ledger.retired) | set(self.tracker.ledger.gone_since)

    def _health(self, f: _Families, counters: dict[str, int], attached: list[str]) -> None:
        health = self.health
        build = f.gauge("build_info", "Version of the daemon and of what it runs on.",
                        ["version", "python_version", "bcc_version"])
        f.add(build, [__version__, platform.python_version(), health.bcc_version], 1)
        lost = f.counter("events_lost", "Ring-buffer events the kernel dropped (buffer full), "
                         "by event type: alerts may be missing.", ["event_type"])
        full = f.counter("map_full", "Entries the kernel could not add because a BPF map was "
                         "full, by map.", ["map"])
        for event_type, value in sorted(events_lost_by_type(counters).items()):
            f.add(lost, [event_type], value)
        for name, value in sorted(maps_full(counters).items()):
            f.add(full, [name.removesuffix("_map_full")], value)
        for name, doc in (("untracked_exits", "Exits to userspace from threads whose vCPU the "
                           "probes do not know (VMs older than the daemon until their next "
                           "state ioctl)."),
                          ("access_read_failed", "Alerts sent without the pending access "
                           "(the VMM's kvm_run page was not readable).")):
            fam = f.counter(name, doc)
            if name in counters:
                f.add(fam, [], counters[name])
        missed = f.counter("stacks_missed", "Reports sent without their user stack, by reason: "
                           "stack_map_full/stack_failed (the kernel's frame-pointer walk), "
                           "user_stack_failed/user_stack_dropped (the registers and stack bytes "
                           "for the CFI unwinder: not readable, or not sent because the ring was "
                           "full or a storm used the captures allowed between two reads).",
                           ["reason"])
        for reason in STACK_MISS_REASONS:
            if reason in counters:
                f.add(missed, [reason], counters[reason])
        have = set(attached)
        expected = f.gauge("probes_expected", "Probes the daemon needs on this kernel.")
        f.add(expected, [], len(health.expected_probes))
        attached_g = f.gauge("probes_attached", "Of those, probes attached now.")
        f.add(attached_g, [], sum(1 for p in health.expected_probes if p in have))
        each = f.gauge("probe_attached", "1 if this probe is attached.", ["probe"])
        for probe in health.expected_probes:
            f.add(each, [probe], int(probe in have))
        polls = f.counter("ringbuf_polls", "Ring-buffer polls by the daemon's loop.")
        f.add(polls, [], health.ringbuf_polls)
        last = f.gauge("last_poll_timestamp_seconds", "Unix time of the loop's last ring-buffer "
                       "poll: a stuck daemon shows here.")
        f.add(last, [], health.last_poll_unix)
        errors = f.counter("scrape_errors", "Scrapes that could not read the probes' maps.")
        f.add(errors, [], health.scrape_errors)
        internal = f.counter("internal_errors", "Events the daemon failed to handle (a bug: "
                             "see the internal_error log lines).")
        stats = self.tracker.stats
        f.add(internal, [], stats.internal_errors + stats.malformed_events)


GuestKey = tuple[int, int, int, int]  # pid, vcpu, isa, hardware exit reason (the map's key)


class _GuestExitLedger:
    """The guest-exit counts of processes gone from the probes' map, per (vm, isa, reason).

    The probes drop an exited process's guest_exits entries without folding them into its VM's
    totals (as tracer.counters.VmLedger does for the per-vCPU counts), so a VM name shared by
    two processes (two ``-name guest=x``, a restarted VM whose old process lingers) would see
    its sum fall when one of them exits: a counter reset to Prometheus, and a false jump in
    rate(). Each scrape remembers what every key showed; a key that is gone, or shows less (the
    pid was reused), or now belongs to another name, keeps its last value here. Exits between
    the last scrape and the process exit are not counted: monotonic, and at worst a little low.
    """

    def __init__(self) -> None:
        self.last: dict[GuestKey, tuple[str, int]] = {}
        self.retired: dict[tuple[str, str, str], int] = defaultdict(int)

    def update(self, now: dict[GuestKey, tuple[str, int]]) -> None:
        for key, (vm, count) in self.last.items():
            new = now.get(key)
            if new is None or new[0] != vm or new[1] < count:
                self.retired[(vm, *guest_exit_name(key[2], key[3]))] += count
        self.last = now

    def prune(self, kept_vms: set[str]) -> None:
        """Forget the gone counts of VMs neither running now nor in ``kept_vms``."""
        keep = kept_vms | {vm for vm, _ in self.last.values()}
        for key in [k for k in self.retired if k[0] not in keep]:
            del self.retired[key]

    def sums(self) -> dict[tuple[str, str, str], int]:
        out = defaultdict(int, self.retired)
        for (_pid, _vcpu, isa, reason), (vm, count) in self.last.items():
            out[(vm, *guest_exit_name(isa, reason))] += count
        return out


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def _monotonic_ns() -> int:
    return time.monotonic_ns()  # the clock of bpf_ktime_get_ns


class _QuietHandler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_S  # a silent client frees its pool thread

    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes and scrapes every few seconds: no access log on stderr


# The exporter's threads (its accept loop and its pool, tracer.httppool) run at this nice
# value: a scrape or a health probe is a few ms of CPU, but each of its many GIL hand-overs
# (every map read and socket call releases the GIL) waited for the ring reader's thread to be
# scheduled when the CPUs were busy: the storm row failed 1 run in 8 with a CPU hog beside it
# (single scrapes of 0.3-0.7 s); ahead of the busy threads, 8 of 8 pass with one hog and 6 of 6
# with two.
HTTP_NICE: Final = -5


def _raise_priority() -> None:
    """This thread (the exporter's accept loop, each of its pool's) at HTTP_NICE, when
    permitted (CAP_SYS_NICE)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HTTP_NICE)


def start_server(addr: str, registry: CollectorRegistry,
                 health: ExporterHealth | None = None) -> Callable[[], None]:
    """Serve the metrics on ``addr`` (any path, like prometheus_client), and with ``health``
    also /-/ready and /-/healthy; returns a function that stops the server. Raises
    MetricsConfigError with one actionable line if the address is bad or taken."""
    from prometheus_client import make_wsgi_app

    try:
        host, port = parse_addr(addr)
    except MetricsConfigError as err:
        raise MetricsConfigError(f"metrics address {addr!r}: {err}") from None
    app: WSGIApplication = make_wsgi_app(registry)
    if health is not None:
        app = with_health(app, health)
    # prometheus_client's start_http_server builds its own app, so the server is built here the
    # same way (address family from getaddrinfo, no request log), with the wrapped app in it
    # from the first request on, and its requests served by a pool (tracer.httppool).
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                       flags=socket.AI_PASSIVE)[0]

        class Server(PooledWSGIServer):
            address_family = family
            on_thread_start = staticmethod(_raise_priority)

        server = make_server(str(sockaddr[0]), port, app, Server, handler_class=_QuietHandler)
    except OSError as err:
        reason = err.strerror or str(err)
        if isinstance(err, socket.gaierror) or err.errno is None:
            raise MetricsConfigError(f"metrics address {addr}: cannot resolve {host!r} "
                                     f"({reason})") from None
        hint = ("another process listens there: pick another port with --metrics-addr"
                if "in use" in reason.lower() else "check the address")
        raise MetricsConfigError(f"cannot serve metrics on {addr}: {reason}; {hint}") from None

    def serve() -> None:
        _raise_priority()
        server.serve_forever()

    thread = threading.Thread(target=serve, name="metrics-http", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
