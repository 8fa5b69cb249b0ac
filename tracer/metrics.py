"""Prometheus exporter: a custom collector that reads the probes' maps and the tracker at scrape
time (no timers, no background copies), in the manner of the exporter-writing guide.

Everything is read under the daemon's lock, so a scrape sees the tracker between two events. A
scrape that cannot read the probes (they are detaching at shutdown, or a map read failed) still
returns a valid exposition: the tracker's metrics and the self-health ones, with
``kvm_completion_scrape_errors_total`` counting what went wrong.
"""

from __future__ import annotations

import ipaddress
import platform
import re
import socket
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from tracer import __version__
from tracer.counters import PATHS, RunState, VcpuCounters, VcpuEntry, exit_slot_name, total
from tracer.guest_exits import guest_exit_name
from tracer.tracker import Tracker
from tracer.vmident import VmIdentity

# 9100-9999 is the exporters' range; the README ("Metrics port") says why this one.
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

    def attached(self) -> list[str]: ...


@dataclass
class ExporterHealth:
    """The daemon's own health, updated by its loop and read at scrape time."""

    expected_probes: Sequence[str] = ()
    ringbuf_polls: int = 0
    last_poll_unix: float = 0.0
    scrape_errors: int = 0
    probes_closed: bool = False
    bcc_version: str = "unknown"
    labels: dict[str, str] = field(default_factory=dict)  # static labels on every series


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

    def __init__(self, tracker: Tracker, probes: ProbeStats, lock: threading.Lock,
                 health: ExporterHealth, options: MetricsOptions,
                 now: Callable[[], int] | None = None) -> None:
        self.tracker = tracker
        self.probes = probes
        self.lock = lock
        self.health = health
        self.options = options
        self._now_ns = now

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
        attached: list[str] = []
        if not self.health.probes_closed:
            try:
                entries = self.probes.vcpu_entries()
                counters = self.probes.counters()
                guest = self.probes.guest_exit_counts()
                attached = self.probes.attached()
            except Exception:  # a map read failing must not cost the whole exposition
                self.health.scrape_errors += 1
                entries, counters, guest, attached = [], {}, {}, []
        names = self._vm_names(entries, guest)
        self._vm_metrics(f, entries, names)
        self._alert_metrics(f)
        self._guest_exits(f, guest, names)
        self._health(f, counters, attached)
        return f.out

    def _vm_names(self, entries: list[VcpuEntry],
                  guest: dict[tuple[int, int, int, int], int]) -> dict[int, VmIdentity]:
        pids = {e.pid for e in entries} | {k[0] for k in guest}
        return {pid: self.tracker.identity(pid) for pid in sorted(pids)}

    def _vm_metrics(self, f: _Families, entries: list[VcpuEntry],
                    names: dict[int, VmIdentity]) -> None:
        live: dict[str, list[VcpuCounters]] = defaultdict(list)
        vcpus: dict[str, int] = defaultdict(int)
        pending: dict[str, int] = defaultdict(int)
        oldest: dict[str, float] = defaultdict(float)
        per_vcpu: list[tuple[str, int, int]] = []
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
            per_vcpu.append((vm, entry.vcpu_id, int(is_pending)))
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
            "completed them (log2 buckets, counted in the kernel).",
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

    def _per_vcpu(self, f: _Families, rows: list[tuple[str, int, int]]) -> None:
        gauge = f.gauge("vcpu_pending", "1 while this vCPU has a completion pending "
                        "(--metrics-per-vcpu; capped).", ["vm", "vcpu"])
        rows.sort()
        for vm, vcpu_id, value in rows[:self.options.max_vcpu_series]:
            f.add(gauge, [vm, str(vcpu_id)], value)
        dropped = f.gauge("vcpu_series_dropped", "Per-vCPU series left out by the cap "
                          "(max_vcpu_series).")
        f.add(dropped, [], max(0, len(rows) - self.options.max_vcpu_series))

    def _alert_metrics(self, f: _Families) -> None:
        stats = self.tracker.stats
        violations = f.counter("violations", "State saves/restores issued while an exit "
                               "completion was pending.",
                               ["vm", "kind", "ioctl", "exit_reason", "severity"])
        for key, count in sorted(stats.violations.items()):
            f.add(violations, list(key), count)
        snapshots = f.counter("snapshots", "Snapshots (two or more state saves) taken inside "
                              "one pending completion window.", ["vm"])
        for vm, count in sorted(stats.snapshots.items()):
            f.add(snapshots, [vm], count)
        sanctioned = f.counter("sanctioned", "State ioctls mid-completion that the policy "
                               "allows (e.g. QEMU's port 0x7e sync).", ["vm", "rule"])
        for (vm, rule), count in sorted(stats.sanctioned.items()):
            f.add(sanctioned, [vm, rule], count)

    def _guest_exits(self, f: _Families, guest: dict[tuple[int, int, int, int], int],
                     names: dict[int, VmIdentity]) -> None:
        fam = f.counter("guest_exits", "Guest exits to KVM (kvm:kvm_exit), by ISA and hardware "
                        "exit reason.", ["vm", "isa", "reason"])
        sums: dict[tuple[str, str, str], int] = defaultdict(int)
        for (pid, _vcpu, isa, reason), count in guest.items():
            isa_name, reason_name = guest_exit_name(isa, reason)
            sums[(names[pid].name, isa_name, reason_name)] += count
        for key, count in sorted(sums.items()):
            f.add(fam, list(key), count)

    def _health(self, f: _Families, counters: dict[str, int], attached: list[str]) -> None:
        health = self.health
        build = f.gauge("build_info", "Version of the daemon and of what it runs on.",
                        ["version", "python_version", "bcc_version"])
        f.add(build, [__version__, platform.python_version(), health.bcc_version], 1)
        lost = f.counter("events_lost", "Ring-buffer events the kernel dropped (buffer full), "
                         "by event type: alerts may be missing.", ["event_type"])
        full = f.counter("map_full", "Entries the kernel could not add because a BPF map was "
                         "full, by map.", ["map"])
        for name, value in sorted(counters.items()):
            if name.startswith("lost_"):
                f.add(lost, [name.removeprefix("lost_")], value)
            elif name.endswith("_map_full"):
                f.add(full, [name.removesuffix("_map_full")], value)
        for name, doc in (("untracked_exits", "Exits to userspace from threads whose vCPU the "
                           "probes do not know (VMs older than the daemon until their next "
                           "state ioctl)."),
                          ("access_read_failed", "Alerts sent without the pending access "
                           "(the VMM's kvm_run page was not readable).")):
            fam = f.counter(name, doc)
            if name in counters:
                f.add(fam, [], counters[name])
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


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def _monotonic_ns() -> int:
    import time

    return time.monotonic_ns()  # the clock of bpf_ktime_get_ns


def start_server(addr: str, registry: CollectorRegistry) -> Callable[[], None]:
    """Serve /metrics on ``addr``; returns a function that stops the server. Raises
    MetricsConfigError with one actionable line if the address is bad or taken."""
    from prometheus_client import start_http_server

    try:
        host, port = parse_addr(addr)
    except MetricsConfigError as err:
        raise MetricsConfigError(f"metrics address {addr!r}: {err}") from None
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        reason = err.strerror or str(err)
        if isinstance(err, socket.gaierror) or err.errno is None:
            raise MetricsConfigError(f"metrics address {addr}: cannot resolve {host!r} "
                                     f"({reason})") from None
        hint = ("another process listens there: pick another port with --metrics-addr"
                if "in use" in reason.lower() else "check the address")
        raise MetricsConfigError(f"cannot serve metrics on {addr}: {reason}; {hint}") from None

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
