"""``kvm-completion-tracer watch -- CMD`` as CI runs it: real probes, real KVM, real processes.

Each test runs ``python -m tracer watch`` on a command and holds its exit status, its stderr
report, its ``--json`` and ``--junit`` files against what the VMMs themselves did: the built-in
Python VMM (``python -m tracer.vmm``, its own JSON record of every mid-completion ioctl), the C
and Rust VMMs of tests/vmms (built here with frame pointers), and Debian's QEMU booting SeaBIOS,
stopped and migrated to a file. Every wait is bounded; a watch that hangs is killed with its
process group (each watch runs in a session of its own).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ci_enabled, requires_kvm_bpf

import tracer
from tracer.selftest import expected_snapshots
from tracer.vmm.report import ScenarioReport

pytestmark = [pytest.mark.e2e, requires_kvm_bpf]

REPO = Path(__file__).resolve().parents[2]
VMMS = REPO / "tests" / "vmms"
TOOL = "kvm-completion-tracer"
WATCH_TIMEOUT_S = 60.0
WAIT_S = 30.0
HEADER = re.compile(r"^==(\d+)==(ERROR|WARNING): kvm-completion-tracer: (.+)$")
SUMMARY = re.compile(r"^SUMMARY: kvm-completion-tracer: (\d+) findings? \((\d+) occurrences?: ")
CLEAN = re.compile(r"^kvm-completion-tracer: no completion race found \((\d+) exits? traced, "
                   r"(\d+) left a completion pending; (\d+) register peeks? judged benign; "
                   r"(\d+) sanctioned; 0 events lost\)$")


# ---- running watch ------------------------------------------------------------------------------

@dataclass
class WatchRun:
    status: int
    stdout: str
    stderr: str
    result: dict[str, Any] | None  # --json
    junit: ET.Element | None  # --junit, parsed
    seconds: float

    @property
    def findings(self) -> list[dict[str, Any]]:
        assert self.result is not None, f"no --json written; stderr: {self.stderr[-3000:]}"
        findings: list[dict[str, Any]] = self.result["findings"]
        return findings

    def blocks(self) -> list[list[str]]:
        """The report's finding blocks (header line first), in the order printed."""
        out: list[list[str]] = []
        current: list[str] | None = None
        for line in self.stderr.splitlines():
            if HEADER.match(line):
                current = [line]
                out.append(current)
            elif current is not None and line.startswith("  "):
                current.append(line)
            else:
                current = None  # a block ends at its first line that is not indented
        return out

    def testcases(self) -> list[ET.Element]:
        assert self.junit is not None, "no --junit written"
        return list(self.junit.iter("testcase"))

    def explain(self) -> str:
        return f"watch exited {self.status}; stderr:\n{self.stderr[-4000:]}"


def _watch_argv(tmp: Path, args: Sequence[str], cmd: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "tracer", "watch", "--json", str(tmp / "watch.json"),
            "--junit", str(tmp / "watch.xml"), *args, "--", *cmd]


