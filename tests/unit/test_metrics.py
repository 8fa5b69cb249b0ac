"""The exporter's collector on the model of the probes: what a scrape shows, and that it stays a
valid exposition whatever the names, and while the probes go away."""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest
from probe_fakes import EXPECTED, ModelProbes, NamedProc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tracer import abi
from tracer.alerts import MemorySink
from tracer.counters import HIST_SLOTS, VcpuCounters
from tracer.events import PioAccess
from tracer.metrics import (
    CompletionCollector,
    ExporterHealth,
    MetricsConfigError,
    MetricsOptions,
    liveness,
    parse_addr,
    readiness,
    start_server,
    with_health,
)
from tracer.model import ProbeModel
from tracer.policy import PolicyOverrides, build_policy
from tracer.tracker import Tracker
from tracer.vmident import VmIdentity, unavailable_identity
from tracer.windows import kind_values

PID, TID, VM_FD = 4242, 4243, 3
OTHER = 5151  # a second process
IO = abi.EXIT_REASON_BY_NAME["KVM_EXIT_IO"]
HLT = abi.EXIT_REASON_BY_NAME["KVM_EXIT_HLT"]
GET_REGS = abi.IOCTL_BY_NAME["KVM_GET_REGS"].number
GET_SREGS = abi.IOCTL_BY_NAME["KVM_GET_SREGS"].number
OUT = PioAccess(0x3F8, "out", 1, 1)


class Rig:
    def __init__(self, names: dict[int, str] | None = None, inspection: str = "violation",
                 **options: Any) -> None:
        # Strict by default: a lone KVM_GET_REGS is the violation these tests count.
        policy = build_policy(PolicyOverrides(arch="x86_64", inspection=inspection))
        self.model = ProbeModel(policy.pending_exits, kind_values(policy))
        self.sink = MemorySink()
        self.tracker = Tracker(policy, self.sink, NamedProc(names or {}), self.model)
        self.probes = ModelProbes(self.model)
        self.health = ExporterHealth(expected_probes=EXPECTED, bcc_version="0.26.0")
        self.registry = CollectorRegistry()
        self.collector = CompletionCollector(self.tracker, self.probes, threading.Lock(),
                                             self.health, MetricsOptions(**options),
                                             now=lambda: self.model.now)
        self.registry.register(self.collector)

    def flush(self) -> None:
        for ev in self.model.drain():
            self.tracker.handle(ev)

    # One vCPU thread per process (tid pid + 1, so TID for PID).
    def vcpu(self, fd: int, vcpu_id: int = 0, pid: int = PID) -> None:
        self.model.ioctl_enter(pid, pid + 1, VM_FD, abi.KVM_CREATE_VCPU, vcpu_id)
        self.model.ioctl_exit(pid, pid + 1, fd)
        self.flush()

    def run(self, fd: int, reason: int, access: Any = None, pid: int = PID) -> None:
        self.model.ioctl_enter(pid, pid + 1, fd, abi.KVM_RUN)
        self.model.userspace_exit(pid + 1, reason, 0, access)
        self.flush()

    def ioctl(self, fd: int, cmd: int, pid: int = PID) -> None:
        self.model.ioctl_enter(pid, pid + 1, fd, cmd)
        self.model.ioctl_exit(pid, pid + 1, 0)
        self.flush()

    def exit_process(self, pid: int) -> None:
        """As the probes do: the process's guest-exit entries go with it."""
        self.model.process_exit(pid)
        self.flush()
        self.probes.guest = {k: v for k, v in self.probes.guest.items() if k[0] != pid}

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = generate_latest(self.registry).decode()
        out = {}
        for family in text_string_to_metric_families(text):  # raises on a broken exposition
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                # The parser accepts a series twice; Prometheus rejects such a scrape.
                assert key not in out, f"duplicate series {key}"
                out[key] = sample.value
        return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_a_violation_shows_with_its_labels_next_to_the_exits() -> None:
    rig = Rig({PID: "web01"})
    rig.vcpu(fd=5)
    rig.run(5, IO, OUT)
    rig.ioctl(5, GET_REGS)
    rig.ioctl(5, GET_SREGS)
    got = rig.scrape()
    assert value(got, "kvm_completion_violations_total", vm="web01", kind="save",
                 ioctl="KVM_GET_REGS", exit_reason="KVM_EXIT_IO", severity="error") == 1
    assert value(got, "kvm_completion_userspace_exits_total", vm="web01",
                 exit_reason="KVM_EXIT_IO") == 1
    assert value(got, "kvm_completion_pending_vcpus", vm="web01") == 1
    assert value(got, "kvm_completion_vcpus", vm="web01") == 1
    assert value(got, "kvm_completion_vm_info", vm="web01", pid=str(PID), vmm="qemu",
                 uuid="") == 1
    oldest = value(got, "kvm_completion_pending_oldest_seconds", vm="web01")
    assert oldest is not None and oldest > 0
    rig.run(5, HLT)  # completes the OUT: the window of two saves is a snapshot
    got = rig.scrape()
    assert value(got, "kvm_completion_snapshots_total", vm="web01") == 1
    assert value(got, "kvm_completion_pending_vcpus", vm="web01") == 0
    assert value(got, "kvm_completion_pending_oldest_seconds", vm="web01") == 0
    assert value(got, "kvm_completion_completions_total", vm="web01", path="reentry") == 1


