"""Benchmark: what kvm-completion-tracer costs, against no tracer, a bpftrace one-off and an
empty-program floor.  Run as root from the repo root: ``.venv/bin/python bench/run.py``
(``make bench``).  Standard library only; bcc and bpftrace run as subprocesses.

Configurations, alternated in every round (baseline -> daemon -> bpftrace -> floor):
  baseline  no tracer
  daemon    ``python -m tracer run --log-format json`` (this checkout)
  bpftrace  bench/oneoff.bt, the hand-written one-off an operator would use
  floor     bench/floor.py: EMPTY programs on every tracepoint the daemon attaches

Rows (see bench/README.md): per_exit, getppid, cpu, latency, startup, scale.
Prints one table and writes JSON (--out, default bench/results.json) with every raw sample.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENV_PY = REPO / ".venv" / "bin" / "python"
ROWS = ("per_exit", "getppid", "cpu", "latency", "startup", "scale", "busy")
T_STARTUP_S = 0.6  # daemon start to `ready`, probes from the cache (issue 14)
# *_raw: the daemon and the floor on raw_syscalls sys_enter/sys_exit (--syscall-probes raw)
# instead of the per-syscall tracepoints: the table shows what that trade costs and buys.
# watch: `tracer watch -- kvmloop`, the CI gate over the workload (the same probes, with the
# in-kernel watched-process filter): its per-exit cost and its start-up (probes attached -> CMD
# started), paired with the baseline of the same round.
# daemon_nostacks: the daemon with --no-stacks. Stacks are taken in the kernel only when a
# violation is reported, never per exit: the pair shows the per-exit figure unchanged by them.
CONFIGS = ("baseline", "daemon", "bpftrace", "floor", "daemon_raw", "floor_raw", "watch",
           "daemon_nostacks")
SCALE_VCPUS = (1, 64, 1024)
CPU_BUSY_VCPUS = 4
STARTUP_TIMEOUT_S = 60.0
ALERT_WAIT_S = 5.0

# Targets from the issue.
# Added per exit at most this much above the floor's (empty programs on the same hooks), as a
# median of per-round paired differences (issue 14; was x1.03 of the baseline before).
T_OVER_FLOOR_NS = 100.0
T_SYSCALL_RATIO = 1.05
T_CPU_PCT = 2.0
T_LATENCY_P99_MS = 100.0
# Row 7 (busy runner): `watch -- kvmloop` with every core saturated by a CPU hog for the whole
# run. Variants: watch's defaults (64 MiB ring, reader at nice -10), the reader at nice 0, and
# watch before issue 20 (256 KiB ring, nice 0): the baseline the ratios are quoted against.
# Workloads: `flood` (KVM_GET_REGS + KVM_GET_SREGS at every exit: a snapshot each, 3 events an
# exit), `peeks` (KVM_GET_REGS alone at every exit: correct code, judged in the kernel), and
# `drain`: the flood with watch frozen (SIGSTOP) until kvmloop is done, then the time from
# SIGCONT until the ring is drained: the events per second the reader sustains on hogged cores.
BUSY_VARIANTS: dict[str, list[str]] = {
    "watch": [], "watch_nice0": ["--reader-nice", "0"],
    "watch_before": ["--ringbuf-pages", "64", "--reader-nice", "0"]}
BUSY_WORKLOADS = {"flood": "regs,sregs", "peeks": "regs", "drain": "regs,sregs"}
T_BUSY_PEEKS_LOST = 0  # correct peeking code on saturated cores: nothing to lose
# "Flat": with 64 or 1024 tracked vCPUs the daemon's paired ratio to the baseline may exceed its
# ratio with 1 by at most this much (of a baseline exit, ~300-400 ns here). One-sided: the
# target is that cost does not grow with the vCPUs tracked; the spread is printed too.
T_SCALE_GROWTH = 0.05
SCALE_START_DELAY_S = 1.0  # kvmloop pause after creating the vCPUs: the tracer takes them in


class BenchError(Exception):
    """Something the operator must fix (missing tool, not root...): one line, exit 1."""


def log(msg: str, tool: str = "bench") -> None:
    print(f"[{tool} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- building --------------------------------------------------------------------------------

def build(build_dir: Path, programs: tuple[str, ...] = ("kvmloop", "getppid")
          ) -> dict[str, Path]:
    """Compile bench/NAME.c for each of ``programs`` (bench/faults.py builds its own set)."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        raise BenchError("gcc not found: apt-get install gcc libc6-dev (or `make setup`)")
    build_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in programs:
        extra = [] if name == "getppid" else ["-pthread"]
        exe = build_dir / name
        cmd = [gcc, "-O2", "-Wall", "-Wextra", *extra, "-o", str(exe), str(BENCH / f"{name}.c")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise BenchError(f"building {name}.c failed:\n{proc.stderr.strip()}")
        out[name] = exe
    return out


# ---- small process helpers -------------------------------------------------------------------

def stop_process_group(proc: subprocess.Popen[Any], wait_s: float = 10.0,
                       cont: bool = False) -> None:
    """SIGINT the process's group (after SIGCONT for one that may be stopped), SIGKILL if it
    has not exited within ``wait_s``."""
    try:
        if cont:
            os.killpg(proc.pid, signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=wait_s)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def run_json(cmd: list[str], timeout: float, cwd: Path | None = None,
             ok: tuple[int, ...] = (0,)) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if proc.returncode not in ok:
        raise BenchError(f"{Path(cmd[0]).name} failed (exit {proc.returncode}): "
                         f"{proc.stderr.strip()[-500:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def rss_kb(pid: int, field_name: str = "VmRSS") -> int | None:
    """VmRSS, or RssAnon: the part that is the process's own memory (VmRSS also counts the
    clean, shared page cache of LLVM's library text, which both bcc and bpftrace touch)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field_name}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime+stime from /proc/PID/stat in s, sum of per-thread schedstat run time in s)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    ticks = os.sysconf("SC_CLK_TCK")
    stat_s = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15)
    sched_ns = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            sched_ns += int((task / "schedstat").read_text().split()[0])
    return stat_s, sched_ns / 1e9


BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def bpf_prog_stats(pid: int) -> dict[str, tuple[int, int]]:
    """Per BPF program the process holds: (run_time_ns, run_cnt) from /proc/PID/fdinfo; only
    counted while kernel.bpf_stats_enabled is 1 (bpf_stats_enabled())."""
    out: dict[str, tuple[int, int]] = {}
    try:
        fds = list(Path(f"/proc/{pid}/fdinfo").iterdir())
    except OSError:
        return out
    for fd in fds:
        try:
            info = dict(line.split(":", 1) for line in fd.read_text().splitlines()
                        if ":" in line)
        except OSError:
            continue
        if "prog_id" not in info or "run_time_ns" not in info:
            continue
        out[info["prog_id"].strip()] = (int(info["run_time_ns"]), int(info.get("run_cnt", 0)))
    return out


@contextlib.contextmanager
def bpf_stats_enabled() -> Iterator[None]:
    """kernel.bpf_stats_enabled=1 for one untimed loop only: the accounting itself costs ~60 ns
    per program run on this host (two clock reads), which would inflate every timed row."""
    before = BPF_STATS.read_text().strip()
    BPF_STATS.write_text("1\n")
    try:
        yield
    finally:
        BPF_STATS.write_text(before + "\n")


def bpf_delta(before: dict[str, tuple[int, int]],
              after: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Per prog_id: (run_time_ns, run_cnt) accrued between the two readings."""
    return {k: (v[0] - before.get(k, (0, 0))[0], v[1] - before.get(k, (0, 0))[1])
            for k, v in after.items()}


def other_tracers(own: Iterable[int]) -> list[str]:
    """Other tracer processes on the host (they would skew every number): for the record."""
    found, own = [], set(own) | {os.getpid()}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in own:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv if a]
        text = " ".join(words)
        if any(Path(w).name == "bpftrace" for w in words[:1]) or \
                ("tracer" in text and " run" in text and "-m" in text) or \
                "kvm-completion-tracer run" in text or "bench/floor.py" in text:
            found.append(f"{entry.name}: {text[:120]}")
    return found


# ---- tracer sessions -------------------------------------------------------------------------

def _die_with_parent() -> None:
    """In the child: SIGTERM it (a clean detach) if the harness dies, even by SIGKILL."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


@dataclass
class Session:
    """One tracer process; a reader thread stamps every stdout line on arrival (CLOCK_REALTIME)."""

    config: str
    cmd: list[str]
    ready: Callable[[str], bool]
    work: Path
    cwd: Path = REPO
    proc: subprocess.Popen[bytes] | None = None
    lines: list[tuple[int, str]] = field(default_factory=list)
    startup_s: float | None = None
    ready_rss_kb: int | None = None
    ready_rss_anon_kb: int | None = None
    _arrivals: queue.Queue[tuple[int, str]] = field(default_factory=queue.Queue)
    _reader: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        t0 = time.monotonic()
        with open(self.work / f"{self.config}.stderr", "ab") as err:
            self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, stdout=subprocess.PIPE,
                                         stderr=err, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = t0 + STARTUP_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                rc = self.proc.poll()
                self.stop()
                tail = (self.work / f"{self.config}.stderr").read_text(errors="replace").strip()
                out = " | ".join(line for _, line in self.snapshot()[-3:])
                why = f"exited with {rc}" if rc is not None else \
                    f"no ready line in {STARTUP_TIMEOUT_S:.0f} s"
                raise BenchError(f"{self.config} ({' '.join(self.cmd)}) did not become ready: "
                                 f"{why}; stderr: {tail[-600:] or '(empty)'}; "
                                 f"last stdout: {out[-600:] or '(none)'}")
            try:
                _, line = self._arrivals.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if self.ready(line):
                self.startup_s = time.monotonic() - t0
                break
        self.ready_rss_kb = rss_kb(self.proc.pid)
        self.ready_rss_anon_kb = rss_kb(self.proc.pid, "RssAnon")

    def _read(self) -> None:
        assert self.proc and self.proc.stdout
        for raw in self.proc.stdout:
            stamp = time.time_ns()
            line = raw.decode(errors="replace").rstrip("\n")
            with self._lock:
                self.lines.append((stamp, line))
            self._arrivals.put((stamp, line))

    def snapshot(self) -> list[tuple[int, str]]:
        with self._lock:
            return list(self.lines)

    @property
    def pid(self) -> int:
        assert self.proc
        return self.proc.pid

    def stop(self) -> None:
        if not self.proc or self.proc.poll() is not None:
            return
        stop_process_group(self.proc)
        if self._reader:
            self._reader.join(timeout=2)


DAEMON_REPO = REPO  # --daemon-repo: benchmark another checkout's daemon (same .venv)
_DAEMON_HELP: list[str] = []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def daemon_cmd(work: Path) -> list[str]:
    """``python -m tracer run --log-format json`` as deployed: the exporter on (a free loopback
    port, so a running daemon's 9110 is left alone), and a private ``--state-dir`` (the
    instance lock) when this daemon has them."""
    if not _DAEMON_HELP:
        out = subprocess.run([str(VENV_PY), "-m", "tracer", "run", "--help"], cwd=DAEMON_REPO,
                             capture_output=True, text=True, timeout=60)
        _DAEMON_HELP.append(out.stdout)
    cmd = [str(VENV_PY), "-m", "tracer", "run", "--log-format", "json"]
    if "--metrics-addr" in _DAEMON_HELP[0]:
        cmd += ["--metrics-addr", f"127.0.0.1:{free_port()}"]
    if "--state-dir" in _DAEMON_HELP[0]:
        cmd += ["--state-dir", str(work / "state")]
    if "--probe-cache" in _DAEMON_HELP[0]:
        # private: `daemon_cold` empties it each round, so it measures a compile
        cmd += ["--probe-cache", str(work / "probe-cache")]
    return cmd


def session_for(config: str, work: Path) -> Session | None:
    if config == "baseline":
        return None
    if config in ("daemon", "daemon_raw", "daemon_nostacks"):
        cmd = daemon_cmd(work)
        if config == "daemon_raw":
            cmd += ["--syscall-probes", "raw"]
        if config == "daemon_nostacks":
            cmd += ["--no-stacks"]
        return Session(config, cmd, lambda line: '"event": "ready"' in line, work,
                       cwd=DAEMON_REPO)
    if config == "bpftrace":
        # bpftrace prints "Attaching N probes..." just before it attaches; start-up is timed to
        # that line, and readiness for the workloads is confirmed with a probe violation.
        return Session(config, ["bpftrace", str(BENCH / "oneoff.bt")],
                       lambda line: line.startswith("Attaching"), work)
    if config in ("floor", "floor_raw"):
        kind = "raw" if config == "floor_raw" else "classic"
        return Session(config, [str(VENV_PY), str(BENCH / "floor.py"), kind],
                       lambda line: line.startswith("ready"), work)
    raise ValueError(config)


# ---- workloads -------------------------------------------------------------------------------

@dataclass
class Bench:
    args: argparse.Namespace
    exe: dict[str, Path]
    work: Path
    samples: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, row: str, config: str, value: Any) -> None:
        self.samples.setdefault(row, {}).setdefault(config, []).append(value)

    def kvmloop(self, *extra: str, seconds: float | None = None) -> dict[str, Any]:
        secs = self.args.seconds if seconds is None else seconds
        return run_json([str(self.exe["kvmloop"]), "--seconds", str(secs), *extra],
                        timeout=secs + 120)

    def wait_attached(self, sess: Session) -> float:
        """bpftrace: run 1-violation VMs until the one-off prints; returns seconds waited."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20:
            ts = self.work / "probe.ts"
            out = self.kvmloop("--violations", "1", "--ts-file", str(ts), "--pace-us", "100",
                               seconds=1)
            until = time.monotonic() + 1.0
            while time.monotonic() < until:
                if any(f" {out['pid']} " in line for _, line in sess.snapshot()):
                    return time.monotonic() - t0
                time.sleep(0.02)
        raise BenchError("bpftrace attached but never reported a probe violation")

    def watch(self, *extra: str, seconds: float | None = None) -> dict[str, Any]:
        """kvmloop as the command of `tracer watch`: kvmloop's JSON (stdout is the command's)
        plus the gate's own timings from its --json report."""
        secs = self.args.seconds if seconds is None else seconds
        report = self.work / "watch.json"
        cmd = [str(VENV_PY), "-m", "tracer", "watch", "--json", str(report), "--",
               str(self.exe["kvmloop"]), "--seconds", str(secs), *extra]
        out = run_json(cmd, timeout=secs + 180, cwd=DAEMON_REPO)
        timings = json.loads(report.read_text()).get("timings", {})
        return {**out, **{f"watch_{k}": v for k, v in timings.items()}}

    def busy(self) -> None:
        """Row 7: every core hogged (`sh -c 'while :; do :; done'`, one per core) while `watch`
        runs kvmloop flat out issuing state ioctls at every exit."""
        hogs = [subprocess.Popen(["sh", "-c", "while :; do :; done"], start_new_session=True,
                                 preexec_fn=_die_with_parent) for _ in range(os.cpu_count() or 1)]
        try:
            for variant, extra in BUSY_VARIANTS.items():
                for workload, peek in BUSY_WORKLOADS.items():
                    self.add("busy", f"{variant}_{workload}",
                             self.watch_busy(extra, peek, freeze=workload == "drain"))
        finally:
            for hog in hogs:
                stop_process_group(hog, wait_s=5)

    def watch_busy(self, extra: list[str], peek: str, freeze: bool = False) -> dict[str, Any]:
        report, mark = self.work / "watch-busy.json", self.work / "busy"
        for path in (report, Path(f"{mark}.started"), Path(f"{mark}.done")):
            path.unlink(missing_ok=True)
        k = self.args.busy_peeks
        loop_cmd = (f"{self.exe['kvmloop']} --violations {k} --pace-us 0 --peek {peek} "
                    f"--ts-file {self.work / 'busy.ts'} --seconds 600")
        script = f"touch {mark}.started; {loop_cmd}; s=$?; touch {mark}.done; exit $s"
        cmd = [str(VENV_PY), "-m", "tracer", "watch", "--json", str(report), *extra, "--",
               "sh", "-c", script]
        proc = subprocess.Popen(cmd, cwd=DAEMON_REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)
        t_cont = None
        try:
            if freeze:
                deadline = time.monotonic() + 120
                while not Path(f"{mark}.started").exists():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise BenchError(f"watch: kvmloop never started: {proc.stderr}")
                    time.sleep(0.01)
                proc.send_signal(signal.SIGSTOP)  # the reader too: kvmloop runs on
                try:
                    while not Path(f"{mark}.done").exists():
                        if time.monotonic() > deadline + 480:
                            raise BenchError("kvmloop did not finish under a frozen watch")
                        time.sleep(0.01)
                finally:
                    t_cont = time.monotonic()
                    proc.send_signal(signal.SIGCONT)
            out, err = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        # 66: the flood's findings; 65: unverified ones (its events lost): both measured
        if proc.returncode not in (0, 65, 66):
            raise BenchError(f"watch failed (exit {proc.returncode}): {err.strip()[-500:]}")
        loop = json.loads(out.strip().splitlines()[-1])
        res = json.loads(report.read_text())
        timings = res.get("timings", {})
        command_s = timings.get("command_s") or 0.0
        handled = res.get("events_handled")
        if freeze and t_cont is not None and timings.get("run_end_monotonic"):
            command_s = max(1e-6, timings["run_end_monotonic"] - t_cont)  # the drain alone
        return {"peeks": loop["violations"], "exits": loop["exits"], "frozen": freeze,
                "kvmloop_seconds": loop["seconds"], "command_s": command_s,
                "events_handled": handled, "events_lost": res.get("events_lost"),
                "unverified": res.get("unverified", {}).get("findings"),
                "violations": res.get("counts", {}).get("violations"),
                "inspections": res.get("counts", {}).get("inspections"),
                "reader_nice": res.get("reader_nice"), "ringbuf_pages": res.get("ringbuf_pages"),
                "events_per_s": handled / command_s if handled and command_s else None}

    def round(self, config: str, rows: set[str]) -> None:
        if config == "watch":
            if "busy" in rows:
                self.busy()
            if "per_exit" in rows or "startup" in rows:
                out = self.watch()
                self.add("per_exit", config, out)
                self.add("startup", "watch_s", out.get("watch_startup_s"))
                self.add("startup", "watch_spawn_s", out.get("watch_spawn_s"))
            return
        if config == "daemon" and "startup" in rows and "--probe-cache" in " ".join(
                daemon_cmd(self.work)):
            # A first start (nothing cached: bcc compiles, and saves for the next start), then
            # this round's daemon below starts from that cache.
            shutil.rmtree(self.work / "probe-cache", ignore_errors=True)
            cold = Session("daemon_cold", daemon_cmd(self.work),
                           lambda line: '"event": "ready"' in line, self.work, cwd=DAEMON_REPO)
            try:
                cold.start()
                self.add("startup", "daemon_cold_s", cold.startup_s)
                self.add("startup", "daemon_cold_rss_kb", cold.ready_rss_kb)
                self.add("startup", "daemon_cold_rss_anon_kb", cold.ready_rss_anon_kb)
            finally:
                cold.stop()
        sess = session_for(config, self.work)
        try:
            if sess:
                sess.start()
                if config == "bpftrace":
                    first = self.wait_attached(sess)
                    self.add("startup", "bpftrace_first_output_s", (sess.startup_s or 0) + first)
                if config in ("daemon", "bpftrace"):
                    self.add("startup", f"{config}_s", sess.startup_s)
                    self.add("startup", f"{config}_rss_kb", sess.ready_rss_kb)
                    self.add("startup", f"{config}_rss_anon_kb", sess.ready_rss_anon_kb)
                time.sleep(self.args.settle)
            if "per_exit" in rows:
                out = self.kvmloop()
                if sess and self.args.bpf_stats:
                    out.update(self.bpf_time(sess))
                self.add("per_exit", config, out)
            if "getppid" in rows:
                self.add("getppid", config, run_json(
                    [str(self.exe["getppid"]), str(self.args.getppid_seconds)], timeout=60))
            if "scale" in rows and config in ("baseline", "daemon", "bpftrace"):
                for n in SCALE_VCPUS:
                    self.add("scale", f"{config}_{n}", self.kvmloop(
                        "--vcpus", str(n), "--start-delay", str(SCALE_START_DELAY_S)))
            if "cpu" in rows and config in ("baseline", "daemon", "bpftrace"):
                self.add("cpu", config, self.cpu(sess))
            if "latency" in rows and sess and config in ("daemon", "bpftrace", "daemon_nostacks"):
                self.add("latency", config, self.latency(sess))
        finally:
            if sess:
                sess.stop()

    def bpf_time(self, sess: Session) -> dict[str, Any]:
        """In-kernel run time of the tracer's programs per exit, from a separate, untimed loop
        with kernel.bpf_stats_enabled on (it would slow the timed one)."""
        with bpf_stats_enabled():
            before = bpf_prog_stats(sess.pid)
            out = self.kvmloop(seconds=min(1.0, self.args.seconds))
            per_prog = bpf_delta(before, bpf_prog_stats(sess.pid))
        ns = sum(v[0] for v in per_prog.values())
        return {"bpf_exits": out["exits"], "bpf_run_ns": ns,
                "bpf_runs": sum(v[1] for v in per_prog.values()),
                "bpf_by_prog_id": {k: list(v) for k, v in per_prog.items() if v[1]},
                "bpf_ns_per_exit": ns / out["exits"] if out["exits"] else None}

    def cpu(self, sess: Session | None) -> dict[str, Any]:
        n = str(CPU_BUSY_VCPUS)
        if sess is None:
            return self.kvmloop("--vcpus", n, "--busy", n, seconds=self.args.cpu_seconds)
        before, w0 = cpu_times(sess.pid), time.monotonic()
        rss = [rss_kb(sess.pid) or 0]
        done = threading.Event()

        def _sample_rss() -> None:
            while not done.wait(0.1):
                rss.append(rss_kb(sess.pid) or 0)

        sampler = threading.Thread(target=_sample_rss, daemon=True)
        sampler.start()
        try:
            out = self.kvmloop("--vcpus", n, "--busy", n, seconds=self.args.cpu_seconds)
        finally:
            done.set()
            sampler.join()
        after, wall = cpu_times(sess.pid), time.monotonic() - w0
        return {**out, "wall_s": wall,
                "cpu_pct_stat": 100 * (after[0] - before[0]) / wall,
                "cpu_pct_schedstat": 100 * (after[1] - before[1]) / wall,
                "rss_kb_max": max(rss), "rss_kb_end": rss_kb(sess.pid)}

    def latency(self, sess: Session) -> dict[str, Any]:
        """Violation -> alert line. The daemon's violations are snapshots (KVM_GET_REGS, then
        KVM_GET_SREGS: reported at once); bpftrace's one-off reports each KVM_GET_REGS, so it
        gets them alone (a lone one is an inspection for the daemon: no alert)."""
        ts_file = self.work / f"violations-{sess.config}.ts"
        k = self.args.violations
        start_index = len(sess.snapshot())
        extra = ["--save-ioctls", "1" if not sess.config.startswith("daemon") else "2"]
        # In-kernel run time over the loop (the daemon's: report paths with and without the
        # stack capture): kernel.bpf_stats_enabled adds ~60 ns per program run, not ms.
        daemon = sess.config.startswith("daemon")
        with bpf_stats_enabled() if daemon else contextlib.nullcontext():
            before = bpf_prog_stats(sess.pid) if daemon else {}
            out = self.kvmloop("--violations", str(k), "--ts-file", str(ts_file),
                               "--pace-us", str(self.args.pace_us), *extra,
                               seconds=k * 0.01 + 30)
            per_prog = bpf_delta(before, bpf_prog_stats(sess.pid)) if daemon else {}
        pid = out["pid"]
        # "save_ns window entry_ns" lines (bench/kvmloop.c); the save's stamp is what is timed
        stamps = [tuple(map(int, line.split()[:2])) for line in ts_file.read_text().splitlines()]
        deadline = time.monotonic() + ALERT_WAIT_S
        while True:
            alerts = self.alerts(sess, pid, start_index)
            if len(alerts) >= len(stamps) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        arrival_ms, stamp_ms, matched_by = [], [], "order"
        by_window: dict[Any, dict[str, Any]] = {}
        for a in alerts:  # a snapshot's first line: its first save
            if a.get("window") is not None:
                by_window.setdefault(a["window"], a)
        if sess.config.startswith("daemon") and by_window:
            matched_by = "window"
            for ts, window in stamps:
                a = by_window.get(window)
                if a:
                    arrival_ms.append((a["arrival_ns"] - ts) / 1e6)
                    if a.get("timestamp_ns"):
                        stamp_ms.append((a["timestamp_ns"] - ts) / 1e6)
        else:
            for (ts, _), a in zip(stamps, alerts, strict=False):
                arrival_ms.append((a["arrival_ns"] - ts) / 1e6)
        return {"violations_issued": len(stamps), "alerts_seen": len(alerts),
                "matched": len(arrival_ms), "matched_by": matched_by,
                "judged_on": sorted({str(a.get("judged_on")) for a in alerts}),
                "arrival_latency_ms": arrival_ms, "timestamp_latency_ms": stamp_ms,
                "ns_per_exit": out["ns_per_exit"], "exits": out["exits"],
                "bpf_run_ns": sum(v[0] for v in per_prog.values()) if daemon else None}

    @staticmethod
    def alerts(sess: Session, pid: int, start: int) -> list[dict[str, Any]]:
        found = []
        for arrival, line in sess.snapshot()[start:]:
            if sess.config.startswith("daemon"):
                if '"completion_violation"' not in line:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("pid") != pid:
                    continue
                found.append({"arrival_ns": arrival, "window": rec.get("window"),
                              "timestamp_ns": iso_ns(rec.get("timestamp")),
                              "judged_on": rec.get("judged_on")})
            else:
                parts = line.split()
                if len(parts) >= 4 and parts[0] == "violation" and parts[2] == str(pid):
                    found.append({"arrival_ns": arrival, "nsecs": int(parts[1])})
        return found


def finding_cost_rows(latency: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """What a finding's stack costs: the daemon against daemon_nostacks on the same violations
    (paired per round). User space (unwind + symbolize, alert out): the alert latency's p50 and
    the round's first alert (cold: modules opened, llvm-symbolizer started); the kernel (the
    capture of registers and 8 KiB of stack, and the frame-pointer walk): BPF run time per
    violation, less the same loop's without stacks."""
    on, off = latency.get("daemon", []), latency.get("daemon_nostacks", [])
    pairs = list(zip(on, off, strict=False))
    if not pairs:
        return []
    rows: list[dict[str, Any]] = []

    def row(name: str, diffs: list[float], unit: str, note: str) -> None:
        rows.append({"row": name, "config": "daemon - daemon_nostacks", "median": med(diffs),
                     "min": min(diffs) if diffs else None, "n": len(diffs), "unit": unit,
                     "ratio": None, "target": "", "result": "", "note": note})

    p50 = [pct(a["arrival_latency_ms"], 50) - pct(b["arrival_latency_ms"], 50)
           for a, b in pairs if a["arrival_latency_ms"] and b["arrival_latency_ms"]]
    first = [a["arrival_latency_ms"][0] - b["arrival_latency_ms"][0]
             for a, b in pairs if a["arrival_latency_ms"] and b["arrival_latency_ms"]]
    kernel = [(a["bpf_run_ns"] / max(1, a["violations_issued"])
               - b["bpf_run_ns"] / max(1, b["violations_issued"])) / 1000
              for a, b in pairs if a.get("bpf_run_ns") is not None
              and b.get("bpf_run_ns") is not None]
    row("5 stack per finding: alert p50", p50, "ms", "user space, warm caches (paired p50s)")
    row("5 stack per finding: first alert", first, "ms",
        "user space, cold: the round's first alert (daemon started fresh)")
    row("5 stack per finding: in kernel", kernel, "us",
        "BPF run time per violation (capture + frame-pointer walk), both configs' loops")
    return rows


def iso_ns(stamp: object) -> int | None:
    if not isinstance(stamp, str):
        return None
    try:
        when = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    return int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000


# ---- summary ---------------------------------------------------------------------------------

def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def summarize(s: dict[str, Any], configs: list[str]) -> list[dict[str, Any]]:
    """The table's rows from a run's raw samples (Bench.samples, or a saved results file's)."""
    rows: list[dict[str, Any]] = []

    def row(name: str, config: str, values: list[float], unit: str, ratio: float | None = None,
            target: str = "", ok: bool | None = None, note: str = "") -> None:
        rows.append({"row": name, "config": config, "median": med(values),
                     "min": min(values) if values else None, "n": len(values), "unit": unit,
                     "ratio": ratio, "target": target,
                     "result": "" if ok is None else ("PASS" if ok else "FAIL"), "note": note})

    def vals(rowname: str, config: str, key: str) -> list[float]:
        return [x[key] for x in s.get(rowname, {}).get(config, []) if x.get(key) is not None]

    def paired(rowname: str, a: str, b: str, key: str, op: Callable[[float, float], float]
               ) -> list[float]:
        """op(a, b) round by round: a and b ran minutes apart at most, in the same round, so a
        slow stretch of the host moves both (the baseline ranged 5.0-5.8 us/exit in one day)."""
        xa, xb = s.get(rowname, {}).get(a, []), s.get(rowname, {}).get(b, [])
        return [op(x[key], y[key]) for x, y in zip(xa, xb, strict=False)
                if x.get(key) and y.get(key)]

    def ratio_of(rowname: str, a: str, b: str, key: str) -> float | None:
        return med(paired(rowname, a, b, key, lambda x, y: x / y))

    def added_of(rowname: str, a: str, b: str, key: str) -> float | None:
        return med(paired(rowname, a, b, key, lambda x, y: x - y))

    def cmp(name: str, what: str, daemon: float | None, bpftrace: float | None, unit: str) -> None:
        if daemon is None or bpftrace is None:
            return
        ratio = daemon / bpftrace if bpftrace else None
        row(name, f"daemon vs bpftrace ({what})", [daemon], unit, ratio, "daemon <= bpftrace",
            daemon <= bpftrace)

    if "per_exit" in s:
        added: dict[str, float] = {}
        # The programs' in-kernel work above the floor's (bpf_stats), paired per round.
        body = paired("per_exit", "daemon", "floor", "bpf_ns_per_exit", lambda x, y: x - y)
        for c in configs:
            v = vals("per_exit", c, "ns_per_exit")
            if not v:
                continue
            ratio = ratio_of("per_exit", c, "baseline", "ns_per_exit")
            add = added_of("per_exit", c, "baseline", "ns_per_exit")
            if c == "baseline" or ratio is None or add is None:
                row("1 per-exit", c, v, "ns/exit", 1.0 if c == "baseline" else None)
                continue
            added[c] = add
            note = f"added {add:+.0f} ns (paired per round)"
            over_floor = added_of("per_exit", c, "floor", "ns_per_exit")
            if over_floor is not None and c not in ("floor", "floor_raw"):
                note += f", {over_floor:+.0f} over floor"
            if c == "daemon" and over_floor is not None:
                # The wall-time difference swings by +-1 us from round to round on this host;
                # the programs' in-kernel work above the floor's (bpf_stats, paired) is the
                # same quantity without that noise, so both must be within the target.
                in_kernel = med(body)
                if in_kernel is not None:
                    note += f"; in-kernel {in_kernel:+.0f} over floor"
                row("1 per-exit", c, v, "ns/exit", ratio,
                    f"added <= floor's + {T_OVER_FLOOR_NS:.0f} ns (wall and in-kernel)",
                    over_floor <= T_OVER_FLOOR_NS
                    and (in_kernel is None or in_kernel <= T_OVER_FLOOR_NS), note)
            elif c == "watch" and "daemon" in added:
                row("1 per-exit", c, v, "ns/exit", ratio, "added <= daemon's + 5% of baseline",
                    add <= added["daemon"] + 0.05 * (med(vals("per_exit", "baseline",
                                                               "ns_per_exit")) or 0),
                    note + f" vs daemon's {added['daemon']:+.0f} ns")
            else:
                row("1 per-exit", c, v, "ns/exit", ratio, note=note)
        cmp("1 per-exit", "added ns", added.get("daemon"), added.get("bpftrace"), "ns")
        stacks = paired("per_exit", "daemon", "daemon_nostacks", "ns_per_exit",
                        lambda x, y: x - y)
        if stacks:
            rows.append({"row": "1 per-exit", "config": "daemon - daemon_nostacks",
                         "median": med(stacks), "min": min(stacks), "n": len(stacks),
                         "unit": "ns/exit", "ratio": ratio_of("per_exit", "daemon",
                                                              "daemon_nostacks", "ns_per_exit"),
                         "target": "", "result": "",
                         "note": "what user stacks cost per exit (taken only for reported "
                                 "ioctls): noise around 0"})
        bpf: dict[str, float | None] = {}
        for c in configs:
            v = vals("per_exit", c, "bpf_ns_per_exit")
            if v:
                bpf[c] = med(v)
                row("1 BPF run time", c, v, "ns/exit", note="in-kernel, all programs of the "
                    "tracer during the loop (bpf_stats; includes every other syscall)")
        cmp("1 BPF run time", "ns/exit", bpf.get("daemon"), bpf.get("bpftrace"), "ns/exit")
        if body:
            row("1 BPF run time", "daemon - floor", body, "ns/exit",
                note="the programs' own work above empty ones, paired per round: the wall-time "
                     "'over floor' without the host's drift (bpf_stats adds its clock reads "
                     "to both alike)")

    if "getppid" in s:
        for c in configs:
            v = vals("getppid", c, "ns_per_call")
            if not v:
                continue
            floor = "floor_raw" if c.endswith("_raw") else "floor"
            gratio = ratio_of("getppid", c, floor, "ns_per_call")
            if c == "daemon" and gratio is not None:
                row("2 getppid", c, v, "ns/call", gratio, f"<= x{T_SYSCALL_RATIO} of floor",
                    gratio <= T_SYSCALL_RATIO, "ratio vs floor")
            else:
                row("2 getppid", c, v, "ns/call", gratio, note="ratio vs floor")
        cmp("2 getppid", "ns/call", med(vals("getppid", "daemon", "ns_per_call")),
            med(vals("getppid", "bpftrace", "ns_per_call")), "ns/call")

    if "cpu" in s:
        busy = f"{CPU_BUSY_VCPUS} busy vCPUs on {os.cpu_count()} cores"
        for c in ("baseline", "daemon", "bpftrace"):
            v = vals("cpu", c, "ns_per_exit")
            if v:
                row("3 flat out", c, v, "ns/exit", ratio_of("cpu", c, "baseline", "ns_per_exit"),
                    note=busy)
        cmp("3 flat out", "ns/exit", med(vals("cpu", "daemon", "ns_per_exit")),
            med(vals("cpu", "bpftrace", "ns_per_exit")), "ns/exit")
        cpu: dict[str, float | None] = {}
        rss: dict[str, float | None] = {}
        for c in ("daemon", "bpftrace"):
            v = vals("cpu", c, "cpu_pct_schedstat")
            cpu[c] = med(v)
            if v:
                row("3 tracer CPU", c, v, "% of 1 core", None,
                    f"<= {T_CPU_PCT}%" if c == "daemon" else "",
                    (med(v) or 0) <= T_CPU_PCT if c == "daemon" else None,
                    "own process only; BPF time lands in the vCPU threads (row 1)")
            r = vals("cpu", c, "rss_kb_max")
            rss[c] = med(r)
            if r:
                row("3 tracer RSS", c, [x / 1024 for x in r], "MiB", note="max while flat out")
        cmp("3 tracer CPU", "CPU", cpu.get("daemon"), cpu.get("bpftrace"), "% of 1 core")
        cmp("3 tracer RSS", "RSS", (rss.get("daemon") or 0) / 1024 if rss.get("daemon") else None,
            (rss.get("bpftrace") or 0) / 1024 if rss.get("bpftrace") else None, "MiB")

    if "latency" in s:
        p99: dict[str, float | None] = {}
        for c in ("daemon", "bpftrace"):
            runs = s["latency"].get(c, [])
            lat = [x for r in runs for x in r["arrival_latency_ms"]]
            issued = sum(r["violations_issued"] for r in runs)
            seen = sum(r["alerts_seen"] for r in runs)
            if not runs:
                continue
            p50, p99[c] = pct(lat, 50), pct(lat, 99)
            note = f"{len(lat)} matched of {issued} issued, {seen} alerts; line arrival"
            rows.append({"row": "4 alert latency p50", "config": c, "median": p50, "min":
                         min(lat) if lat else None, "n": len(lat), "unit": "ms", "ratio": None,
                         "target": "", "result": "", "note": note})
            p99c = p99[c]
            ok = p99c is not None and p99c <= T_LATENCY_P99_MS and len(lat) == issued
            rows.append({"row": "4 alert latency p99", "config": c, "median": p99[c],
                         "min": None, "n": len(lat), "unit": "ms", "ratio": None,
                         "target": f"<= {T_LATENCY_P99_MS:.0f} ms, none missed"
                         if c == "daemon" else "",
                         "result": ("PASS" if ok else "FAIL") if c == "daemon" else "",
                         "note": note})
            if c == "daemon":
                ts = [x for r in runs for x in r["timestamp_latency_ms"]]
                if ts:
                    rows.append({"row": "4 alert latency p99", "config": "daemon (log timestamp)",
                                 "median": pct(ts, 99), "min": pct(ts, 50), "n": len(ts),
                                 "unit": "ms", "ratio": None, "target": "", "result": "",
                                 "note": "from the line's own timestamp (us); min col = p50"})
        cmp("4 alert latency p99", "p99", p99.get("daemon"), p99.get("bpftrace"), "ms")
        rows.extend(finding_cost_rows(s["latency"]))

    busy = s.get("busy", {})
    if busy:
        for variant in BUSY_VARIANTS:
            v = vals("busy", f"{variant}_drain", "events_per_s")
            if v:
                # against the same ring with the reader at nice 0: what the priority buys
                # (watch_before's ring keeps too little of a flood to time a drain)
                r = ratio_of("busy", f"{variant}_drain", "watch_nice0_drain", "events_per_s")
                lost = vals("busy", f"{variant}_drain", "events_lost")
                handled = vals("busy", f"{variant}_drain", "events_handled")
                row("7 busy: reader events/s", variant, v, "events/s", r,
                    note=f"drain of a flood taken in while frozen, all cores hogged: "
                         f"{int(sum(handled))} events read, {int(sum(lost))} lost")
        for variant in BUSY_VARIANTS:
            for workload in ("flood", "peeks"):
                v = vals("busy", f"{variant}_{workload}", "events_lost")
                if not v:
                    continue
                correct = workload == "peeks"
                ok = (sum(v) <= T_BUSY_PEEKS_LOST) if variant == "watch" else None
                unverified = vals("busy", f"{variant}_{workload}", "unverified")
                peeks = vals("busy", f"{variant}_{workload}", "peeks")
                handled = vals("busy", f"{variant}_{workload}", "events_handled")
                row("7 busy: events lost", f"{variant} {workload}", v, "events",
                    target=f"== {T_BUSY_PEEKS_LOST}" if ok is not None else "", ok=ok,
                    note=f"{int(sum(peeks))} exits with {BUSY_WORKLOADS[workload]}; "
                         f"{int(sum(handled))} events read; unverified findings "
                         f"{int(sum(unverified))}"
                         + ("; correct code: judged in the kernel" if correct else ""))

    st = s.get("startup", {})
    if st:
        for c in ("daemon", "daemon_cold", "bpftrace"):
            v = [x for x in st.get(f"{c}_s", []) if x is not None]
            if v:
                what = {"daemon": "to `ready`, probes from the cache (probes.cache_dir)",
                        "daemon_cold": "to `ready`, first start: bcc compiles (and caches)",
                        "bpftrace": "to 'Attaching N probes'"}[c]
                target, ok = ((f"<= {T_STARTUP_S} s", (med(v) or 0) <= T_STARTUP_S)
                              if c == "daemon" else ("", None))
                row("5 start-up", c, v, "s", target=target, ok=ok, note=what)
        v = st.get("bpftrace_first_output_s", [])
        if v:
            row("5 start-up", "bpftrace (first alert)", v, "s", note="incl. a probe VM run")
        v = [x for x in st.get("watch_s", []) if x is not None]
        if v:
            spawn = [x for x in st.get("watch_spawn_s", []) if x is not None]
            row("5 start-up", "watch", v, "s", note="`watch` started -> probes attached; then "
                f"CMD started in {1000 * (med(spawn) or 0):.1f} ms (probes attached -> exec)")
        for c in ("daemon", "daemon_cold", "bpftrace"):
            v = [x / 1024 for x in st.get(f"{c}_rss_kb", []) if x]
            if v:
                row("5 RSS after start", c, v, "MiB")
            v = [x / 1024 for x in st.get(f"{c}_rss_anon_kb", []) if x]
            if v:
                row("5 RSS after start", f"{c} (RssAnon)", v, "MiB",
                    note="own memory, without shared library page cache")
        cmp("5 start-up", "start-up", med(st.get("daemon_s", [])),
            med(st.get("bpftrace_s", [])), "s")
        for key, what in (("rss_kb", "RSS"), ("rss_anon_kb", "RssAnon")):
            dr = [x for x in st.get(f"daemon_{key}", []) if x]
            br = [x for x in st.get(f"bpftrace_{key}", []) if x]
            cmp("5 RSS after start", what, statistics.median(dr) / 1024 if dr else None,
                statistics.median(br) / 1024 if br else None, "MiB")

    if "scale" in s:
        ratios: dict[str, list[float]] = {}
        for n in SCALE_VCPUS:
            bv = vals("scale", f"baseline_{n}", "ns_per_exit")
            if bv:
                row("6 scale", f"baseline, {n} vCPUs", bv, "ns/exit", 1.0)
            for c in ("daemon", "bpftrace"):
                v = vals("scale", f"{c}_{n}", "ns_per_exit")
                r = ratio_of("scale", f"{c}_{n}", f"baseline_{n}", "ns_per_exit")
                if not v or r is None:
                    continue
                add = added_of("scale", f"{c}_{n}", f"baseline_{n}", "ns_per_exit")
                row("6 scale", f"{c}, {n} vCPUs", v, "ns/exit", r,
                    note=f"added {add:+.0f} ns (paired)" if add is not None else "")
                ratios.setdefault(c, []).append(r)
        for c, rs in ratios.items():
            if len(rs) < 2:
                continue
            growth = max(rs[1:]) - rs[0]
            rows.append({"row": "6 scale", "config": f"{c} ratio growth 1..{SCALE_VCPUS[-1]}",
                         "median": growth, "min": None, "n": len(rs),
                         "unit": "max(r_n) - r_1", "ratio": None,
                         "target": f"<= {T_SCALE_GROWTH:.2f}" if c == "daemon" else "",
                         "result": ("PASS" if growth <= T_SCALE_GROWTH else "FAIL")
                         if c == "daemon" else "",
                         "note": f"spread (max-min) {max(rs) - min(rs):.3f}; 1 busy vCPU, the "
                                 f"others idle, {SCALE_START_DELAY_S:.0f} s settle after "
                                 "creating them"})
        d, b = ratios.get("daemon"), ratios.get("bpftrace")
        if d and b:
            cmp("6 scale", f"ratio at {SCALE_VCPUS[-1]} vCPUs", d[-1], b[-1], "x baseline")
    return rows


def fmt(x: Any, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if unit in ("s", "max(r_n) - r_1") or abs(x) < 10:
            return f"{x:.3f}"
        return f"{x:.1f}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def table(rows: list[dict[str, Any]]) -> str:
    head = ["row", "configuration", "median", "min", "unit", "ratio", "target", "result", "note"]
    body = [[r["row"], r["config"], fmt(r["median"], r["unit"]), fmt(r["min"], r["unit"]),
             r["unit"], "-" if r["ratio"] is None else f"{r['ratio']:.3f}", r["target"] or "-",
             r["result"] or "-", r["note"]] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=False)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


# ---- main ------------------------------------------------------------------------------------

def host_facts() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    bt = shutil.which("bpftrace")
    bt_version = subprocess.run([bt, "--version"], capture_output=True, text=True).stdout.strip() \
        if bt else None
    return {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "kernel": platform.release(), "cpu_model": cpu, "cpus": os.cpu_count(),
            "python": sys.version.split()[0], "bpftrace": bt_version}


def preflight(configs: list[str]) -> None:
    if os.geteuid() != 0:
        raise BenchError("needs root (BPF and /dev/kvm): run with sudo")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise BenchError("/dev/kvm is missing or not read-write")
    if {"daemon", "floor", "watch"} & set(configs) and not VENV_PY.exists():
        raise BenchError(f"{VENV_PY} missing: run `make setup` first")
    if "daemon" in configs or "floor" in configs:
        probe = subprocess.run([str(VENV_PY), "-c", "import bcc"], capture_output=True, text=True)
        if probe.returncode:
            raise BenchError("bcc not importable from .venv: apt-get install python3-bpfcc and "
                             "`make setup`")
    if "bpftrace" in configs and not shutil.which("bpftrace"):
        raise BenchError("bpftrace not found: apt-get install bpftrace (or pass "
                         "--configs baseline,daemon,floor)")
    if not any(os.path.isdir(p) for p in ("/sys/kernel/tracing/events",
                                          "/sys/kernel/debug/tracing/events")):
        raise BenchError("tracefs not mounted: mount -t tracefs nodev /sys/kernel/tracing")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs, 1 round (CI smoke)")
    p.add_argument("--rounds", type=int, help="rounds of alternated configurations (default 5)")
    p.add_argument("--out", type=Path, default=BENCH / "results.json", help="JSON output path")
    p.add_argument("--only", help=f"comma-separated rows: {','.join(ROWS)} (default all)")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated configurations (default {','.join(CONFIGS)})")
    p.add_argument("--seconds", type=float, help="per-exit kvmloop run length (default 2)")
    p.add_argument("--getppid-seconds", type=float, help="getppid loop length (default 1)")
    p.add_argument("--cpu-seconds", type=float, help="flat-out run for the CPU row (default 3)")
    p.add_argument("--violations", type=int, help="violations per latency run (default 1000)")
    p.add_argument("--pace-us", type=int, default=1000, help="gap between violations (1000)")
    p.add_argument("--busy-peeks", type=int,
                   help="state reads per busy-runner run (row 7; default 100000, 20000 --quick)")
    p.add_argument("--settle", type=float, default=0.3, help="pause after a tracer is ready")
    p.add_argument("--build-dir", type=Path, help="where to build (default: a temp dir)")
    p.add_argument("--no-bpf-stats", dest="bpf_stats", action="store_false",
                   help="skip the in-kernel BPF run time row (an extra, untimed 1 s loop per "
                   "tracer and round with kernel.bpf_stats_enabled=1)")
    p.add_argument("--summarize", type=Path, metavar="RESULTS",
                   help="run nothing: recompute RESULTS' table from its raw samples with this "
                   "version's targets, print it and write it back into RESULTS")
    p.add_argument("--daemon-repo", type=Path, default=REPO,
                   help="checkout whose tracer/ the daemon runs (default: this one)")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"rounds": 1 if quick else 5, "seconds": 0.3 if quick else 2.0,
                "getppid_seconds": 0.2 if quick else 1.0, "cpu_seconds": 0.5 if quick else 3.0,
                "violations": 200 if quick else 1000, "busy_peeks": 20000 if quick else 100000}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.rows = set(ROWS if not args.only else args.only.split(","))
    bad = args.rows - set(ROWS)
    if bad:
        p.error(f"--only: unknown rows {sorted(bad)}; choose from {','.join(ROWS)}")
    args.config_list = [c for c in CONFIGS if c in args.configs.split(",")]
    if set(args.configs.split(",")) - set(CONFIGS):
        p.error(f"--configs: choose from {','.join(CONFIGS)}")
    return args


def resummarize(path: Path) -> int:
    """The table of a saved run, recomputed from its samples (a target changed since)."""
    try:
        result = json.loads(path.read_text())
        samples, configs = result["samples"], result["configs"]
        if not isinstance(samples, dict) or not isinstance(configs, list):
            raise TypeError("'samples' must be an object and 'configs' a list")
        rows = summarize(samples, configs)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        print(f"bench: error: cannot summarize {path}: {type(err).__name__}: {err} "
              "(expected a results file written by bench/run.py)", file=sys.stderr)
        return 2
    text = table(rows)
    print(text)
    result["table"], result["table_text"] = rows, text
    path.write_text(json.dumps(result, indent=1) + "\n")
    log(f"rewrote the table of {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    global DAEMON_REPO
    args = parse_args(argv)
    if args.summarize is not None:
        return resummarize(args.summarize)
    DAEMON_REPO = args.daemon_repo.resolve()
    started = time.monotonic()

    def _terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through every `finally`: tracers are stopped

    signal.signal(signal.SIGTERM, _terminate)
    try:
        preflight(args.config_list)
        with tempfile.TemporaryDirectory(prefix="kct-bench-") as tmp:
            work = Path(tmp)
            exe = build(args.build_dir or work / "build")
            bench = Bench(args, exe, work)
            facts = host_facts()
            interference = other_tracers([])
            if interference:
                log(f"warning: other tracers are running, numbers will be skewed: {interference}")
            needed = set()
            for c in args.config_list:
                if c in ("floor", "floor_raw", "daemon_raw") \
                        and not args.rows & {"per_exit", "getppid"}:
                    continue
                if c == "daemon_nostacks" and not args.rows & {"per_exit", "getppid", "latency"}:
                    continue
                if c == "baseline" and not args.rows & {"per_exit", "getppid", "scale", "cpu"}:
                    continue
                if c == "bpftrace" and not args.rows - {"scale"}:
                    continue
                needed.add(c)
            order = [c for c in CONFIGS if c in needed]
            for r in range(args.rounds):
                for config in order:
                    log(f"round {r + 1}/{args.rounds}: {config}")
                    bench.round(config, args.rows)
            rows = summarize(bench.samples, order)
            text = table(rows)
            print(text)
            result = {**facts, "args": {k: (str(v) if isinstance(v, Path) else v)
                                        for k, v in vars(args).items() if k != "rows"},
                      "rows_selected": sorted(args.rows), "configs": order,
                      "elapsed_s": round(time.monotonic() - started, 1),
                      "other_tracers_at_start": interference,
                      "latency_method": "line arrival: a reader thread stamps each stdout line "
                      "of the tracer (CLOCK_REALTIME) minus kvmloop's CLOCK_REALTIME stamp right "
                      "before the ioctl; the daemon's own ISO timestamp (us) also recorded",
                      "table": rows, "table_text": text, "samples": bench.samples}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
            log(f"wrote {args.out} in {result['elapsed_s']} s")
    except BenchError as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