def start_watch(tmp: Path, cmd: Sequence[str], *args: str,
                stdin: int | None = subprocess.DEVNULL) -> subprocess.Popen[str]:
    """``watch [args] -- cmd`` in a session of its own (so a hung run is killed with its whole
    tree), the report files in ``tmp``."""
    for name in ("watch.json", "watch.xml"):
        (tmp / name).unlink(missing_ok=True)
    return subprocess.Popen(_watch_argv(tmp, args, cmd), cwd=REPO, stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish_watch(proc: subprocess.Popen[str], tmp: Path, started: float,
                 stdin_text: str | None = None,
                 timeout_s: float = WATCH_TIMEOUT_S) -> WatchRun:
    try:
        out, err = proc.communicate(stdin_text, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"watch did not finish within {timeout_s:.0f} s; stderr:\n"
                             f"{err[-3000:]}") from None
    result_path, junit_path = tmp / "watch.json", tmp / "watch.xml"
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    junit = ET.parse(junit_path).getroot() if junit_path.exists() else None
    return WatchRun(proc.returncode, out, err, result, junit, time.monotonic() - started)


def kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the session start_watch made (the watch, its CMD and what CMD forked)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def watch(tmp: Path, cmd: Sequence[str], *args: str, stdin_text: str | None = None,
          timeout_s: float = WATCH_TIMEOUT_S) -> WatchRun:
    started = time.monotonic()
    proc = start_watch(tmp, cmd, *args,
                       stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL)
    return finish_watch(proc, tmp, started, stdin_text, timeout_s)


def vmm_cmd(scenario: str, report: Path, iterations: int = 3, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tracer.vmm", scenario, "--iterations", str(iterations),
            "--report", str(report), *extra]


def wait_for_file(path: Path, proc: subprocess.Popen[str], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"{proc.args!r} exited {proc.returncode} before {path} "
                                 f"appeared: {err[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout_s:.0f} s")
        time.sleep(0.02)


def saves_by_ioctl(findings: list[dict[str, Any]]) -> Counter[str]:
    got: Counter[str] = Counter()
    for f in findings:
        if f["kind"] == "save":
            got[f["ioctl"]] += f["count"]
    return got


def times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


@functools.cache
def build_id(path: str) -> str:
    """The GNU build-id of an ELF file, as binutils reads it (not through tracer.elf)."""
    readelf = shutil.which("readelf")
    assert readelf, "readelf (binutils) is needed to check build-ids"
    out = subprocess.run([readelf, "-n", str(path)], check=True, capture_output=True,
                         text=True, timeout=30).stdout
    match = re.search(r"Build ID: ([0-9a-f]+)", out)
    assert match, f"{path} has no build-id note"
    return match[1]


# ---- fixtures -----------------------------------------------------------------------------------

@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


def _skip_tool(why: str) -> None:
    if ci_enabled(os.environ):
        pytest.fail(f"{why}; CI=true, so this must not be skipped")
    pytest.skip(why)


@pytest.fixture(scope="session")
def c_vmm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/vmms/buggy_vmm.c, -O0 with frame pointers (both stack methods work on it)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        _skip_tool("gcc is not installed (scripts/setup-host.sh test installs it)")
    assert cc is not None
    out = tmp_path_factory.mktemp("c-vmm") / "buggy_vmm"
    subprocess.run([cc, "-g", "-O0", "-fno-omit-frame-pointer", "-Wall", "-Wextra", "-Werror",
                    "-o", str(out), str(VMMS / "buggy_vmm.c")], check=True, timeout=120)
    return out


def _rustc() -> str | None:
    found = shutil.which("rustc")
    if found:
        return found
    cargo = Path.home() / ".cargo" / "bin" / "rustc"
    return str(cargo) if os.access(cargo, os.X_OK) else None


@pytest.fixture(scope="session")
def rust_vmm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/vmms/buggy_vmm.rs, optimized, with debug info."""
    rustc = _rustc()
    if rustc is None:
        _skip_tool("rustc is not installed (neither on PATH nor in ~/.cargo/bin: install "
                   "Debian's rustc or rustup)")
    assert rustc is not None
    where = tmp_path_factory.mktemp("rust-vmm")
    out = where / "buggy_vmm_rs"
    subprocess.run([rustc, "--edition", "2021", "-O", "-g", "-o", str(out),
                    str(VMMS / "buggy_vmm.rs")], check=True, timeout=300, cwd=where)
    return out


@pytest.fixture(scope="session")
def qemu_binary() -> str:
    from qemu_vm import qemu_or_skip

    return qemu_or_skip()


# ---- a buggy VMM fails the gate -----------------------------------------------------------------

def test_buggy_vmm_fails_with_one_block_per_finding_and_full_json_and_junit(tmp: Path) -> None:
    report_path, log = tmp / "vmm.json", tmp / "alerts.jsonl"
    cmd = vmm_cmd("buggy-io-out", report_path)
    run = watch(tmp, cmd, "--log-file", str(log))
    assert run.status == 66, run.explain()
    vmm = ScenarioReport.from_json(report_path.read_text())
    assert vmm.violations, "the VMM must actually misbehave"
    findings = run.findings

    # The findings are what the VMM did: every save it issued mid-completion, and one snapshot
    # per window, each grouped once however often it was hit.
    assert saves_by_ioctl(findings) == Counter(v.ioctl for v in vmm.violations)
    snapshots = [f for f in findings if f["kind"] == "snapshot"]
    assert sum(f["count"] for f in snapshots) == expected_snapshots(vmm) == vmm.iterations
    keys = [(f["kind"], f["ioctl"], f["exit_reason"], json.dumps(f["call_site"]))
            for f in findings]
    assert len(keys) == len(set(keys)), "one finding per distinct bug"
    for f in findings:
        assert f["pids"] == [vmm.pid] and f["exit_reason"] == "KVM_EXIT_IO", f
        assert f["first"]["pid"] == vmm.pid and f["first"]["access"]["port"] == "0x3f8", f
        assert f["fails_gate"] is True
        assert f["count"] >= 1 and f["vcpus"] == [{"pid": vmm.pid, "vcpu_id": 0}]
        for frame in (f["stack"] or {}).get("frames", []):  # no frame outside every mapping
            assert frame["file_offset"] is None or 0 <= frame["file_offset"] < 1 << 63, frame

    # stderr: one block per finding, in the JSON's order, with its count and first occurrence.
    blocks = run.blocks()
    assert len(blocks) == len(findings), run.stderr
    for block, f in zip(blocks, findings, strict=True):
        header = HEADER.match(block[0])
        assert header and int(header[1]) == vmm.pid, block[0]
        assert f["ioctl"] in header[3] and "KVM_EXIT_IO is pending" in header[3], block[0]
        assert f"({f['rule']}, severity {f['severity']})" in header[3]
        assert block[1] == f"  seen {times(f['count'])} in 1 process, 1 thread, 1 vCPU", block
        first = next(line for line in block if line.startswith("  first: "))
        assert f"pid {vmm.pid}" in first and "port 0x3f8 OUT size 1" in first, first
        assert any(line.startswith("  fix: ") for line in block)
        if f["kind"] == "save":
            assert f"(fd {f['first']['vcpu_fd']})" in first
            assert any(line.startswith("  call site: ") for line in block)
            assert any(line.startswith("  stack") for line in block)
    lines = run.stderr.splitlines()
    summary = next(SUMMARY.match(line) for line in lines if SUMMARY.match(line))
    assert summary is not None
    total = sum(f["count"] for f in findings)
    assert (int(summary[1]), int(summary[2])) == (len(findings), total)
    assert lines[-1].startswith(f"{TOOL}: verdict: fail ({len(findings)} finding")
    assert not any(line.startswith("{") for line in lines), "alerts go to --log-file"

    # --json: the whole result.
    result = run.result
    assert result is not None
    assert result["schema"] == "kvm-completion-tracer/watch-report/1"
    assert result["verdict"] == "fail"
    assert result["gate"] == {"fail_on": "warning", "allow_lost": False}
    counts = result["counts"]
    assert counts["findings"] == len(findings) and counts["occurrences"] == total
    assert counts["violations"] == len(vmm.violations)
    assert counts["snapshots"] == vmm.iterations and counts["inspections"] == 0
    assert counts["exits_traced"] >= vmm.iterations
    assert counts["pending_exits"] >= vmm.iterations
    assert result["events_lost"] == 0 and result["maps_full"] == {}
    meta = result["meta"]
    assert meta["tool_version"] == tracer.__version__
    assert meta["kernel_release"] == os.uname().release
    assert meta["bcc_version"]
    assert meta["command"] == cmd and meta["command_exit_status"] == 0
    assert "KVM_EXIT_IO" in meta["policy"]["pending_exits"]
    assert meta["finished_unix"] >= meta["started_unix"]
    assert set(result["timings"]) == {"startup_s", "spawn_s", "command_s", "run_end_monotonic"}
    assert set(result["stacks_missed"]) == {"stack_map_full", "stack_failed",
                                            "user_stack_failed", "user_stack_dropped"}

    # --junit: one failed testcase per finding.
    cases = run.testcases()
    assert len(cases) == len(findings)
    for case, f in zip(cases, findings, strict=True):
        [failure] = case.findall("failure")
        assert failure.get("type") == "completion-race"
        assert f"seen {times(f['count'])}" in (failure.get("message") or "")
        assert f["ioctl"] in (case.get("name") or "")
    suite = run.junit
    assert suite is not None and suite.get("failures") == str(len(findings))
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["verdict"] == "fail" and props["command_exit_status"] == "0"

    # --log-file: every alert as a JSON line.
    events = Counter(json.loads(line)["event"] for line in log.read_text().splitlines())
    assert events["completion_violation"] == len(vmm.violations)
    assert events["completion_snapshot"] == vmm.iterations


@pytest.mark.parametrize(("scenario", "args", "status", "fail_on"), [
    ("buggy-io-out", ["--error-exitcode", "3", "--fail-on", "critical"], 3, "critical"),
    ("buggy-io-out", ["--fail-on", "error"], 66, "error"),
    ("peek-io", ["--inspection", "violation"], 66, "warning"),
    ("peek-io", ["--inspection", "violation", "--fail-on", "snapshot"], 0, "snapshot"),
])
def test_fail_on_and_error_exitcode_decide_the_status(tmp: Path, scenario: str,
                                                      args: list[str], status: int,
                                                      fail_on: str) -> None:
    run = watch(tmp, vmm_cmd(scenario, tmp / "vmm.json"), *args)
    assert run.status == status, run.explain()
    findings = run.findings
    assert findings
    rank = {"info": 0, "warning": 1, "error": 2, "critical": 3}
    for f in findings:
        want = (f["kind"] == "snapshot" or (f["kind"] == "restore"
                                            and f["severity"] == "critical")
                if fail_on == "snapshot" else rank[f["severity"]] >= rank[fail_on])
        assert f["fails_gate"] is want, f
    failing = [f for f in findings if f["fails_gate"]]
    assert bool(failing) == (status != 0)
    assert run.result is not None and run.result["gate"]["fail_on"] == fail_on
    assert run.result["verdict"] == ("fail" if failing else "pass")
    cases = run.testcases()
    assert len(cases) == len(findings)
    assert sum(1 for c in cases if c.find("failure") is not None) == len(failing)
    assert run.stderr.splitlines()[-1].startswith(
        f"{TOOL}: verdict: {'fail' if failing else 'pass'} (")
    # Without --log-file the report is the one account of the findings on stderr.
    assert not any(line.startswith("{") for line in run.stderr.splitlines()), run.stderr[:2000]


# ---- correct VMMs pass --------------------------------------------------------------------------

@pytest.mark.parametrize("vmm", ["correct-io", "peek-io", "peek-mmio", "c --correct",
                                 "rust --correct"])
def test_correct_and_peeking_vmms_pass(tmp: Path, request: pytest.FixtureRequest,
                                       vmm: str) -> None:
    report_path = tmp / "vmm.json"
    if vmm.endswith("--correct"):
        binary: Path = request.getfixturevalue(f"{vmm.split()[0]}_vmm")
        cmd = [str(binary), "--correct", "3"]
    else:
        cmd = vmm_cmd(vmm, report_path)
    run = watch(tmp, cmd)
    assert run.status == 0, run.explain()
    assert run.findings == []
    assert run.result is not None and run.result["verdict"] == "pass"
    counts = run.result["counts"]
    if report_path.exists():
        report = ScenarioReport.from_json(report_path.read_text())
        assert report.violations == []
        assert counts["inspections"] == len(report.inspections)
        assert counts["inspections"] == (3 if vmm.startswith("peek") else 0)
    else:
        assert "3 iterations, correct" in run.stdout
    assert counts["exits_traced"] >= 3 and counts["pending_exits"] >= 3
    clean = [m for line in run.stderr.splitlines() if (m := CLEAN.match(line))]
    assert len(clean) == 1, run.stderr
    assert (int(clean[0][1]), int(clean[0][2]), int(clean[0][3])) == (
        counts["exits_traced"], counts["pending_exits"], counts["inspections"])
    assert run.stderr.splitlines()[-1] == f"{TOOL}: verdict: pass (no completion race found)"
    [case] = run.testcases()
    assert case.get("name") == "no completion race"
    assert [child.tag for child in case] == ["system-out"]  # passed: no failure, no error


# ---- the command: status, stdio, signals --------------------------------------------------------

@pytest.mark.parametrize(("cmd", "status"), [
    (["sh", "-c", "exit 7"], 7),
    (["sh", "-c", "kill -9 $$"], 128 + signal.SIGKILL),
])
def test_the_commands_own_status_passes_through(tmp: Path, cmd: list[str], status: int) -> None:
    run = watch(tmp, cmd)
    assert run.status == status, run.explain()
    assert run.result is not None and run.result["meta"]["command_exit_status"] == status
    assert run.result["verdict"] == "pass"


def test_a_command_that_cannot_run_is_127(tmp: Path) -> None:
    missing = tmp / "no-such-command"
    run = watch(tmp, [str(missing), "arg"])
    assert run.status == 127, run.explain()
    assert f"cannot run {str(missing)!r}" in run.stderr


def test_stdin_and_stdout_belong_to_the_command(tmp: Path) -> None:
    echo = "import sys; sys.stdout.write(sys.stdin.read().upper()); sys.stdout.flush()"
    run = watch(tmp, [sys.executable, "-c", echo], stdin_text="hello from the pipe\n")
    assert run.status == 0, run.explain()
    assert run.stdout == "HELLO FROM THE PIPE\n"  # nothing of the tracer's on stdout
    assert f"{TOOL}: verdict: pass" in run.stderr


@pytest.mark.parametrize("args", [[], ["--error-exitcode", "0", "--", "true"],
                                  ["--fail-on", "sometimes", "--", "true"],
                                  ["--reader-nice", "40", "--", "true"]])
def test_usage_errors_are_2(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "tracer", "watch", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "error" in proc.stderr


def test_a_private_pid_namespace_is_refused_not_passed(tmp: Path, c_vmm: Path) -> None:
    """In a PID namespace of its own (a container without --pid=host) watch cannot follow CMD:
    the probes know host pids. It must say so and fail, not pass a buggy VMM."""
    unshare = shutil.which("unshare")
    if unshare is None:
        _skip_tool("unshare (util-linux) is not installed")
    assert unshare is not None
    proc = subprocess.run([unshare, "--pid", "--fork", "--mount-proc", *_watch_argv(
        tmp, [], [str(c_vmm), "2"])], cwd=REPO, capture_output=True, text=True,
        timeout=WATCH_TIMEOUT_S)
    assert proc.returncode == 1, proc.stderr
    assert "PID namespace of its own" in proc.stderr and "--pid=host" in proc.stderr
    assert proc.stdout == ""  # CMD never ran
    assert not (tmp / "watch.json").exists()


SIGNAL_CMD = """\
import os, signal, sys, time
from pathlib import Path
marker = Path(sys.argv[1])
def on_signal(signum, _frame):
    marker.write_text(signal.Signals(signum).name)
    os._exit(40 + signum)
for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    signal.signal(sig, on_signal)
Path(f"{marker}.ready").touch()
time.sleep(30)
sys.exit(3)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signals_sent_to_watch_reach_the_command(tmp: Path, sig: signal.Signals) -> None:
    script, marker = tmp / "trap.py", tmp / "marker"
    script.write_text(SIGNAL_CMD)
    started = time.monotonic()
    proc = start_watch(tmp, [sys.executable, str(script), str(marker)])
    try:
        wait_for_file(Path(f"{marker}.ready"), proc)
        proc.send_signal(sig)
        run = finish_watch(proc, tmp, started)
    finally:
        kill_group(proc)
    assert marker.read_text() == sig.name
    assert run.status == 40 + sig, run.explain()  # CMD's status, the report still written
    assert run.result is not None and run.result["meta"]["command_exit_status"] == 40 + sig
    assert f"{TOOL}: verdict: pass" in run.stderr


# ---- the watched tree ---------------------------------------------------------------------------

TREE_SCRIPT = """\
touch "$1"                # the VMM outside the tree goes on now
"$2" --fork 3             # the parent forks the child that runs the VM
status=$?
i=0
while [ ! -s "$3" ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done
exit $status
"""


def test_three_levels_down_is_caught_and_a_vmm_outside_the_tree_is_not(
        tmp: Path, c_vmm: Path) -> None:
    gate, outside_report = tmp / "outside.gate", tmp / "outside.json"
    outside = subprocess.Popen(vmm_cmd("buggy-io-out", outside_report, 3, "--gate", str(gate)),
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        wait_for_file(Path(f"{gate}.ready"), outside)  # its VM exists, no exit yet
        script = tmp / "tree.sh"
        script.write_text(TREE_SCRIPT)
        # sh -c (two commands: no exec) -> sh tree.sh -> buggy_vmm -> fork -> the VMM.
        shell = f'sh "{script}" "{gate}" "{c_vmm}" "{outside_report}"; exit $?'
        run = watch(tmp, ["sh", "-c", shell])
        assert outside.wait(timeout=WAIT_S) == 0, outside.communicate()[1]
    finally:
        kill_group(outside)
    assert run.status == 66, run.explain()
    parent = re.search(r"buggy_vmm: parent (\d+), child (\d+)", run.stdout)
    assert parent, run.stdout
    child = int(parent[2])
    assert f"buggy_vmm: pid {child}, 3 iterations, buggy" in run.stdout
    outsider = ScenarioReport.from_json(outside_report.read_text())
    assert outsider.violations, "the outside VMM must misbehave while watch runs"
    assert outsider.finished_ns > outsider.started_ns
    findings = run.findings
    assert saves_by_ioctl(findings) == {"KVM_GET_REGS": 3, "KVM_GET_SREGS": 3}
    for f in findings:
        assert f["pids"] == [child], f
        assert {t["pid"] for t in f["threads"]} == {child}
        assert f["first"]["pid"] == child
    text = json.dumps(run.result)
    assert f'"pid": {outsider.pid}' not in text and f"=={outsider.pid}==" not in run.stderr


# ---- lost events --------------------------------------------------------------------------------

FLOOD_SCRIPT = """\
touch "$1.started"
i=0
while [ ! -e "$1.go" ]; do sleep 0.02; i=$((i+1)); [ $i -gt 1500 ] && exit 99; done
"$2" -m tracer.vmm "$3" --iterations 200 --no-logs --report "$1.report"
status=$?
touch "$1.done"
exit $status
"""


@pytest.mark.parametrize(("scenario", "args", "status"), [
    ("correct-io", ["--trace-exits"], 0),
    ("correct-io", ["--trace-exits", "--allow-lost"], 0),
    ("buggy-io-out", [], 66),
    ("buggy-io-out", ["--allow-lost"], 66),
])
def test_lost_events_are_counted_and_only_lost_findings_are_unverified(
        tmp: Path, scenario: str, args: list[str], status: int) -> None:
    """A one-page ring, and the watch process frozen (SIGSTOP: its CMD runs on) while the VMM
    floods it: events are lost. The kernel judged every window, so a correct VMM's lost trace
    events are no finding and hide none: it passes (0). A buggy VMM's findings that reached
    us fail the gate (66) with their call sites; those the kernel counted and the ring
    dropped are "unverified (events lost)", counted apart by process, with none; together
    they are exactly the VMM's own record."""
    script, base = tmp / "flood.sh", tmp / "flood"
    script.write_text(FLOOD_SCRIPT)
    started = time.monotonic()
    proc = start_watch(tmp, ["sh", str(script), str(base), sys.executable, scenario],
                       "--ringbuf-pages", "1", *args)
    try:
        wait_for_file(Path(f"{base}.started"), proc)  # CMD runs: the probes are attached
        proc.send_signal(signal.SIGSTOP)
        try:
            Path(f"{base}.go").touch()
            deadline = time.monotonic() + WAIT_S
            while not Path(f"{base}.done").exists():
                assert time.monotonic() < deadline, "the flood did not finish"
                time.sleep(0.02)
        finally:
            proc.send_signal(signal.SIGCONT)
        run = finish_watch(proc, tmp, started)
    finally:
        kill_group(proc)
    assert run.status == status, run.explain()
    result = run.result
    assert result is not None and result["events_lost"] > 0
    assert result["ringbuf_pages"] == 1
    allowed = "--allow-lost" in args
    vmm = ScenarioReport.from_json(Path(f"{base}.report").read_text())
    unverified = result["unverified"]
    cases = {c.get("name"): c for c in run.testcases()}
    if scenario.startswith("correct"):
        assert vmm.violations == [] and run.findings == []
        assert result["verdict"] == "pass" and unverified["findings"] == 0
        assert f"{result['events_lost']} events lost (none of them a finding)" in run.stderr
        assert "events lost" not in cases
        return
    assert run.findings and result["verdict"] == "fail"
    delivered = result["counts"]["violations"]
    assert 0 < delivered < len(vmm.violations)
    assert delivered + unverified["findings"] == len(vmm.violations)
    [(name, n)] = unverified["processes"].items()
    assert name.endswith(f"[{vmm.pid}]") and n == unverified["findings"]
    lost = [line for line in run.stderr.splitlines() if "unverified (events lost)" in line
            and "rerun with" in line]
    assert len(lost) == 1, run.stderr
    assert lost[0].startswith(f"{TOOL}: the findings above may be incomplete: ")
    assert f"{unverified['findings']} findings in {name}" in lost[0]
    assert "rerun with --ringbuf-pages 4" in lost[0] and "or pass --allow-lost" in lost[0]
    assert lost[0].endswith("(--allow-lost given: not failing the gate)") == allowed
    events_lost = cases["events lost"]
    assert (events_lost.find("error") is not None) == (not allowed)


# ---- the last instant ---------------------------------------------------------------------------

def test_a_save_just_before_the_command_exits_is_reported(tmp: Path, c_vmm: Path) -> None:
    """buggy_vmm --exit-now: the save, then _exit(0) with the exit still pending."""
    run = watch(tmp, [str(c_vmm), "--exit-now", "1"])
    assert run.status == 66, run.explain()
    assert run.stdout == ""  # it really died at once, before its own last words
    assert saves_by_ioctl(run.findings) == {"KVM_GET_REGS": 1, "KVM_GET_SREGS": 1}
    [snapshot] = [f for f in run.findings if f["kind"] == "snapshot"]
    assert snapshot["first"]["closed_by"] == "process_exit"
    assert all(f["first"]["comm"] == "buggy_vmm" for f in run.findings if f["kind"] == "save")


def test_a_peek_left_pending_at_exit_is_an_inspection(tmp: Path) -> None:
    """peek-then-exit: a lone KVM_GET_REGS whose exit the process never completes: one kind of
    state, never restored; judged when the process is gone (after CMD's end) an inspection."""
    report_path = tmp / "vmm.json"
    run = watch(tmp, vmm_cmd("peek-then-exit", report_path))
    assert run.status == 0, run.explain()
    vmm = ScenarioReport.from_json(report_path.read_text())
    assert vmm.violations == [] and run.findings == []
    assert run.result is not None
    assert run.result["counts"]["inspections"] == len(vmm.inspections) == 3


# Stacks of compiled VMMs (every build flavour, QEMU, debuginfod): tests/e2e/test_stacks_e2e.py


# ---- QEMU ---------------------------------------------------------------------------------------

QEMU_SCRIPT = """\
import sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from qemu_vm import QemuGuest

tmp = Path(tempfile.mkdtemp(prefix="kct-watch-qemu-"))
guest = QemuGuest(tmp)
try:
    qmp = guest.connect()
    qmp.command("cont")
    guest.wait_for_firmware()
    qmp.command("stop")
    assert guest.status() == "paused", guest.status()
    guest.migrate_to_file(tmp / "state.bin")
    size = (tmp / "state.bin").stat().st_size
    qmp.command("cont")
    print(f"qemu pid {guest.pid} migrated {size} bytes, {guest.status()}", flush=True)
    print(f"qemu exit {guest.quit()}", flush=True)
except BaseException:
    guest.kill()
    raise
"""


def test_qemu_booting_seabios_stopped_and_migrated_passes(tmp: Path, qemu_binary: str) -> None:
    script = tmp / "qemu_guest.py"
    script.write_text(QEMU_SCRIPT)
    run = watch(tmp, [sys.executable, str(script), str(REPO / "tests")], timeout_s=90)
    assert run.status == 0, run.explain()
    said = re.search(r"qemu pid (\d+) migrated (\d+) bytes, running\nqemu exit 0\n", run.stdout)
    assert said and int(said[2]) > 0, run.stdout
    assert run.findings == []
    assert run.result is not None and run.result["verdict"] == "pass"
    counts = run.result["counts"]
    # Proof that watch followed QEMU: SeaBIOS's port exits, and kvmvapic's 0x7e sync
    # (sanctioned, so no finding).
    assert counts["exits_traced"] > 1000 and counts["pending_exits"] > 1000
    assert counts["sanctioned"].get("port-0x7e", 0) >= 1
    assert run.stderr.splitlines()[-1] == f"{TOOL}: verdict: pass (no completion race found)"