def test_self_health_series() -> None:
    rig = Rig()
    rig.health.ringbuf_polls, rig.health.last_poll_unix = 12, 1700000000.5
    got = rig.scrape()
    assert value(got, "kvm_completion_probes_expected") == 2
    assert value(got, "kvm_completion_probes_attached") == 1
    assert value(got, "kvm_completion_probe_attached", probe="syscalls:sys_enter_ioctl") == 0
    assert value(got, "kvm_completion_events_lost_total", event_type="violation") == 2
    assert value(got, "kvm_completion_map_full_total", map="vcpu") == 0
    assert value(got, "kvm_completion_untracked_exits_total") == 7
    for reason, n in (("stack_map_full", 4), ("stack_failed", 1), ("user_stack_failed", 2),
                      ("user_stack_dropped", 3)):
        assert value(got, "kvm_completion_stacks_missed_total", reason=reason) == n
    # A taken stack bucket costs a stack, not tracking: not a full map for the MapFull alert
    # (which says violations go unseen).
    assert value(got, "kvm_completion_map_full_total", map="stack") is None
    # lost_windows is a map, not an event type, whatever its name starts with.
    assert value(got, "kvm_completion_map_full_total", map="lost_window") == 5
    assert {dict(labels)["event_type"] for name, labels in got
            if name == "kvm_completion_events_lost_total"} == {"violation"}
    assert value(got, "kvm_completion_ringbuf_polls_total") == 12
    assert value(got, "kvm_completion_last_poll_timestamp_seconds") == 1700000000.5
    import platform

    from tracer import __version__

    assert value(got, "kvm_completion_build_info", version=__version__, bcc_version="0.26.0",
                 python_version=platform.python_version()) == 1


@pytest.mark.parametrize("name", ['we"b\\01', "line\nbreak", "{x=\"y\"}", "naïve vm", ""])
def test_any_vm_name_keeps_the_exposition_valid(name: str) -> None:
    rig = Rig({PID: name})
    rig.vcpu(fd=5)
    rig.run(5, IO, OUT)
    rig.ioctl(5, GET_REGS)
    got = rig.scrape()  # parses
    assert value(got, "kvm_completion_violations_total", vm=name, kind="save",
                 ioctl="KVM_GET_REGS", exit_reason="KVM_EXIT_IO", severity="error") == 1


def test_histogram_is_cumulative_and_ends_with_the_count() -> None:
    rig = Rig({PID: "vm"})
    rig.vcpu(fd=5)
    counters = next(iter(rig.model.vcpus.values())).counters
    counters.pending_hist[3] = 5  # under 1 us: the first bucket
    counters.pending_hist[13] = 2  # 4-8 us
    counters.pending_hist[HIST_SLOTS - 1] = 1  # the clamped slot: +Inf only
    counters.pending_ns_sum = 40_000_000_000
    got = rig.scrape()
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in got.items()
                     if k[0] == "kvm_completion_pending_seconds_bucket")
    values = [v for _, v in buckets]
    assert values == sorted(values) and values[0] == 5 and values[-1] == 8
    assert buckets[-1][0] == float("inf") and buckets[-2][1] == 7
    assert dict(buckets)[2**13 / 1e9] == 7
    assert value(got, "kvm_completion_pending_seconds_count", vm="vm") == 8
    assert value(got, "kvm_completion_pending_seconds_sum", vm="vm") == 40.0


