"""The daemon as operators run it (``kvm-completion-tracer run``), real probes, real guests.

One daemon process per module; each test runs the built-in VMM as a separate process and holds
the daemon's JSON alert lines for that pid against the VMM's own record of what it did.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import requires_kvm_bpf
from daemon_proc import DaemonProcess, run_vmm

from tracer.selftest import compare, expected_snapshots
from tracer.vmm.report import ScenarioReport

pytestmark = [pytest.mark.e2e, requires_kvm_bpf]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    d = DaemonProcess()
    yield d
    assert d.stop() == 0
    assert d.lines()[-1]["event"] == "stopped"
    d.cleanup()


def verdicts(d: DaemonProcess, report: ScenarioReport) -> list[str]:
    d.settle()
    return compare(report, d.for_pid(report.pid, "completion_violation"),
                   d.for_pid(report.pid, "completion_sanctioned"),
                   len(d.for_pid(report.pid, "completion_snapshot")))


@pytest.mark.parametrize("scenario", [
    "buggy-io-out", "buggy-io-in", "buggy-mmio-write", "buggy-mmio-read", "buggy-rdmsr",
    "buggy-wrmsr", "buggy-other-thread", "save-while-running", "restore-mmio", "dup-fd",
    "dup2-fd", "dup3-fd", "port-7e-quirk-disabled", "restore-pio-in", "restore-pio-rep-ins",
])
def test_buggy_vmm_gets_exactly_the_expected_alerts(daemon: DaemonProcess,
                                                    scenario: str) -> None:
    report = run_vmm(scenario)
    assert report.violations, "the scenario must actually misbehave"
    assert verdicts(daemon, report) == []


@pytest.mark.parametrize("scenario", [
    "correct-io", "correct-mmio", "correct-msr", "hlt", "eintr", "fd-reuse", "port-7e",
    "restore-pio", "restore-pio-rep-outs", "save-while-running-kicked",
])
def test_correct_vmm_gets_no_alert(daemon: DaemonProcess, scenario: str) -> None:
    report = run_vmm(scenario)
    assert sum(report.exits.values()) > 0
    assert verdicts(daemon, report) == []
    assert daemon.for_pid(report.pid, "completion_violation") == []


def test_save_that_waited_for_a_running_vcpu_is_judged_at_its_return(
        daemon: DaemonProcess) -> None:
    report = run_vmm("save-while-running", 2)
    daemon.settle()
    lines = daemon.for_pid(report.pid, "completion_violation")
    at_return = [e for e in lines if e["detected_at"] == "ioctl_return"]
    # The first ioctl of each snapshot entered while KVM_RUN held the vCPU.
    assert len(at_return) == report.iterations
    assert {e["ioctl"] for e in at_return} == {report.violations[0].ioctl}
    assert verdicts(daemon, report) == []


def test_violation_line_has_every_field(daemon: DaemonProcess) -> None:
    report = run_vmm("buggy-mmio-write", 1)
    daemon.settle()
    first = daemon.for_pid(report.pid, "completion_violation")[0]
    want = report.violations[0]
    assert first["level"] == "error" and first["timestamp"].endswith("Z")
    assert (first["tid"], first["vcpu_id"], first["vcpu_fd"]) == (
        want.tid, want.vcpu_id, want.vcpu_fd)
    assert (first["exit_reason"], first["ioctl"], first["kind"]) == (
        "KVM_EXIT_MMIO", want.ioctl, "save")
    assert int(first["access"]["gpa"], 16) == want.gpa
    assert first["access"]["direction"] == "write"
    assert first["comm"] and first["vm"] and first["rule"] == "save-mid-completion"
    assert "immediate_exit=1" in first["reason"]
    # pending_ns is measured in the kernel from the exit to the ioctl: the VMM's own clock
    # (the same CLOCK_MONOTONIC) brackets it.
    assert 0 < first["pending_ns"] <= want.ts_ns - want.pending_since_ns + 5_000_000
    [snap] = daemon.for_pid(report.pid, "completion_snapshot")
    assert snap["level"] == "critical"
    assert snap["ioctls"] == [v.ioctl for v in report.violations]


def test_several_vms_with_several_vcpus_in_parallel(daemon: DaemonProcess) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for n in range(3):
            path = Path(tmp) / f"r{n}.json"
            procs.append((path, subprocess.Popen(
                [sys.executable, "-m", "tracer.vmm", "multi", "--iterations", "5", "--vms",
                 "2", "--vcpus", "3", "--report", str(path)], cwd=REPO)))
        reports = []
        for path, proc in procs:
            assert proc.wait(timeout=120) == 0
            reports.append(ScenarioReport.from_json(path.read_text()))
    assert len({r.pid for r in reports}) == 3
    for report in reports:
        assert len(report.violations) > 0 and expected_snapshots(report) > 0
        assert verdicts(daemon, report) == []


def test_process_exit_with_a_pending_exit_leaves_nothing_behind(daemon: DaemonProcess) -> None:
    report = run_vmm("process-exit", 1)
    assert report.pending_at_end, "the VMM must exit with a completion still owed"
    daemon.settle()
    [gone] = daemon.for_pid(report.pid, "process_exit")
    assert gone["vcpus"] == len(report.vcpus)


def test_policy_is_applied_in_the_kernel() -> None:
    """A negative control: with KVM_EXIT_IO ignored, the probes open no window for port
    exits, so the same buggy VMM that is caught above raises nothing."""
    d = DaemonProcess("--ignore-exit", "KVM_EXIT_IO")
    try:
        ready = d.wait_for(lambda e: e["event"] == "ready")
        assert "KVM_EXIT_IO" not in ready["policy"]["pending_exits"]
        report = run_vmm("buggy-io-out", 2)
        mmio = run_vmm("buggy-mmio-write", 1)
        d.settle()
        assert report.violations and d.for_pid(report.pid, "completion_violation") == []
        assert len(d.for_pid(mmio.pid, "completion_violation")) == len(mmio.violations)
    finally:
        assert d.stop() == 0
        d.cleanup()


def test_vm_that_predates_the_daemon_is_adopted_and_judged() -> None:
    """The VMM creates its vCPU (fd open, kvm_run mapped) before the daemon starts; the daemon
    finds it in /proc, and the saves that follow are judged like any other."""
    with tempfile.TemporaryDirectory() as tmp:
        gate, path = Path(tmp) / "gate", Path(tmp) / "report.json"
        vmm = subprocess.Popen([sys.executable, "-m", "tracer.vmm", "buggy-mmio-read",
                                "--iterations", "2", "--gate", str(gate), "--report",
                                str(path)], cwd=REPO)
        deadline = time.monotonic() + 30
        while not Path(f"{gate}.ready").exists():
            assert vmm.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        d = DaemonProcess()
        try:
            ready = d.wait_for(lambda e: e["event"] == "ready")
            assert ready["vcpus_adopted"] >= 1
            gate.touch()
            assert vmm.wait(timeout=60) == 0
            report = ScenarioReport.from_json(path.read_text())
            assert report.violations and verdicts(d, report) == []
            first = d.for_pid(report.pid, "completion_violation")[0]
            assert first["access"]["direction"] == "read"  # kvm_run found through /proc maps
        finally:
            assert d.stop() == 0
            d.cleanup()


def test_ready_lists_every_probe(daemon: DaemonProcess) -> None:
    ready = next(e for e in daemon.lines() if e["event"] == "ready")
    for probe in ("raw:kvm_userspace_exit", "syscalls:sys_enter_ioctl", "syscalls:sys_exit_ioctl",
                  "syscalls:sys_enter_close", "sched:sched_process_exit", "kvm:kvm_exit",
                  "kvm:kvm_entry"):
        assert probe in ready["probes"]
    assert "raw:sys_enter" not in ready["probes"]


@pytest.fixture(scope="module")
def raw_daemon() -> Iterator[DaemonProcess]:
    d = DaemonProcess("--syscall-probes", "raw")
    yield d
    assert d.stop() == 0
    d.cleanup()


@pytest.mark.parametrize("scenario", [
    "buggy-io-out", "buggy-mmio-read", "buggy-other-thread", "save-while-running", "dup-fd",
    "dup2-fd", "dup3-fd", "restore-mmio", "correct-io", "fd-reuse", "save-while-running-kicked",
])
def test_raw_syscall_probes_reach_the_same_verdicts(raw_daemon: DaemonProcess,
                                                    scenario: str) -> None:
    """raw_syscalls sys_enter/sys_exit (--syscall-probes raw) feed the same handlers as the
    per-syscall tracepoints, from the saved registers: same alerts."""
    ready = next(e for e in raw_daemon.lines() if e["event"] == "ready")
    assert {"raw:sys_enter", "raw:sys_exit"} <= set(ready["probes"])
    assert not any(p.startswith("syscalls:") for p in ready["probes"])
    report = run_vmm(scenario)
    assert verdicts(raw_daemon, report) == []


def test_reused_pid_inherits_no_pending_exit(daemon: DaemonProcess) -> None:
    """A VMM exits with a completion owed; a new VMM is given the same pid (ns_last_pid) and the
    same fd numbers, and saves after completing properly: no alert may name it."""
    old = run_vmm("process-exit", 1)
    assert old.pending_at_end
    daemon.settle()
    ns_last_pid = Path("/proc/sys/kernel/ns_last_pid")
    for _ in range(5):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "report.json"
            ns_last_pid.write_text(str(old.pid - 1))
            proc = subprocess.Popen([sys.executable, "-m", "tracer.vmm", "correct-io",
                                     "--iterations", "3", "--report", str(path)], cwd=REPO)
            assert proc.wait(timeout=60) == 0
            new = ScenarioReport.from_json(path.read_text())
        if new.pid == old.pid:
            break
    assert new.pid == old.pid, "could not get the pid reused"
    assert {v.fd for v in new.vcpus} & {v.fd for v in old.vcpus}
    assert verdicts(daemon, new) == []
    assert daemon.for_pid(new.pid, "completion_violation") == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("when", ["starting", "ready"])
def test_signals_detach_cleanly_and_exit_zero(sig: int, when: str, tmp_path: Path) -> None:
    """While the probes are still compiling (after ``starting``) or after ``ready``. Its own
    state dir: the host's may hold another instance's lock or hand-over."""
    proc = subprocess.Popen([sys.executable, "-m", "tracer", "run", "--log-format", "json",
                             "--state-dir", str(tmp_path / "state"), "--no-metrics"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        seen = [json.loads(proc.stdout.readline() or "{}").get("event")]
        assert seen == ["starting"], proc.stderr.read() if proc.stderr else ""
        while when == "ready" and seen[-1] != "ready":
            line = proc.stdout.readline()
            assert line, f"no ready line; saw {seen}"
            seen.append(json.loads(line)["event"])
        # a fresh state dir: nothing to warn about on the way to ready
        assert seen in (["starting"], ["starting", "ready"]), seen
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert json.loads(out.splitlines()[-1])["event"] == "stopped"


def test_selftest_command_passes_here() -> None:
    done = subprocess.run([sys.executable, "-m", "tracer", "selftest", "--iterations", "1",
                           "--log-format", "json"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1].startswith("selftest: ") and lines[-1].endswith(" failed")
    from tracer.selftest import SELFTEST_SCENARIOS

    assert lines[-1] == f"selftest: {len(SELFTEST_SCENARIOS)} passed, 0 failed"
    assert sum(line.startswith("ok   ") for line in lines) == len(SELFTEST_SCENARIOS)


def test_every_event_the_ring_cannot_take_is_counted_and_reported() -> None:
    """A one-page ring and a daemon frozen (SIGSTOP) while a buggy VMM fires hundreds of
    violations: what the ring delivered plus what the probes counted as lost is all of them."""
    d = DaemonProcess("--ringbuf-pages", "1")
    try:
        d.proc.send_signal(signal.SIGSTOP)
        try:
            report = run_vmm("buggy-io-out", 40)
        finally:
            d.proc.send_signal(signal.SIGCONT)
        lost = d.wait_for(lambda e: e["event"] == "events_lost", timeout_s=15)
        d.settle()
        delivered = len(d.for_pid(report.pid, "completion_violation"))
        assert 0 < delivered < len(report.violations)
        assert delivered + lost["by_type"]["violation"] == len(report.violations)
        assert lost["total"] == lost["lost"] == sum(lost["by_type"].values())
        assert "--ringbuf-pages" in lost["hint"]
        # The VMM was gone before the daemon read anything: its VM keeps the name of the comm
        # the kernel saw at vCPU creation, never unknown[PID], in alerts and in every series:
        # one name for the process, whichever path (an alert, a snapshot counted from the
        # kernel, a scrape of counts known only from the kernel) named it first.
        names = {e["vm"] for event in ("completion_violation", "completion_snapshot")
                 for e in d.for_pid(report.pid, event)}
        assert len(names) == 1 and not next(iter(names)).startswith("unknown["), names
        samples = scrape(d.metrics_url)
        by_family: dict[str, set[str]] = {}
        for name, labels in samples:
            vm, pid = dict(labels).get("vm"), dict(labels).get("pid")
            if vm and (vm.endswith(f"[{report.pid}]") or pid == str(report.pid)):
                by_family.setdefault(name, set()).add(vm)
        ours = set().union(*by_family.values())
        assert ours == names, by_family
        assert {"kvm_completion_violations_total",
                "kvm_completion_snapshots_total"} <= set(by_family), by_family
        # The counter the alert rules use is exact: counted in the kernel, lost detail or not.
        (vm,) = ours
        counted = sum(v for (name, labels), v in samples.items()
                      if name == "kvm_completion_violations_total" and dict(labels)["vm"] == vm)
        assert counted == len(report.violations)
        lost_alerts = sum(v for (name, labels), v in samples.items()
                          if name == "kvm_completion_alerts_lost_total"
                          and dict(labels)["vm"] == vm)
        assert lost_alerts == len(report.violations) - delivered
    finally:
        assert d.stop() == 0
        d.cleanup()


def test_snapshots_and_sanctioned_stay_exact_when_the_ring_drops_their_events() -> None:
    """The same frozen daemon and one-page ring, with a buggy VMM whose every window is a
    snapshot and a correct QEMU-style port-0x7e sync whose every state ioctl is sanctioned: the
    snapshot and sanctioned counters come out exact (the kernel's counts of lost windows and of
    every report's port), and not one of the sanctioned reports is counted as a violation."""
    d = DaemonProcess("--ringbuf-pages", "1")
    try:
        d.proc.send_signal(signal.SIGSTOP)
        try:
            buggy = run_vmm("buggy-io-out", 30)
            sync = run_vmm("port-7e", 30)
        finally:
            d.proc.send_signal(signal.SIGCONT)
        lost = d.wait_for(lambda e: e["event"] == "events_lost", timeout_s=15)
        assert lost["by_type"]["violation"] > 0
        d.settle()

        def counter(name: str, pid: int) -> float:
            return sum(v for (n, labels), v in scrape(d.metrics_url).items()
                       if n == name and dict(labels).get("vm", "").endswith(f"[{pid}]"))

        # Windows that lost every event are counted once the daemon's sweep sees them closed.
        deadline = time.monotonic() + 15
        while (counter("kvm_completion_snapshots_total", buggy.pid) < buggy.iterations
               and time.monotonic() < deadline):
            time.sleep(0.5)
        d.settle()
        assert counter("kvm_completion_snapshots_total", buggy.pid) == buggy.iterations
        assert counter("kvm_completion_violations_total", buggy.pid) == len(buggy.violations)
        assert counter("kvm_completion_sanctioned_total", sync.pid) == len(sync.sanctioned)
        assert counter("kvm_completion_violations_total", sync.pid) == 0
        assert counter("kvm_completion_snapshots_total", sync.pid) == 0
        # Every snapshot is in the log too, those known from the kernel only marked so.
        lines = d.for_pid(buggy.pid, "completion_snapshot")
        assert len(lines) == buggy.iterations
        assert any(line["events_lost"] for line in lines)
        assert {line["window"] for line in lines} == set(range(1, buggy.iterations + 1))
    finally:
        assert d.stop() == 0
        d.cleanup()


def test_a_full_vcpu_map_is_reported_and_raises_no_false_alert() -> None:
    d = DaemonProcess("--max-vcpus", "1")
    try:
        report = run_vmm("multi", 2, "--vms", "1", "--vcpus", "3")
        full = d.wait_for(lambda e: e["event"] == "maps_full", timeout_s=15)
        assert full["vcpu_map_full"] >= 2
        d.settle()
        got = d.for_pid(report.pid, "completion_violation")
        want = {(v.vcpu_id, v.ioctl, v.tid) for v in report.violations}
        assert {(e["vcpu_id"], e["ioctl"], e["tid"]) for e in got} <= want
    finally:
        assert d.stop() == 0
        d.cleanup()


# ---- the Prometheus exporter ------------------------------------------------------------------

def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def series(got: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of ``name`` whose labels include ``labels``."""
    return {k[1]: v for k, v in got.items()
            if k[0] == name and labels.items() <= dict(k[1]).items()}


def test_metrics_count_what_the_alerts_said(daemon: DaemonProcess) -> None:
    report = run_vmm("buggy-mmio-write", 4)
    daemon.settle()
    vm = f"python[{report.pid}]"
    got = scrape(daemon.metrics_url)
    violations = series(got, "kvm_completion_violations_total", vm=vm)
    alerts = daemon.for_pid(report.pid, "completion_violation")
    assert sum(violations.values()) == len(alerts) == len(report.violations) > 0
    for labels in violations:
        assert dict(labels)["exit_reason"] == "KVM_EXIT_MMIO"
        assert dict(labels)["kind"] == "save" and dict(labels)["ioctl"].startswith("KVM_GET_")
    assert series(got, "kvm_completion_snapshots_total", vm=vm) == {
        (("vm", vm),): float(len(daemon.for_pid(report.pid, "completion_snapshot")))}
    exits = series(got, "kvm_completion_userspace_exits_total", vm=vm,
                   exit_reason="KVM_EXIT_MMIO")
    assert sum(exits.values()) == report.exits["KVM_EXIT_MMIO"]
    # The histogram times one window in 16 (probes.pending_time_sample): windows 16, 32, ...
    completed = series(got, "kvm_completion_pending_seconds_count", vm=vm)
    assert sum(completed.values()) == report.completions // 16
    assert series(got, "kvm_completion_completions_total", vm=vm, path="immediate_exit") \
        == {(("path", "immediate_exit"), ("vm", vm)): float(report.completions)}
    health = series(got, "kvm_completion_probes_attached")
    assert list(health.values()) == list(series(got, "kvm_completion_probes_expected").values())
    assert sum(series(got, "kvm_completion_events_lost_total").values()) == 0
    # Every reason a report can go without its stack is exported (here none did).
    missed = series(got, "kvm_completion_stacks_missed_total")
    assert {dict(k)["reason"] for k in missed} == {"stack_map_full", "stack_failed",
                                                   "user_stack_failed", "user_stack_dropped"}


def test_scrapes_while_the_daemon_stops_stay_valid() -> None:
    """A scrape racing the probes' detach gets a valid exposition (or a refused connection once
    the server is gone), never a 500 or a half-written page."""
    import threading
    import urllib.error
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    d = DaemonProcess()
    outcomes: list[str] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                with urllib.request.urlopen(d.metrics_url, timeout=5) as resp:
                    body = resp.read().decode()
                list(text_string_to_metric_families(body))  # raises if malformed
                outcomes.append(f"ok:{resp.status}")
            except urllib.error.HTTPError as err:
                outcomes.append(f"http:{err.code}")
            except (ConnectionError, urllib.error.URLError):
                outcomes.append("refused")
                return
            except Exception as err:  # a malformed page: the parser's error
                outcomes.append(f"bad:{type(err).__name__}: {err}")

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while outcomes.count("ok:200") < 3:  # scrapes are flowing before the stop
            assert time.monotonic() < deadline, outcomes
            time.sleep(0.02)
        assert d.stop() == 0
    finally:
        stop.set()
        thread.join(timeout=10)
        d.cleanup()
    assert outcomes and all(o in ("ok:200", "refused") for o in outcomes), set(outcomes)
    assert outcomes.count("ok:200") > 3


def test_selftest_serves_its_counts_while_it_runs() -> None:
    """The issue's check: curl on the metrics endpoint during `selftest` shows the violations."""
    from conftest import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tracer", "selftest", "--log-format", "json", "--scenario",
         "buggy-io-out", "--scenario", "restore-mmio", "--metrics-addr", f"127.0.0.1:{port}",
         "--linger", "30"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "serving metrics" in line:
                break
        assert [ln.split(":")[0] for ln in lines if ln.startswith(("ok", "FAIL"))] == [
            "ok   buggy-io-out", "ok   restore-mmio"], lines
        got = scrape(url)
        saves = series(got, "kvm_completion_violations_total", kind="save",
                       exit_reason="KVM_EXIT_IO")
        restores = series(got, "kvm_completion_violations_total", kind="restore",
                          exit_reason="KVM_EXIT_MMIO")
        assert sum(saves.values()) > 0 and sum(restores.values()) > 0, got
        assert sum(series(got, "kvm_completion_snapshots_total").values()) > 0
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_pending_time_histogram_times_one_window_in_n() -> None:
    d = DaemonProcess("--pending-time-sample", "4")
    try:
        report = run_vmm("buggy-mmio-write", 10)
        d.settle()
        vm = f"python[{report.pid}]"
        got = scrape(d.metrics_url)
        assert report.completions == 10
        # Windows 4 and 8 of 10 are timed; every completion is still counted.
        assert sum(series(got, "kvm_completion_pending_seconds_count", vm=vm).values()) == 2
        buckets = series(got, "kvm_completion_pending_seconds_bucket", vm=vm)
        assert buckets[(("le", "+Inf"), ("vm", vm))] == 2
        assert 0 < sum(series(got, "kvm_completion_pending_seconds_sum", vm=vm).values()) < 60
        assert sum(series(got, "kvm_completion_completions_total", vm=vm).values()) == 10
    finally:
        assert d.stop() == 0
        d.cleanup()