def test_counters_do_not_go_back_when_a_vcpu_closes_or_its_process_exits() -> None:
    rig = Rig({PID: "vm"})
    rig.vcpu(fd=5)
    rig.vcpu(fd=6, vcpu_id=1)
    for _ in range(3):
        rig.run(5, IO, OUT)
        rig.run(6, HLT)
    before = value(rig.scrape(), "kvm_completion_userspace_exits_total", vm="vm",
                   exit_reason="KVM_EXIT_IO")
    rig.model.close(PID, TID, 5)
    closed_not_yet_read = rig.scrape()  # CLOSED entry still in the map: counted once
    rig.flush()
    after_close = rig.scrape()
    rig.model.process_exit(PID)
    rig.flush()
    after_exit = rig.scrape()
    for got in (closed_not_yet_read, after_close, after_exit):
        assert value(got, "kvm_completion_userspace_exits_total", vm="vm",
                     exit_reason="KVM_EXIT_IO") == before == 3
        assert value(got, "kvm_completion_userspace_exits_total", vm="vm",
                     exit_reason="KVM_EXIT_HLT") == 3
    assert value(after_close, "kvm_completion_vcpus", vm="vm") == 1
    assert value(after_exit, "kvm_completion_vcpus", vm="vm") is None  # no live vCPU


def test_scrape_while_the_probes_fail_or_are_closed_is_still_valid() -> None:
    rig = Rig({PID: "vm"})
    rig.vcpu(fd=5)
    rig.run(5, IO, OUT)
    rig.ioctl(5, GET_REGS)
    rig.probes.fail = True
    got = rig.scrape()
    assert value(got, "kvm_completion_scrape_errors_total") == 1
    assert value(got, "kvm_completion_violations_total", vm="vm", kind="save",
                 ioctl="KVM_GET_REGS", exit_reason="KVM_EXIT_IO", severity="error") == 1
    rig.probes.fail = False
    rig.health.probes_closed = True
    got = rig.scrape()
    assert value(got, "kvm_completion_scrape_errors_total") == 1  # closed is not an error
    assert value(got, "kvm_completion_probes_attached") == 0


def test_per_vcpu_series_are_opt_in_and_capped() -> None:
    rig = Rig({PID: "vm"})
    for i in range(5):
        rig.vcpu(fd=5 + i, vcpu_id=i)
    assert not any(k[0] == "kvm_completion_vcpu_pending" for k in rig.scrape())
    capped = Rig({PID: "vm"}, per_vcpu=True, max_vcpu_series=3)
    for i in range(5):
        capped.vcpu(fd=5 + i, vcpu_id=i)
    capped.run(5, IO, OUT)
    got = capped.scrape()
    assert sorted(dict(k[1])["vcpu"] for k in got if k[0] == "kvm_completion_vcpu_pending") \
        == ["0", "1", "2"]
    assert value(got, "kvm_completion_vcpu_pending", vm="vm", pid=str(PID), vcpu="0") == 1
    assert value(got, "kvm_completion_vcpu_series_dropped") == 2


def test_static_labels_go_on_every_series() -> None:
    rig = Rig({PID: "vm"})
    rig.health.labels = {"cluster": "eu-1"}
    rig.vcpu(fd=5)
    rig.run(5, IO, OUT)
    got = rig.scrape()
    assert value(got, "kvm_completion_vcpus", vm="vm", cluster="eu-1") == 1
    assert all(dict(k[1]).get("cluster") == "eu-1" for k in got)


def test_guest_exits_are_named_per_isa() -> None:
    rig = Rig({PID: "vm"})
    rig.probes.guest = {(PID, 0, 1, 30): 4, (PID, 1, 1, 30): 1, (PID, 0, 2, 0x7B): 2}
    got = rig.scrape()
    assert value(got, "kvm_completion_guest_exits_total", vm="vm", isa="vmx",
                 reason="IO_INSTRUCTION") == 5
    assert value(got, "kvm_completion_guest_exits_total", vm="vm", isa="svm",
                 reason="IOIO") == 2


def test_retired_counts_are_added_to_the_live_ones() -> None:
    rig = Rig({PID: "vm"})
    extra = VcpuCounters()
    extra.exits[IO] = 10
    rig.tracker.ledger.retire("vm", extra)
    rig.vcpu(fd=5)
    rig.run(5, IO, OUT)
    assert value(rig.scrape(), "kvm_completion_userspace_exits_total", vm="vm",
                 exit_reason="KVM_EXIT_IO") == 11


def _counter_samples(got: dict[tuple[str, tuple[tuple[str, str], ...]], float],
                     vm: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {k: v for k, v in got.items()
            if k[0].endswith(("_total", "_bucket", "_count", "_sum")) and ("vm", vm) in k[1]}


def test_two_processes_with_one_vm_name_give_one_series_each() -> None:
    # Two `qemu -name guest=x` on one host (or a restarted VM whose old process lingers).
    rig = Rig({PID: "x", OTHER: "x"}, per_vcpu=True)
    for pid in (PID, OTHER):
        rig.vcpu(fd=5, vcpu_id=0, pid=pid)
        rig.run(5, IO, OUT, pid=pid)
    rig.probes.guest = {(PID, 0, 1, 30): 4, (OTHER, 0, 1, 30): 3}
    got = rig.scrape()  # no duplicate series (Rig.scrape checks)
    assert value(got, "kvm_completion_vcpu_pending", vm="x", pid=str(PID), vcpu="0") == 1
    assert value(got, "kvm_completion_vcpu_pending", vm="x", pid=str(OTHER), vcpu="0") == 1
    assert value(got, "kvm_completion_pending_vcpus", vm="x") == 2
    assert value(got, "kvm_completion_vcpus", vm="x") == 2
    assert value(got, "kvm_completion_userspace_exits_total", vm="x",
                 exit_reason="KVM_EXIT_IO") == 2
    assert value(got, "kvm_completion_guest_exits_total", vm="x", isa="vmx",
                 reason="IO_INSTRUCTION") == 7
    for pid in (PID, OTHER):
        assert value(got, "kvm_completion_vm_info", vm="x", pid=str(pid), vmm="qemu",
                     uuid="") == 1


def test_a_shared_vm_names_counters_stay_monotonic_when_one_process_exits() -> None:
    rig = Rig({PID: "x", OTHER: "x"})
    for pid in (PID, OTHER):
        rig.vcpu(fd=5, vcpu_id=0, pid=pid)
        rig.run(5, IO, OUT, pid=pid)
        rig.ioctl(5, GET_REGS, pid=pid)
        rig.run(5, HLT, pid=pid)
    rig.probes.guest = {(PID, 0, 1, 30): 4, (OTHER, 0, 1, 30): 3, (OTHER, 0, 1, 12): 2}
    before = _counter_samples(rig.scrape(), "x")
    assert len(before) > 20  # exits, completions, histogram, violations, guest exits
    rig.exit_process(OTHER)
    rig.probes.guest[(PID, 0, 1, 30)] = 5
    after = _counter_samples(rig.scrape(), "x")
    assert set(after) == set(before)
    assert all(after[k] >= v for k, v in before.items()), {
        k: (v, after[k]) for k, v in before.items() if after[k] < v}
    assert value(after, "kvm_completion_guest_exits_total", vm="x", isa="vmx",
                 reason="IO_INSTRUCTION") == 8  # 5 live + the 3 of the process gone
    assert value(after, "kvm_completion_guest_exits_total", vm="x", isa="vmx",
                 reason="HLT") == 2


def test_guest_exit_counts_of_gone_processes_are_kept_then_pruned() -> None:
    rig = Rig({PID: "vm"})
    rig.vcpu(fd=5)
    rig.probes.guest = {(PID, 0, 1, 30): 9}
    rig.scrape()
    rig.probes.guest = {(PID, 0, 1, 30): 2}  # the pid was reused between two scrapes
    io = {"vm": "vm", "isa": "vmx", "reason": "IO_INSTRUCTION"}
    assert value(rig.scrape(), "kvm_completion_guest_exits_total", **io) == 11
    rig.probes.fail = True  # an unreadable map keeps the last counts, not zero
    assert value(rig.scrape(), "kvm_completion_guest_exits_total", **io) == 11
    rig.probes.fail = False
    rig.exit_process(PID)
    assert value(rig.scrape(), "kvm_completion_guest_exits_total", **io) == 11
    assert rig.tracker.prune_gone(0.0) == ["vm"]  # retain_gone_s over: the VM's series go
    assert value(rig.scrape(), "kvm_completion_guest_exits_total", **io) is None


# --- /-/ready and /-/healthy -----------------------------------------------------------------


def test_readiness_and_liveness_through_the_lifecycle() -> None:
    health = ExporterHealth()
    assert readiness(health, 0.0) == (False, "not ready: compiling and attaching the probes")
    assert liveness(health, 0.0) == (False, "event loop not started: compiling and attaching "
                                            "the probes")
    health.expected_probes = EXPECTED
    health.stall_after_s = 10.0
    health.mark_ready(EXPECTED[:1], 100.0)
    assert readiness(health, 100.0) == (False, "not ready: probes not attached: "
                                               "syscalls:sys_enter_ioctl")
    health.mark_ready(EXPECTED, 100.0)
    assert readiness(health, 101.0) == (True, "ready: watching, 2 probes attached")
    assert liveness(health, 110.0) == (True, "healthy: last ring-buffer poll 10.0 s ago")
    stalled = (False, "event loop stalled: last ring-buffer poll 10.5 s ago (limit 10 s)")
    assert liveness(health, 110.5) == stalled
    assert readiness(health, 110.5) == (False, f"not ready: {stalled[1]}")
    health.loop_beat = 110.0
    assert readiness(health, 110.5)[0] and liveness(health, 110.5)[0]
    health.stopping = True
    assert readiness(health, 110.5) == (False, "not ready: stopping")
    assert liveness(health, 110.5)[0]  # still alive: restarting it would not help


def _call(app: Any, path: str, method: str = "GET") -> tuple[str, dict[str, str], bytes]:
    from wsgiref.util import setup_testing_defaults

    environ: dict[str, Any] = {"PATH_INFO": path, "REQUEST_METHOD": method}
    setup_testing_defaults(environ)
    got: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        got["status"], got["headers"] = status, dict(headers)

    body = b"".join(app(environ, start_response))
    return got["status"], got["headers"], body


def test_health_paths_are_routed_before_the_metrics() -> None:
    def metrics_app(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [f"metrics for {environ['PATH_INFO']}".encode()]

    now = [0.0]
    health = ExporterHealth(expected_probes=EXPECTED)
    app = with_health(metrics_app, health, clock=lambda: now[0])
    status, headers, body = _call(app, "/-/ready")
    assert status == "503 Service Unavailable"
    assert body == b"not ready: compiling and attaching the probes\n"
    assert headers["Content-Length"] == str(len(body))
    assert _call(app, "/-/healthy")[0].startswith("503")
    health.mark_ready(EXPECTED, 0.0)
    now[0] = 1.0
    assert _call(app, "/-/ready")[:3:2] == ("200 OK", b"ready: watching, 2 probes attached\n")
    assert _call(app, "/-/healthy")[0] == "200 OK"
    head = _call(app, "/-/healthy", "HEAD")
    assert head[0] == "200 OK" and head[2] == b"" and int(head[1]["Content-Length"]) > 0
    assert _call(app, "/-/ready", "POST")[0] == "405 Method Not Allowed"
    for path in ("/metrics", "/", "/-/readyz", "/-/ready/"):
        assert _call(app, path) == ("200 OK", {"Content-Type": "text/plain"},
                                    f"metrics for {path}".encode())


@pytest.mark.parametrize(("addr", "expected"), [
    ("127.0.0.1:9110", ("127.0.0.1", 9110)),
    ("[::1]:80", ("::1", 80)),
    ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ("localhost:1", ("localhost", 1)),
])
def test_parse_addr(addr: str, expected: tuple[str, int]) -> None:
    assert parse_addr(addr) == expected


@pytest.mark.parametrize(("addr", "message"), [
    ("9110", "expected HOST:PORT"),
    (":9110", "the host is missing"),
    ("127.0.0.1:0", "must be a number from 1 to 65535"),
    ("127.0.0.1:http", "must be a number from 1 to 65535"),
    ("::1:9110", "IPv6 address in brackets"),
    ("[::1:9110", "expected \\[IPV6\\]:PORT"),
    ("[nope]:1", "not an IPv6 address"),
    ("bad host:1", "not a host name"),
])
def test_parse_addr_rejects(addr: str, message: str) -> None:
    with pytest.raises(MetricsConfigError, match=message):
        parse_addr(addr)


def test_a_taken_port_is_one_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsConfigError, match="Address already in use; another process"):
            start_server(f"127.0.0.1:{port}", CollectorRegistry())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_the_server_serves_and_stops() -> None:
    port = _free_port()
    rig = Rig({PID: "vm"})
    stop = start_server(f"127.0.0.1:{port}", rig.registry)
    try:
        status, body = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and "kvm_completion_build_info" in body
        # Without a health state (the selftest's exporter) every path is the metrics.
        assert "kvm_completion_build_info" in _get(f"http://127.0.0.1:{port}/-/ready")[1]
    finally:
        stop()
    with pytest.raises(OSError):
        _get(f"http://127.0.0.1:{port}/metrics")


def test_the_exporter_threads_run_above_the_loop_when_permitted() -> None:
    """A scrape's thread asks for the CPU at HTTP_NICE: on a host whose CPUs are busy (a
    hypervisor's vCPUs at nice 0) it is scheduled ahead of them and takes the GIL from the
    ring's reader at once, instead of once per scheduler round at each of its GIL hand-overs."""
    import os

    from prometheus_client.registry import Collector

    from tracer.metrics import HTTP_NICE

    seen: list[int] = []

    class NiceProbe(Collector):
        def collect(self) -> Any:
            seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
            return []

    registry = CollectorRegistry()
    registry.register(NiceProbe())
    port = _free_port()
    stop = start_server(f"127.0.0.1:{port}", registry)
    try:
        assert _get(f"http://127.0.0.1:{port}/metrics")[0] == 200
    finally:
        stop()
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    permitted = os.geteuid() == 0  # CAP_SYS_NICE: the daemon runs as root
    assert seen == [HTTP_NICE if permitted else ours]
    assert os.getpriority(os.PRIO_PROCESS, 0) == ours  # the loop's thread keeps its own


def test_the_server_answers_health_over_http() -> None:
    import time

    port = _free_port()
    rig = Rig({PID: "vm"})
    stop = start_server(f"127.0.0.1:{port}", rig.registry, rig.health)
    try:
        base = f"http://127.0.0.1:{port}"
        assert _get(f"{base}/-/ready") == (503, "not ready: compiling and attaching the probes\n")
        assert _get(f"{base}/-/healthy")[0] == 503
        rig.health.mark_ready(EXPECTED, time.monotonic())
        assert _get(f"{base}/-/ready") == (200, "ready: watching, 2 probes attached\n")
        assert _get(f"{base}/-/healthy")[0] == 200
        rig.health.stopping = True
        assert _get(f"{base}/-/ready") == (503, "not ready: stopping\n")
        status, body = _get(f"{base}/metrics")
        assert status == 200 and "kvm_completion_build_info" in body
    finally:
        stop()


# ---- exact violation counts when the ring buffer drops events ------------------------------

def _lossy_saves(rig: Rig, n: int, delivered: int) -> None:
    """``n`` mid-completion KVM_GET_REGS in one window, of which the ring delivers the first
    ``delivered`` (the model counts every report in mid_counts, as the kernel does)."""
    rig.run(5, IO, OUT)
    for _ in range(n):
        rig.model.ioctl_enter(PID, PID + 1, 5, GET_REGS)
        rig.model.ioctl_exit(PID, PID + 1, 0)
    events = rig.model.drain()
    reports = [ev for ev in events if ev.type.name == "VIOLATION"]
    dropped = {id(ev) for ev in reports[delivered:]}
    for ev in events:
        if id(ev) not in dropped:
            rig.tracker.handle(ev)
    rig.probes.lost = n - delivered


def test_violations_stay_exact_when_the_ring_drops_their_events() -> None:
    rig = Rig({PID: "web01"})
    rig.vcpu(fd=5)
    _lossy_saves(rig, 50, 16)
    got = rig.scrape()
    labels = dict(vm="web01", kind="save", ioctl="KVM_GET_REGS", exit_reason="KVM_EXIT_IO",
                  severity="error")
    assert value(got, "kvm_completion_violations_total", **labels) == 50
    assert value(got, "kvm_completion_alerts_lost_total", vm="web01") == 34
    assert len(rig.sink.violations) == 16  # the detail lines that did arrive
    # after the process is gone its counts stay, under its name, and never go down
    rig.exit_process(PID)
    got = rig.scrape()
    assert value(got, "kvm_completion_violations_total", **labels) == 50
    assert value(got, "kvm_completion_alerts_lost_total", vm="web01") == 34


def test_no_loss_means_the_tracker_verdicts_alone() -> None:
    rig = Rig({PID: "web01"})
    rig.vcpu(fd=5)
    _lossy_saves(rig, 5, 5)
    got = rig.scrape()
    assert value(got, "kvm_completion_violations_total", vm="web01", kind="save",
                 ioctl="KVM_GET_REGS", exit_reason="KVM_EXIT_IO", severity="error") == 5
    assert value(got, "kvm_completion_alerts_lost_total", vm="web01") is None


def test_reports_in_flight_are_not_counted_as_lost() -> None:
    """Counted by the kernel, sent, not yet handled when Prometheus scrapes: with no event lost
    (the kernel's lost counter 0) none of them is added, so nothing is counted twice later."""
    rig = Rig({PID: "web01"})
    rig.vcpu(fd=5)
    _lossy_saves(rig, 5, 2)
    rig.probes.lost = 0
    got = rig.scrape()
    assert value(got, "kvm_completion_violations_total", vm="web01", kind="save",
                 ioctl="KVM_GET_REGS", exit_reason="KVM_EXIT_IO", severity="error") == 2


class GoneProc(NamedProc):
    """NamedProc whose ``gone`` pids have no /proc any more (as vmident then says)."""

    def __init__(self) -> None:
        super().__init__({})
        self.gone: set[int] = set()

    def identify(self, pid: int) -> VmIdentity:
        if pid in self.gone:
            return unavailable_identity(pid, None)
        return super().identify(pid)

    def alive(self, pid: int, start_time: int) -> bool:
        return pid not in self.gone


def _vm_labels(got: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, set[str]]:
    """vm label values by family."""
    out: dict[str, set[str]] = {}
    for name, labels in got:
        for key, val in labels:
            if key == "vm":
                out.setdefault(name, set()).add(val)
    return out


def test_a_process_gone_before_its_events_arrive_has_one_name_in_every_family() -> None:
    """A stalled reader: the VMM made a vCPU, snapshotted mid-completion and exited before the
    daemon read any of it. A scrape names it from the kernel's counts first; its events (with a
    thread's comm) come later. Every family and every alert must use one name, the comm the
    kernel kept at vCPU creation, not unknown[PID] in one family and <comm>[PID] in another."""
    rig = Rig()
    proc = GoneProc()
    rig.tracker.proc = proc
    kernel_comms = {PID: "c_vmm"}
    rig.model.vcpu_comms = lambda: dict(kernel_comms)  # type: ignore[method-assign]
    rig.model.ioctl_enter(PID, PID + 1, VM_FD, abi.KVM_CREATE_VCPU, 0)
    rig.model.ioctl_exit(PID, PID + 1, 5)
    rig.model.ioctl_enter(PID, PID + 1, 5, abi.KVM_RUN)
    rig.model.userspace_exit(PID + 1, IO, 0, OUT)
    for cmd in (GET_REGS, GET_SREGS, GET_REGS):
        rig.model.ioctl_enter(PID, PID + 1, 5, cmd)
        rig.model.ioctl_exit(PID, PID + 1, 0)
    rig.model.process_exit(PID)
    stalled = rig.model.drain()
    proc.gone.add(PID)
    rig.probes.lost = len(stalled)

    first = _vm_labels(rig.scrape())  # named from mid_counts only: nothing handled yet
    assert first["kvm_completion_violations_total"] == {f"c_vmm[{PID}]"}, first
    for ev in stalled:  # the ring buffer drains at last (its events' comm is "vmm")
        rig.tracker.handle(ev)
    rig.tracker.sweep()
    kernel_comms.clear()  # the vCPU entries were released with the process
    rig.tracker.handle(stalled[-1])  # a late duplicate exit, as a second reader pass sees it
    got = rig.scrape()
    names = set().union(*_vm_labels(got).values())
    assert names == {f"c_vmm[{PID}]"}, _vm_labels(got)
    assert value(got, "kvm_completion_snapshots_total", vm=f"c_vmm[{PID}]") == 1
    alerts = [*rig.sink.violations, *rig.sink.snapshots]
    assert alerts and {a.vm for a in alerts} == {f"c_vmm[{PID}]"}


def test_a_pid_alive_again_is_a_new_process_with_its_own_name() -> None:
    rig = Rig()
    proc = GoneProc()
    rig.tracker.proc = proc
    proc.gone.add(PID)
    assert rig.tracker.identity(PID, "old").name == f"old[{PID}]"
    assert rig.tracker.identity(PID, "other").name == f"old[{PID}]"  # not renamed
    proc.gone.discard(PID)  # the pid now runs a new, live process
    assert rig.tracker.identity(PID).name == f"vm-{PID}"
