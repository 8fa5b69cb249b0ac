"""Fault campaign: the real daemon against real KVM under churn, overload, a stalled reader, a
crash, a soak, a scrape storm and hostile VMM names.  Run as root from the repo root:
``.venv/bin/python bench/faults.py`` (``make faults``).  Standard library only: the daemon,
the C drivers (bench/kvmloop.c, bench/churn.c) and prometheus_client's exposition parser (in the
.venv's Python) run as subprocesses; BPF maps and programs are read with the bpf(2) syscall.

Rows (``--only ROW,...``; each has its pass criterion in CRITERIA below and in the table):
  churn     10 000 VMs (1-4 vCPUs) by bench/churn.c: exits pending at close, dup'd and closed
            fds, fd reuse, SIGKILL inside KVM_RUN, forked children holding vCPU fds; then the
            daemon's per-vCPU/fd/thread/process maps, gauges, dead VMs' series and RSS
  overload  --ringbuf-pages 1 and a violation flood: loss and counters exact, a known
            violation right after reported, no false one
  stall     SIGSTOP of the daemon (10 s) under a flood, then SIGCONT: the same checks
  crash     SIGKILL under load, restart through the lock wait (--lock-wait): no program left,
            no false or duplicate alert, every window opened after ready reported, running
            vCPUs re-learned
  soak      10 minutes, 1 busy vCPU + a snapshot every 10 ms: every alert, RSS/CPU slopes
  storm     /metrics at 20 Hz during a flood: detection unchanged, scrape p99
  hostile   comm, argv and QEMU -name with quotes, newlines, escapes, invalid UTF-8, 4 KiB:
            valid JSON lines, a parseable exposition (prometheus_client), bounded labels
Prints one table (row, measured figures, pass criterion, PASS/FAIL) and writes JSON (--out,
default bench/faults.json) with every raw figure and the host facts; exits 1 when a row fails.
``--short`` runs each row in seconds (what tests/e2e/test_faults.py runs).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import json
import os
import platform
import queue
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from run import BenchError, stop_process_group
from run import build as bench_build
from run import log as bench_log
from run import run_json as bench_run_json

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENV_PY = REPO / ".venv" / "bin" / "python"
ROWS = ("churn", "overload", "stall", "crash", "soak", "storm", "hostile")
STARTUP_TIMEOUT_S = 60.0
MiB = 1024 * 1024

# Pass criteria (the issue's, made numeric where it says "flat" or "p99").
T_CHURN_RSS_MIB = 5.0            # daemon RSS growth over the churn
T_SOAK_RSS_SLOPE = 0.25          # MiB per minute, after the first interval
T_SOAK_CPU_SLOPE = 0.5           # percentage points of one core per minute, absolute
T_SOAK_SHORT_RSS_MIB = 5.0       # --short: the soak is too short for a slope; growth instead
T_ALERT_P99_MS = 100.0           # violation -> alert line (as bench/run.py's latency row)
T_SCRAPE_P99_MS = 250.0
MAX_VM_LABEL = 128               # tracer/vmident.py MAX_NAME_LEN: a VM name is cut there
MAX_LABEL = 256                  # any other label value
RETAIN_GONE_S = 2.0              # metrics.retain_gone_seconds for the churn row
SWEEP_S = 5.0                    # tracer/daemon.py SWEEP_S: how often gone VMs are pruned
IDLE_S = 1.0                     # the daemon's --snapshot-idle (default)
FOLD_TIMEOUT_S = 60.0            # a gone process not folded by the daemon after this: a failure

# Maps keyed by process, thread, vCPU or fd (bpf/completion.c): empty once every process that
# had a vCPU is gone. How each entry names its owner: ("key"|"value", offset, "tgid"|"tid"|
# "uid"): a tgid or tid that no longer exists, or a vCPU uid no longer in `vcpus`, is a leftover.
# `vcpus` is an array: its slots in use are those with a uid (value offset 0) other than 0.
OWNED_MAPS: dict[str, tuple[str, int, str]] = {
    "vcpus": ("value", 32, "tgid"),
    "vcpu_fds": ("key", 0, "tgid"),
    "vcpu_refs": ("key", 0, "uid"),
    "run_threads": ("key", 0, "tid"),
    "inflight": ("key", 0, "tid"),
    "procs": ("key", 0, "tgid"),
    "unknown_fds": ("key", 0, "tgid"),
    "mid_counts": ("key", 0, "tgid"),
    "lost_windows": ("value", 0, "tgid"),
    "guest_exits": ("key", 0, "tgid"),
    "guest_entries": ("key", 0, "tgid"),
}


# The harness's own error, log line and build step are bench/run.py's (a sibling script).
FaultError = BenchError


def log(msg: str) -> None:
    bench_log(msg, "faults")


def build(build_dir: Path) -> dict[str, Path]:
    return bench_build(build_dir, ("kvmloop", "churn"))


def run_json(cmd: list[str], timeout: float) -> dict[str, Any]:
    return bench_run_json(cmd, timeout)


# ---- bpf(2): the daemon's maps and programs --------------------------------------------------

_NR_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
BPF_MAP_LOOKUP_ELEM, BPF_MAP_GET_NEXT_KEY = 1, 4
BPF_PROG_GET_FD_BY_ID, BPF_MAP_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD = 13, 14, 15
BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LRU_HASH = 1, 9
_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    ret = int(_libc.syscall(ctypes.c_long(_NR_BPF), ctypes.c_int(cmd), attr,
                            ctypes.c_uint(len(attr))))
    if ret < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return ret


def _addr(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


def fd_ids(pid: int, kind: str) -> set[int]:
    """``map_id`` or ``prog_id`` of every BPF map or program fd the process holds."""
    out = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fdinfo").iterdir():
            with contextlib.suppress(OSError):
                for line in fd.read_text().splitlines():
                    if line.startswith(f"{kind}:"):
                        out.add(int(line.split()[1]))
    return out


def prog_exists(prog_id: int) -> bool:
    attr = ctypes.create_string_buffer(16)
    struct.pack_into("I", attr, 0, prog_id)
    try:
        fd = _bpf(BPF_PROG_GET_FD_BY_ID, attr)
    except OSError:
        return False
    os.close(fd)
    return True


@dataclass
class MapDump:
    name: str
    map_type: int
    max_entries: int
    entries: list[tuple[bytes, bytes]]


def dump_map(map_id: int) -> MapDump | None:
    """Every (key, value) of a hash map by id (None for other types)."""
    attr = ctypes.create_string_buffer(16)
    struct.pack_into("I", attr, 0, map_id)
    try:
        fd = _bpf(BPF_MAP_GET_FD_BY_ID, attr)
    except OSError:
        return None
    try:
        info = ctypes.create_string_buffer(256)
        attr = ctypes.create_string_buffer(16)
        struct.pack_into("IIQ", attr, 0, fd, len(info), _addr(info))
        _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
        mtype, _, ksize, vsize, max_entries = struct.unpack_from("5I", info, 0)
        name = info.raw[24:40].split(b"\0")[0].decode(errors="replace")
        if mtype not in (BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LRU_HASH):
            return MapDump(name, mtype, max_entries, [])
        key = ctypes.create_string_buffer(max(ksize, 1))
        nxt = ctypes.create_string_buffer(max(ksize, 1))
        val = ctypes.create_string_buffer(max(vsize, 1))
        entries: list[tuple[bytes, bytes]] = []
        first = True
        for _ in range(2 * max_entries + 2):
            attr = ctypes.create_string_buffer(32)
            struct.pack_into("IIQQ", attr, 0, fd, 0, 0 if first else _addr(key), _addr(nxt))
            try:
                _bpf(BPF_MAP_GET_NEXT_KEY, attr)
            except OSError:
                break  # ENOENT: the last key
            first = False
            ctypes.memmove(key, nxt, ksize)
            attr = ctypes.create_string_buffer(32)
            struct.pack_into("IIQQQ", attr, 0, fd, 0, _addr(key), _addr(val), 0)
            try:
                _bpf(BPF_MAP_LOOKUP_ELEM, attr)
            except OSError:
                continue  # deleted meanwhile
            entries.append((key.raw[:ksize], val.raw[:vsize]))
        return MapDump(name, mtype, max_entries, entries)
    finally:
        os.close(fd)


def owned_map_entries(pid: int) -> dict[str, tuple[int, set[tuple[bytes, bytes]]]]:
    """Per owned map of the daemon ``pid``: its entry count and its leftover entries (entries
    whose process, thread or vCPU is gone), as (key, value) bytes. The maps are read one after
    the other, not at one instant: an entry of another VMM on the host that is being created
    or dropped meanwhile can look left over in one reading (see :func:`owned_map_report`)."""
    dumps = {d.name: d for d in (dump_map(i) for i in sorted(fd_ids(pid, "map_id")))
             if d is not None}
    if "vcpus" in dumps:
        d = dumps["vcpus"]
        dumps["vcpus"] = MapDump(d.name, d.map_type, d.max_entries,
                                 [(k, v) for k, v in d.entries if struct.unpack_from("Q", v)[0]])
    live_uids = {struct.unpack_from("Q", v)[0] for _, v in dumps["vcpus"].entries} \
        if "vcpus" in dumps else set()
    out: dict[str, tuple[int, set[tuple[bytes, bytes]]]] = {}
    for name, (where, off, what) in OWNED_MAPS.items():
        d = dumps.get(name)
        if d is None:
            continue
        left = set()
        for k, v in d.entries:
            raw = k if where == "key" else v
            if what == "uid":
                gone = struct.unpack_from("Q", raw, off)[0] not in live_uids
            else:
                gone = not os.path.exists(f"/proc/{struct.unpack_from('I', raw, off)[0]}")
            if gone:
                left.add((bytes(k), bytes(v)))
        out[name] = (len(d.entries), left)
    return out


def holds_process(pid: int, tgid: int) -> bool:
    """Whether the daemon ``pid`` still holds kernel counts of process ``tgid``: its
    ``mid_counts`` keys (every report is counted there first) or ``lost_windows`` entries.
    The daemon takes both when it forgets the process (tracer.tracker._forget_process: at its
    exit event, or at the /proc sweep when that event was lost), in the same step that counts
    them into its violation, alerts_lost and snapshot figures."""
    for map_id in sorted(fd_ids(pid, "map_id")):
        d = dump_map(map_id)
        if d is None or d.name not in ("mid_counts", "lost_windows"):
            continue
        for k, v in d.entries:
            raw = k if d.name == "mid_counts" else v
            if struct.unpack_from("I", raw, 0)[0] == tgid:
                return True
    return False


def owned_map_report(pid: int, settle_s: float = 0.0) -> dict[str, dict[str, int]]:
    """Per owned map of the daemon ``pid``: entries, and leftovers. With ``settle_s``, an entry
    is a leftover only when it is one in two readings ``settle_s`` apart (a leak stays; another
    VMM's vCPU created or dropped between the reads of two maps does not), so the figure does
    not depend on what else runs on the host."""
    first = owned_map_entries(pid)
    if settle_s > 0:
        time.sleep(settle_s)
        second = owned_map_entries(pid)
        first = {name: (second[name][0], left & second[name][1])
                 for name, (_, left) in first.items() if name in second}
    return {name: {"entries": n, "leftover": len(left)} for name, (n, left) in first.items()}


# ---- process figures -------------------------------------------------------------------------

def rss_kb(pid: int, field_name: str = "VmRSS") -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field_name}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_s(pid: int) -> float:
    """Sum of the per-thread schedstat run time (s)."""
    total = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys over xs."""
    if len(xs) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else None


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child: SIGTERM it (a clean detach) if the harness dies, even by SIGKILL."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


# ---- the exposition --------------------------------------------------------------------------

Sample = tuple[str, dict[str, str], float]


def parse_exposition(text: str) -> list[Sample]:
    """name{label="value",...} value: enough of the text format for the daemon's page."""
    out: list[Sample] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        labels: dict[str, str] = {}
        brace = line.find("{")
        space = line.find(" ")
        if brace != -1 and (space == -1 or brace < space):
            name, i = line[:brace], brace + 1
            while line[i] != "}":
                eq = line.index("=", i)
                key = line[i:eq].strip().lstrip(",").strip()
                i = eq + 2  # past ="
                val = []
                while line[i] != '"':
                    if line[i] == "\\":
                        i += 1
                        val.append({"n": "\n", "\\": "\\", '"': '"'}.get(line[i], line[i]))
                    else:
                        val.append(line[i])
                    i += 1
                labels[key] = "".join(val)
                i += 1
                if line[i] == ",":
                    i += 1
            rest = line[i + 1:].split()
        else:
            name, rest = line[:space], line[space + 1:].split()
        out.append((name, labels, float(rest[0])))
    return out


def metric_sum(samples: list[Sample], name: str, **match: str | Callable[[str], bool]) -> float:
    total = 0.0
    for n, labels, value in samples:
        if n != name:
            continue
        ok = True
        for k, want in match.items():
            got = labels.get(k)
            if got is None or (callable(want) and not want(got)) or \
                    (isinstance(want, str) and got != want):
                ok = False
                break
        if ok:
            total += value
    return total


# ---- the daemon ------------------------------------------------------------------------------

ALERT_EVENTS = ("completion_violation", "completion_snapshot")


@dataclass
class Alert:
    arrival_ns: int
    event: str
    pid: int | None
    window: int | None
    ioctl: str | None
    vm: str | None
    comm: str | None


# The storm row's scraper, a process of its own: GET URL at HZ until its stdin is closed; prints
# {"latency_ms": [...], "errors": [...], "seconds": s}. A page without the daemon's families
# is an error (a half-written exposition).
SCRAPER = """
import json, sys, threading, time, urllib.request
url, hz = sys.argv[1], float(sys.argv[2])
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
lat, errors, t_start = [], [], time.monotonic()
nxt = t_start
while not done.is_set():
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            if "kvm_completion_probes_attached" not in resp.read().decode("utf-8"):
                errors.append("incomplete page")
    except OSError as err:
        errors.append(str(err))
    lat.append((time.monotonic() - t0) * 1000)
    nxt += 1 / hz
    done.wait(max(0.0, nxt - time.monotonic()))
print(json.dumps({"latency_ms": lat, "errors": errors[:5], "seconds": time.monotonic() - t_start}))
"""


@dataclass
class Daemon:
    """One ``tracer run --log-format json`` with a private state dir and metrics port. A reader
    thread stamps every stdout line, checks it is one valid JSON object (strict UTF-8), keeps
    notices in full and alerts in short (a soak has hundreds of thousands)."""

    work: Path
    name: str
    extra: list[str] = field(default_factory=list)
    state_dir: Path | None = None
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    notices: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    lines: int = 0
    startup_s: float | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _reader: threading.Thread | None = None
    _arrivals: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)

    def cmd(self) -> list[str]:
        if self.state_dir is None:
            self.state_dir = self.work / f"state-{self.name}"
        if not self.port:
            self.port = free_port()
        return [str(VENV_PY), "-m", "tracer", "run", "--log-format", "json",
                "--metrics-addr", f"127.0.0.1:{self.port}", "--state-dir", str(self.state_dir),
                *self.extra]

    def start(self, wait_ready: bool = True) -> Daemon:
        t0 = time.monotonic()
        with open(self.work / f"{self.name}.stderr", "ab") as err:
            self.proc = subprocess.Popen(self.cmd(), cwd=REPO, stdout=subprocess.PIPE,
                                         stderr=err, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait_ready:
            self.wait_ready(t0)
        return self

    def wait_ready(self, t0: float | None = None) -> None:
        t0 = time.monotonic() if t0 is None else t0
        assert self.proc
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() - t0 > STARTUP_TIMEOUT_S:
                rc = self.proc.poll()
                self.stop()
                tail = (self.work / f"{self.name}.stderr").read_text(errors="replace")[-600:]
                raise FaultError(f"daemon {self.name} did not become ready (exit {rc}); "
                                 f"stderr: {tail.strip() or '(empty)'}")
        self.startup_s = time.monotonic() - t0

    def _read(self) -> None:
        assert self.proc and self.proc.stdout
        for raw in self.proc.stdout:
            stamp = time.time_ns()
            self.lines += 1
            try:
                text = raw.decode("utf-8")  # strict: invalid UTF-8 is an invalid line
                rec = json.loads(text)
                if not isinstance(rec, dict) or not text.endswith("\n"):
                    raise ValueError("not one JSON object on one line")
            except ValueError:
                with self._lock:
                    if len(self.invalid) < 20:
                        self.invalid.append(repr(raw[:300]))
                    else:
                        self.invalid.append("...")
                continue
            event = rec.get("event")
            with self._lock:
                if event in ALERT_EVENTS:
                    self.alerts.append(Alert(stamp, event, rec.get("pid"), rec.get("window"),
                                             rec.get("ioctl"), rec.get("vm"), rec.get("comm")))
                else:
                    rec["_arrival_ns"] = stamp
                    self.notices.append(rec)
            if event == "ready":
                self._ready.set()

    @property
    def pid(self) -> int:
        assert self.proc
        return self.proc.pid

    def alerts_for(self, pid: int, event: str = "completion_violation") -> list[Alert]:
        with self._lock:
            return [a for a in self.alerts if a.pid == pid and a.event == event]

    def notices_named(self, event: str) -> list[dict[str, Any]]:
        with self._lock:
            return [n for n in self.notices if n.get("event") == event]

    def url(self, path: str = "/metrics") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def scrape_text(self, timeout: float = 10.0) -> str:
        with urllib.request.urlopen(self.url(), timeout=timeout) as resp:
            return str(resp.read().decode("utf-8"))

    def metrics(self) -> list[Sample]:
        return parse_exposition(self.scrape_text())

    def counter(self, name: str) -> int:
        """One of the daemon's kernel counters, as exported (0 when absent)."""
        return int(metric_sum(self.metrics(), name))

    def lost_violation(self) -> int:
        return int(metric_sum(self.metrics(), "kvm_completion_events_lost_total",
                              event_type="violation"))

    def settle(self, quiet_s: float = IDLE_S + 1.0, timeout: float = 30.0) -> None:
        """Until no stdout line arrived for ``quiet_s`` (idle windows judged), or ``timeout``."""
        end = time.monotonic() + timeout
        last, seen = time.monotonic(), self.lines
        while time.monotonic() < end:
            time.sleep(0.1)
            if self.lines != seen:
                last, seen = time.monotonic(), self.lines
            elif time.monotonic() - last >= quiet_s:
                return

    def stop(self) -> int | None:
        if not self.proc:
            return None
        if self.proc.poll() is None:
            stop_process_group(self.proc, wait_s=15, cont=True)
        if self._reader:
            self._reader.join(timeout=5)
        return self.proc.returncode

    def kill(self) -> None:
        assert self.proc
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        if self._reader:
            self._reader.join(timeout=5)


@contextlib.contextmanager
def daemon(work: Path, name: str, *extra: str) -> Iterator[Daemon]:
    d = Daemon(work, name, list(extra))
    try:
        yield d.start()
    finally:
        d.stop()


# ---- rows ------------------------------------------------------------------------------------

@dataclass
class Row:
    name: str
    criterion: str
    checks: dict[str, bool] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    error: str | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.checks) and all(self.checks.values())

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.name, "result": "PASS" if self.passed else "FAIL",
                "summary": self.summary, "criterion": self.criterion, "checks": self.checks,
                "failed_checks": [k for k, v in self.checks.items() if not v],
                "error": self.error, "seconds": round(self.seconds, 1),
                "figures": self.figures}


@dataclass
class Flood:
    """A kvmloop violation flood: K snapshots (KVM_GET_REGS + KVM_GET_SREGS) mid-completion.
    Each window: its id (the vCPU's exit count), when its first save was issued (``stamps``)
    and when the KVM_RUN that opened it was entered (``entries``), CLOCK_REALTIME ns."""

    out: dict[str, Any]
    windows: list[int]
    stamps: list[int]
    entries: list[int]

    @property
    def pid(self) -> int:
        return int(self.out["pid"])

    @property
    def generated(self) -> int:  # violation reports: two ioctls a snapshot
        return 2 * len(self.windows)


class Campaign:
    def __init__(self, args: argparse.Namespace, exe: dict[str, Path], work: Path) -> None:
        self.args, self.exe, self.work = args, exe, work
        self.short: bool = args.short
        self._n = 0

    def kvmloop(self, *extra: str, seconds: float = 60.0) -> dict[str, Any]:
        return run_json([str(self.exe["kvmloop"]), "--seconds", str(seconds), *extra],
                        timeout=seconds + 120)

    def flood(self, k: int, pace_us: int, *extra: str) -> Flood:
        self._n += 1
        ts = self.work / f"flood-{self._n}.ts"
        out = self.kvmloop("--violations", str(k), "--ts-file", str(ts), "--pace-us",
                           str(pace_us), *extra, seconds=k * (pace_us / 1e6 + 0.001) + 60)
        rows = [tuple(map(int, line.split())) for line in ts.read_text().splitlines()]
        return Flood(out, [w for _, w, _ in rows], [t for t, _, _ in rows],
                     [e for _, _, e in rows])

    def known_violation(self, d: Daemon) -> dict[str, Any]:
        """One snapshot mid-completion, after the fault: reported exactly (2 violations with
        its window, 1 snapshot), its counter +2; and a correct VMM right after: no alert.
        The ring is the host's: when events were lost meanwhile (another VMM on the host
        filled it; the fault is over), the snapshot must be counted exactly instead
        (violations 2, snapshots 1, alert lines + alerts_lost == 2)."""
        lost0 = d.counter("kvm_completion_events_lost_total")
        f = self.flood(1, 1000)
        correct = self.kvmloop("--vcpus", "2", seconds=0.3)
        folded = self.wait_folded(d, f.pid)
        d.settle(quiet_s=IDLE_S + 0.5, timeout=10)
        v = d.alerts_for(f.pid)
        m = d.metrics()
        lost = int(metric_sum(m, "kvm_completion_events_lost_total")) - lost0
        vm = f"kvmloop[{f.pid}]"
        total = metric_sum(m, "kvm_completion_violations_total", vm=vm)
        snaps = metric_sum(m, "kvm_completion_snapshots_total", vm=vm)
        alerts_lost = metric_sum(m, "kvm_completion_alerts_lost_total", vm=vm)
        lines = len(d.alerts_for(f.pid, "completion_snapshot"))
        windows = {a.window for a in v}
        if lost == 0:
            ok = len(v) == 2 and windows == set(f.windows) and lines == 1 and total == 2
        else:
            ok = (total == 2 and snaps == 1 and len(v) + alerts_lost == 2
                  and windows <= set(f.windows) and lines <= 1)
        false = len(d.alerts_for(correct["pid"])) + \
            len(d.alerts_for(correct["pid"], "completion_snapshot"))
        # Which names the alerts and the series gave the process (a failure says where the
        # counts went).
        alert_vms = sorted({a.vm or "" for a in v})
        series_vms = sorted({labels.get("vm", "") for n, labels, _ in m
                             if n == "kvm_completion_violations_total"
                             and f"[{f.pid}]" in labels.get("vm", "")})
        return {"reported": ok and folded is not None, "violation_lines": len(v),
                "alert_vms": alert_vms, "series_vms": series_vms,
                "counter": total, "snapshots_total": snaps, "alerts_lost": alerts_lost,
                "events_lost_meanwhile": lost, "folded_after_s": folded,
                "correct_vmm_alerts": false, "pid": f.pid, "correct_pid": correct["pid"]}

    @staticmethod
    def wait_folded(d: Daemon, pid: int) -> float | None:
        """Seconds until the daemon has folded the gone process ``pid`` (:func:`holds_process`
        false), None after FOLD_TIMEOUT_S. Its figures are complete only then: the windows
        whose every report the ring buffer dropped are counted from the kernel's lost_windows
        when the process is forgotten, and under a full ring (another VMM's events fill it
        too) its exit event may be lost as well, so that happens at the daemon's next /proc
        sweep (SWEEP_S), later than any quiet time on its output says."""
        t0 = time.monotonic()
        # Two readings: a hash map walked while other processes' keys come and go may miss one.
        while holds_process(d.pid, pid) or holds_process(d.pid, pid):
            if time.monotonic() - t0 > FOLD_TIMEOUT_S:
                return None
            time.sleep(0.1)
        return time.monotonic() - t0

    def flood_figures(self, d: Daemon, f: Flood, lost_before: int) -> dict[str, Any]:
        """The exactness checks of a flood, once the daemon has folded its process (the kernel
        counts of it taken) and its output settled."""
        folded = self.wait_folded(d, f.pid)
        d.settle()
        m = d.metrics()
        vm = f"kvmloop[{f.pid}]"
        lost = int(metric_sum(m, "kvm_completion_events_lost_total",
                              event_type="violation")) - lost_before
        delivered = d.alerts_for(f.pid)
        windows = set(f.windows)
        first: dict[int | None, Alert] = {}
        for a in delivered:  # a snapshot's first line: its first save
            first.setdefault(a.window, a)
        lat = [(first[w].arrival_ns - ts) / 1e6
               for w, ts in zip(f.windows, f.stamps, strict=True) if w in first]
        # Every name the flood's process got: in each metric family and in its alerts (one
        # name per process, also for what only the kernel counted while the reader stalled).
        names: dict[str, list[str]] = {}
        for n, lab, _ in m:
            name = lab.get("vm", "")
            if name.endswith(f"[{f.pid}]") or (name and lab.get("pid") == str(f.pid)):
                names.setdefault(name, []).append(n)
        for a in delivered:
            names.setdefault(a.vm or "", []).append(a.event)
        return {
            "vm_names": {k: sorted(set(v)) for k, v in names.items()},
            "folded_after_s": folded, "pid": f.pid, "generated": f.generated,
            "snapshots_generated": len(f.windows),
            "delivered": len(delivered), "lost_violation": lost,
            "violations_total": metric_sum(m, "kvm_completion_violations_total", vm=vm),
            "snapshots_total": metric_sum(m, "kvm_completion_snapshots_total", vm=vm),
            "alerts_lost_total": metric_sum(m, "kvm_completion_alerts_lost_total", vm=vm),
            # The kernel's lost counter is the host's: other VMMs' reports dropped meanwhile
            # are in it too (what the daemon counted lost for each of them, here).
            "alerts_lost_other_vms": {lab.get("vm", ""): v for n, lab, v in m
                                      if n == "kvm_completion_alerts_lost_total" and v
                                      and lab.get("vm") != vm},
            # A snapshot-only VMM has no benign register peek: any inspection is a violation
            # judged benign.
            "inspections_total": metric_sum(m, "kvm_completion_inspections_total", vm=vm),
            "snapshot_lines": len(d.alerts_for(f.pid, "completion_snapshot")),
            "map_full": {lab.get("map", ""): v for n, lab, v in m
                         if n == "kvm_completion_map_full_total" and v},
            "foreign_windows": len({a.window for a in delivered} - windows),
            "events_lost_all": int(metric_sum(m, "kvm_completion_events_lost_total")),
            "scrape_errors": metric_sum(m, "kvm_completion_scrape_errors_total"),
            "internal_errors": metric_sum(m, "kvm_completion_internal_errors_total"),
            "alert_p50_ms": pct(lat, 50), "alert_p99_ms": pct(lat, 99),
            "kvmloop": f.out,
        }

    @staticmethod
    def exact_checks(fig: dict[str, Any], expect_loss: bool) -> dict[str, bool]:
        # Loss is checked per process: alerts_lost_total{vm} (the kernel's mid_counts of the
        # flood's process minus the reports the tracker got) against generated - delivered
        # (kvmloop's own count, the alert lines on stdout). The kernel's lost counter has no
        # process: a host-wide figure, at least that (equal on a host with no other VMM).
        lost = fig["generated"] - fig["delivered"]
        checks = {
            "the daemon folded the flood's process (its kernel counts taken)":
                fig["folded_after_s"] is not None,
            "alerts_lost_total == generated - delivered": fig["alerts_lost_total"] == lost,
            "kernel lost counter (host-wide) >= generated - delivered":
                fig["lost_violation"] >= lost,
            "violations_total == generated": fig["violations_total"] == fig["generated"],
            "snapshots_total == snapshots generated":
                fig["snapshots_total"] == fig["snapshots_generated"],
            "no alert outside the generated windows": fig["foreign_windows"] == 0,
            "no save of a snapshot judged a benign inspection": fig["inspections_total"] == 0,
            "no internal or scrape error": fig["internal_errors"] == 0 and
            fig["scrape_errors"] == 0,
            "one name for the process in every family and alert":
                list(fig["vm_names"]) == [f"kvmloop[{fig['pid']}]"],
        }
        if expect_loss:
            checks["the ring buffer overflowed (generated - delivered > 0)"] = lost > 0
        return checks

    # -- churn ---------------------------------------------------------------------------------

    def churn(self, row: Row) -> None:
        vms = self.args.churn_vms or (1000 if self.short else 10000)
        conf = self.work / "churn.toml"
        conf.write_text(f"[metrics]\nretain_gone_seconds = {RETAIN_GONE_S}\n")
        with daemon(self.work, "churn", "--config", str(conf)) as d:
            # Warm-up: a churn and a scrape of its series, so what the first VMs and the first
            # big page allocate once is in the baseline. Its page must be as big as the one
            # after the churn: that one holds the VMs still within retain_gone_seconds, all
            # of them in the short row (1000 VMs in ~2 s), a few hundred in the full one (the
            # rest are pruned while it runs).
            warm = run_json([str(self.exe["churn"]), "--vms", str(min(vms, 1000)),
                             "--workers", str(self.args.workers)], 300)
            d.settle(quiet_s=1.0)
            d.metrics()
            rss0, anon0 = rss_kb(d.pid) or 0, rss_kb(d.pid, "RssAnon") or 0
            lost0 = d.counter("kvm_completion_events_lost_total")
            t0 = time.monotonic()
            out = run_json([str(self.exe["churn"]), "--vms", str(vms), "--workers",
                            str(self.args.workers)], timeout=900)
            churn_s = time.monotonic() - t0
            d.settle(quiet_s=1.0)
            rss_pre_scrape = rss_kb(d.pid) or 0
            t_scrape = time.monotonic()
            page = d.scrape_text(timeout=60)
            scrape_s = time.monotonic() - t_scrape
            m = parse_exposition(page)
            dead = [lab["vm"] for n, lab, _ in m if n == "kvm_completion_vm_info"
                    and lab.get("vm", "").startswith("churn[")]
            series_dead = sum(1 for n, lab, _ in m if lab.get("vm", "").startswith("churn["))
            # Maps: empty once every churn process is gone (the /proc sweep for lost exits runs
            # every SWEEP_S); gone VMs' series are pruned at the first sweep after
            # retain_gone_seconds. Poll the maps until then.
            t_end = time.monotonic()
            until = t_end + RETAIN_GONE_S + SWEEP_S + 1
            maps_clean_s = None
            while time.monotonic() < until:
                maps = owned_map_report(d.pid, settle_s=0.5)
                if sum(v["leftover"] for v in maps.values()) == 0:
                    maps_clean_s = time.monotonic() - t_end
                    break
                time.sleep(0.5)
            time.sleep(max(0.0, until - time.monotonic()))
            m = d.metrics()
            maps = owned_map_report(d.pid, settle_s=SWEEP_S + 1)

            def churn_vm(vm: str) -> bool:
                return vm.startswith("churn[")

            gauges = {g: metric_sum(m, f"kvm_completion_{g}", vm=churn_vm)
                      for g in ("vcpus", "pending_vcpus", "pending_oldest_seconds")}
            series_left = sum(1 for n, lab, _ in m if lab.get("vm", "").startswith("churn["))
            rss1, anon1 = rss_kb(d.pid) or 0, rss_kb(d.pid, "RssAnon") or 0
            lost = d.counter("kvm_completion_events_lost_total") - lost0
            untracked = metric_sum(m, "kvm_completion_untracked_exits_total")
            map_full = metric_sum(m, "kvm_completion_map_full_total")
            internal = metric_sum(m, "kvm_completion_internal_errors_total")
            # The churn's own (other VMMs on the host are not this row's business)
            alerts = [a for a in d.alerts if churn_vm(a.vm or "")]
        growth = (rss1 - rss0) / 1024
        leftover = {k: v for k, v in maps.items() if v["leftover"]}
        left_text = ", ".join(f"{k} {v['leftover']}" for k, v in leftover.items()) or "-"
        row.figures = {"churn": out, "warmup": warm, "churn_seconds": churn_s, "maps": maps,
                       "maps_clean_after_s": maps_clean_s,
                       "gauges": gauges, "vm_series_right_after": series_dead,
                       "dead_vms_with_info_right_after": len(dead),
                       "vm_series_after_retention": series_left,
                       "retain_gone_seconds": RETAIN_GONE_S, "rss_kb_before": rss0,
                       "rss_kb_after": rss1, "rss_kb_after_churn_before_scrape": rss_pre_scrape,
                       "big_scrape_bytes": len(page), "big_scrape_s": scrape_s,
                       "rss_anon_kb_before": anon0,
                       "rss_anon_kb_after": anon1, "rss_growth_mib": growth,
                       "events_lost": lost, "map_full": map_full, "untracked_exits": untracked,
                       "internal_errors": internal, "alerts": len(alerts),
                       "alerts_sample": [{"event": a.event, "vm": a.vm, "comm": a.comm,
                                          "ioctl": a.ioctl, "window": a.window}
                                         for a in alerts[:10]],
                       "invalid_lines": len(d.invalid)}
        row.checks = {
            "churn driver ran every VM": out["vms"] == vms and not out["failed"],
            "owned maps: no leftover entry": not leftover,
            "gauges 0 (vcpus, pending_vcpus, pending_oldest_seconds)":
                all(v == 0 for v in gauges.values()),
            "dead VMs' series dropped after retain_gone_seconds": series_left == 0,
            f"RSS growth <= {T_CHURN_RSS_MIB:.0f} MiB": growth <= T_CHURN_RSS_MIB,
            "no alert (the churn is correct KVM use)": not alerts,
            "no event lost, no map full, no internal error":
                lost == 0 and map_full == 0 and internal == 0,
        }
        row.summary = (f"{out['vms']} VMs / {out['vcpus']} vCPUs in {churn_s:.1f} s; leftover "
                       f"map entries {sum(v['leftover'] for v in maps.values())} "
                       f"({left_text}); gauges {sum(gauges.values()):g}; "
                       f"dead-VM series {series_dead} -> {series_left}; RSS {growth:+.2f} MiB; "
                       f"alerts {len(alerts)}; lost {lost}")

    # -- overload ------------------------------------------------------------------------------

    def overload(self, row: Row) -> None:
        k = 3000 if self.short else 20000
        with daemon(self.work, "overload", "--ringbuf-pages", "1") as d:
            lost0 = d.lost_violation()
            f = self.flood(k, 0)
            fig = self.flood_figures(d, f, lost0)
            known = self.known_violation(d)
        row.figures = {**fig, "known_after": known, "ringbuf_pages": 1}
        row.checks = {**self.exact_checks(fig, expect_loss=True),
                      "known violation after: reported exactly": known["reported"],
                      "no false alert (correct VMM after)": known["correct_vmm_alerts"] == 0}
        row.summary = flood_summary(fig, known)

    # -- stalled reader ------------------------------------------------------------------------

    def stall(self, row: Row) -> None:
        stop_s = 2.0 if self.short else 10.0
        pace_us = 500
        k = int((stop_s + 3) * 1e6 / pace_us / 1.2)
        with daemon(self.work, "stall") as d:
            lost0 = d.lost_violation()
            result: dict[str, Flood] = {}
            th = threading.Thread(target=lambda: result.update(f=self.flood(k, pace_us)))
            th.start()
            time.sleep(1.0)
            os.killpg(d.pid, signal.SIGSTOP)
            t_stop = time.monotonic()
            time.sleep(stop_s)
            os.killpg(d.pid, signal.SIGCONT)
            stopped = time.monotonic() - t_stop
            th.join()
            f = result["f"]
            healthy = False
            for _ in range(50):
                with contextlib.suppress(urllib.error.URLError, OSError), \
                        urllib.request.urlopen(d.url("/-/healthy"), timeout=2) as resp:
                    healthy = resp.status == 200
                if healthy:
                    break
                time.sleep(0.1)
            fig = self.flood_figures(d, f, lost0)
            known = self.known_violation(d)
        row.figures = {**fig, "known_after": known, "sigstop_seconds": stopped,
                       "healthy_after_sigcont": healthy}
        row.checks = {**self.exact_checks(fig, expect_loss=True),
                      "known violation after: reported exactly": known["reported"],
                      "no false alert (correct VMM after)": known["correct_vmm_alerts"] == 0,
                      "/-/healthy 200 after SIGCONT": healthy}
        row.summary = f"SIGSTOP {stopped:.1f} s; " + flood_summary(fig, known)

    # -- crash ---------------------------------------------------------------------------------

    def crash(self, row: Row) -> None:
        state = self.work / "state-crash"
        a = Daemon(self.work, "crash-a", state_dir=state)
        b = Daemon(self.work, "crash-b", ["--lock-wait", "15"], state_dir=state)
        load_s = 8.0 if self.short else 16.0
        # The load: 4 vCPUs, 2 of them flat out in KVM_RUN across the crash, until it is killed
        # after the second scrape (a slow start must not let it end before); and a violator:
        # a snapshot every 0.7 s for about load_s, from before the kill to after the restart.
        load = subprocess.Popen([str(self.exe["kvmloop"]), "--vcpus", "4", "--busy", "2",
                                 "--seconds", str(load_s + 60)], stdout=subprocess.PIPE,
                                text=True, preexec_fn=_die_with_parent)
        try:
            a.start()
            viol: dict[str, Flood] = {}
            k = int((load_s - 2) / 0.7)
            th = threading.Thread(target=lambda: viol.update(f=self.flood(k, 700_000)))
            th.start()
            time.sleep(2.5)
            progs_a = fd_ids(a.pid, "prog_id")
            # SIGKILL, and the new instance at once: the killed one still holds the lock while
            # the kernel tears its programs down, so the new one goes through the lock wait.
            t_kill = time.time_ns()
            assert a.proc
            os.killpg(a.pid, signal.SIGKILL)
            t0 = time.monotonic()
            b.start(wait_ready=False)
            a.proc.wait(timeout=30)
            a_gone_s = time.monotonic() - t0
            b.wait_ready(t0)
            t_ready = time.time_ns()
            restart_s = time.monotonic() - t0
            leftover_progs = sorted(p for p in progs_a if prog_exists(p))
            ready = b.notices_named("ready")[0]
            time.sleep(1.0)
            m1 = b.metrics()
            time.sleep(1.0)
            m2 = b.metrics()
            th.join()
            load.kill()
            load.wait(timeout=60)
            b.settle()
            known = self.known_violation(b)
            f = viol["f"]
            lvm = f"kvmloop[{load.pid}]"
            untracked1 = metric_sum(m1, "kvm_completion_untracked_exits_total")
            exits1 = metric_sum(m1, "kvm_completion_userspace_exits_total", vm=lvm)
            exits2 = metric_sum(m2, "kvm_completion_userspace_exits_total", vm=lvm)
            vcpus_seen = metric_sum(m1, "kvm_completion_vcpus", vm=lvm)
            untracked = metric_sum(m2, "kvm_completion_untracked_exits_total")
            # Windows: A's are kvmloop's exit counts; B counts the adopted vCPU's windows from
            # its adoption, so B's alerts are matched by number and time, not by window id.
            wa = {x.window for x in a.alerts_for(f.pid)}
            b_alerts = b.alerts_for(f.pid)
            wb = [x.window for x in b_alerts]
            b_early = [x for x in b_alerts if x.arrival_ns < t_ready]
            # B must report every window opened after its ready line (the KVM_RUN that exited
            # entered after B had attached and adopted); a window opened before it and saved
            # after it was open across the adoption: B may see it or not (the gap).
            t_ready_line = int(ready.get("_arrival_ns", t_ready))
            timeline = crash_timeline(f, wa, b_alerts, t_kill, t_ready_line)
            after_ready = [w for w in timeline if w["opened"] == "after ready"]
            straddling = [w for w in timeline if w["opened"] == "across ready"]
            in_gap = [w for w in timeline if w["opened"] == "gap"]
            waited = b.notices_named("waiting_for_lock")
            false_b = [x for x in b.alerts if x.pid not in (f.pid, known["pid"])]
        finally:
            with contextlib.suppress(ProcessLookupError):
                load.kill()
            a.stop()
            b.stop()
        row.figures = {
            "progs_of_killed_daemon": len(progs_a), "leftover_progs": leftover_progs,
            "restart_s": restart_s, "waiting_for_lock_lines": len(waited),
            "waiting_for_lock": waited[:1], "vcpus_adopted": ready.get("vcpus_adopted"),
            "load_vcpus_tracked": vcpus_seen, "load_exits_counted_1s": exits2 - exits1,
            "untracked_exits": untracked, "violator_windows": len(f.windows),
            "windows_reported_by_a": len(wa), "windows_reported_by_b": len(set(wb)),
            "windows_after_ready": len(after_ready), "windows_in_gap": len(in_gap),
            "windows_across_ready": len(straddling), "windows": timeline,
            "events_lost_b": metric_sum(m2, "kvm_completion_events_lost_total"),
            "b_alerts_before_its_ready": len(b_early), "a_gone_after_s": a_gone_s,
            "untracked_exits_before": untracked1, "duplicates_within_b": len(wb) - 2 * len(set(wb)),
            "false_alerts_b": len(false_b), "known_after": known,
        }
        row.checks = {
            "the restart went through the lock wait (waiting_for_lock)": len(waited) == 1,
            "no program of the killed daemon left attached": not leftover_progs,
            "running vCPUs re-learned (4 tracked, exits counted, no untracked exit after)":
                vcpus_seen == 4 and exits2 > exits1 and untracked == untracked1,
            "no false alarm (load, other pids, A outside the violator's windows)":
                not false_b and wa <= set(f.windows),
            "no duplicate alert (B: 2 lines a window, none before its ready, A+B <= generated)":
                len(wb) == 2 * len(set(wb)) and not b_early and
                len(wa) + len(set(wb)) <= len(f.windows),
            "every window opened after ready reported by B (none of A's era)":
                crash_windows_ok(timeline, len(set(wb))),
            "known violation after: reported exactly": known["reported"],
            "no false alert (correct VMM after)": known["correct_vmm_alerts"] == 0,
        }
        row.summary = (f"SIGKILL -> ready {restart_s:.1f} s (waited for the lock: "
                       f"{'yes' if waited else 'no'}); {len(leftover_progs)}/{len(progs_a)} "
                       f"old programs left; adopted {ready.get('vcpus_adopted')} vCPUs, load "
                       f"{vcpus_seen:g}/4 tracked; violator windows {len(f.windows)}: A "
                       f"reported {len(wa)}, gap {len(in_gap)}, opened after ready "
                       f"{len(after_ready)} (+{len(straddling)} open across it), B reported "
                       f"{len(set(wb))}; false {len(false_b)}")

    # -- soak ----------------------------------------------------------------------------------

    def soak(self, row: Row) -> None:
        secs = self.args.soak_seconds or (10.0 if self.short else 600.0)
        interval = 60.0 if secs >= 180 else max(1.0, secs / 5)
        pace_us = 10_000
        k = int(secs * 1e6 / pace_us)
        samples: list[tuple[float, int, float]] = []
        with daemon(self.work, "soak") as d:
            lost0 = d.lost_violation()
            done = threading.Event()

            def sample() -> None:
                t0 = time.monotonic()
                while True:
                    samples.append((time.monotonic() - t0, rss_kb(d.pid) or 0, cpu_s(d.pid)))
                    if done.wait(interval):
                        return

            th = threading.Thread(target=sample, daemon=True)
            th.start()
            try:
                f = self.flood(k, pace_us)
            finally:
                done.set()
                th.join()
            fig = self.flood_figures(d, f, lost0)
        mins = [t / 60 for t, _, _ in samples]
        rss = [r / 1024 for _, r, _ in samples]
        cpu_pct = [100 * (samples[i][2] - samples[i - 1][2]) / (samples[i][0] - samples[i - 1][0])
                   for i in range(1, len(samples))]
        rss_slope = slope(mins[1:], rss[1:])
        cpu_slope = slope(mins[1:], cpu_pct)
        row.figures = {**fig, "soak_seconds": secs, "interval_s": interval,
                       "samples": [{"t_s": t, "rss_kb": r, "cpu_s": c} for t, r, c in samples],
                       "cpu_pct_per_interval": cpu_pct, "rss_slope_mib_per_min": rss_slope,
                       "cpu_slope_pct_per_min": cpu_slope,
                       "rss_growth_mib": rss[-1] - rss[1] if len(rss) > 1 else None}
        row.checks = {
            "every alert delivered (violations, snapshots)": fig["delivered"] ==
            fig["generated"] and fig["snapshot_lines"] == fig["snapshots_generated"],
            "nothing lost": fig["lost_violation"] == 0 and fig["events_lost_all"] == 0,
            "violations_total == generated": fig["violations_total"] == fig["generated"],
        }
        if self.short or secs < 180:
            growth = row.figures["rss_growth_mib"] or 0.0
            row.checks[f"RSS growth <= {T_SOAK_SHORT_RSS_MIB:.0f} MiB (short: no slope)"] = \
                growth <= T_SOAK_SHORT_RSS_MIB
        else:
            row.checks[f"RSS slope <= {T_SOAK_RSS_SLOPE} MiB/min"] = \
                rss_slope is not None and rss_slope <= T_SOAK_RSS_SLOPE
            row.checks[f"|CPU slope| <= {T_SOAK_CPU_SLOPE} %/min"] = \
                cpu_slope is not None and abs(cpu_slope) <= T_SOAK_CPU_SLOPE
        cpu_mean = statistics.fmean(cpu_pct[1:]) if len(cpu_pct) > 1 else None
        row.summary = (f"{secs:.0f} s, {len(f.windows)} snapshots (1/10 ms): delivered "
                       f"{fig['delivered']}/{fig['generated']}, lost {fig['lost_violation']}; "
                       f"RSS {rss[1] if len(rss) > 1 else 0:.1f} -> {rss[-1]:.1f} MiB, slope "
                       f"{fmt(rss_slope)} MiB/min; CPU {fmt(cpu_mean)}"
                       f" %, slope {fmt(cpu_slope)} %/min")

    # -- scrape storm --------------------------------------------------------------------------

    def storm(self, row: Row) -> None:
        k = 2000 if self.short else 10000
        pace_us = 1000
        with daemon(self.work, "storm") as d:
            lost0 = d.lost_violation()
            base = self.flood_figures(d, self.flood(k, pace_us), lost0)
            lost1 = d.lost_violation()
            # The scraper is a process of its own, as Prometheus is: a thread here would share
            # this process's GIL with the thread parsing the daemon's alert lines, and time
            # that wait (scrapes of 0.1-0.5 s with a CPU hog, while the daemon served each
            # in under 40 ms).
            scraper = subprocess.Popen([sys.executable, "-c", SCRAPER, d.url(), "20"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True)
            try:
                f = self.flood(k, pace_us)
            finally:
                out, _ = scraper.communicate("", timeout=60)  # stdin closed: it stops
            scraped = json.loads(out or '{"latency_ms": [], "errors": ["scraper died"]}')
            lat: list[float] = scraped["latency_ms"]
            errors: list[str] = scraped["errors"]
            rate = len(lat) / scraped["seconds"] if lat else 0.0
            fig = self.flood_figures(d, f, lost1)
        row.figures = {**fig, "baseline_flood": base, "scrapes": len(lat),
                       "scrape_hz": rate, "scrape_errors_http": errors[:5],
                       "scrape_p50_ms": pct(lat, 50), "scrape_p99_ms": pct(lat, 99),
                       "scrape_max_ms": max(lat) if lat else None,
                       "scrape_latency_ms": lat}
        p99 = fig["alert_p99_ms"]
        row.checks = {
            **self.exact_checks(fig, expect_loss=False),
            "detection unaffected: every alert delivered": fig["delivered"] == fig["generated"]
            and fig["lost_violation"] == 0,
            f"alert p99 <= {T_ALERT_P99_MS:.0f} ms under the storm":
                p99 is not None and p99 <= T_ALERT_P99_MS,
            "scrapes at >= 18 Hz, none failed": rate >= 18 and not errors,
            f"scrape p99 <= {T_SCRAPE_P99_MS:.0f} ms":
                (pct(lat, 99) or 1e9) <= T_SCRAPE_P99_MS,
        }
        row.summary = (f"{len(lat)} scrapes at {rate:.1f} Hz, p50 {fmt(pct(lat, 50))} ms, p99 "
                       f"{fmt(pct(lat, 99))} ms, {len(errors)} failed; flood {k} snapshots: "
                       f"delivered {fig['delivered']}/{fig['generated']}, alert p99 "
                       f"{fmt(p99)} ms (without storm {fmt(base['alert_p99_ms'])} ms)")

    # -- hostile names -------------------------------------------------------------------------

    def hostile(self, row: Row) -> None:
        big = (b'"\\\n\x1b[31m\xff\xfe\xc3\x28\t{}=,' * 300)[:4096]
        cases: list[tuple[str, bytes, list[bytes]]] = [
            ("qemu-name", b'q"\n\\\x1b\xff\xfe{}',
             [b"qemu-system-x86_64", b"-name", b'guest=a"b\\c\nd\x1b[31m\xff\xfe' + big +
              b",debug-threads=on", b"-uuid", b'not"a\nuuid'] + [big] * 4),
            ("argv0-4k", b'\xc3\x28"\n\t\\x\x7f', [big, b"-name", big]),
            ("injection", b"normal",
             [b"qemu-kvm", b"-name", b'x"} 1\nkvm_completion_fake_metric{vm="y"} 42\n# HELP ']),
            ("utf8-and-4k", "\u202e\U0001F4A5".encode(),
             [b"/usr/bin/qemu-system-x86_64", b"-name",
              b"guest=" + "\u202e\U0001F4A5\u0001".encode() + b"\\" * 4096]),
            ("comm-only", b"\n\n\n\"\"\\\\\xff", [b"\n", b"\xff" * 4096]),
        ]
        results = []
        with daemon(self.work, "hostile") as d:
            for name, comm, argv in cases:
                env = {**os.environ, "CHURN_HOSTILE_COMM_HEX": comm.hex(),
                       "CHURN_HOSTILE_VIOLATIONS": "3", "CHURN_HOSTILE_LINGER_MS": "400"}
                proc = subprocess.run(argv, executable=str(self.exe["churn"]), env=env,
                                      capture_output=True, timeout=60)
                if proc.returncode:
                    raise FaultError(f"hostile {name}: churn failed: {proc.stderr[-300:]!r}")
                results.append((name, json.loads(proc.stdout)))
            d.settle()
            text = d.scrape_text()
            parsed = parse_with_prometheus_client(text)
            per_case = {}
            for name, out in results:
                v = d.alerts_for(out["pid"])
                s = d.alerts_for(out["pid"], "completion_snapshot")
                vms = {a.vm for a in v + s}
                vm = next(iter(vms)) if len(vms) == 1 else None
                total = metric_sum(parse_exposition(text), "kvm_completion_violations_total",
                                   vm=vm) if vm is not None else None
                per_case[name] = {"pid": out["pid"], "violation_lines": len(v),
                                  "snapshot_lines": len(s), "vm": vm,
                                  "vm_len": len(vm) if vm else None,
                                  "comm": v[0].comm if v else None, "violations_total": total}
            invalid = list(d.invalid)
            lines = d.lines
        labels = parsed.get("max_label_len", {})
        row.figures = {"cases": per_case, "log_lines": lines, "invalid_log_lines": invalid,
                       "exposition_parse": parsed.get("error") or "ok",
                       "families": parsed.get("families"), "max_label_len": labels,
                       "fake_metric_present": parsed.get("fake", True),
                       "exposition_bytes": len(text)}
        max_vm = labels.get("vm", 0)
        max_other = max((v for k, v in labels.items() if k != "vm"), default=0)
        row.checks = {
            "every log line is one valid JSON object (strict UTF-8)": not invalid,
            "the exposition parses (prometheus_client)": "error" not in parsed,
            "no series injected through a name": not parsed.get("fake", True),
            f"vm label <= {MAX_VM_LABEL} chars, others <= {MAX_LABEL}":
                max_vm <= MAX_VM_LABEL and max_other <= MAX_LABEL,
            "every hostile VM's 3 snapshots reported under one name, counters exact": all(
                c["violation_lines"] == 6 and c["snapshot_lines"] == 3 and c["vm"] and
                c["violations_total"] == 6 for c in per_case.values()),
        }
        row.summary = (f"{len(cases)} hostile VMMs; {lines} log lines, {len(invalid)} invalid; "
                       f"exposition {row.figures['exposition_parse']}, "
                       f"{parsed.get('families')} families; max label vm {max_vm}, other "
                       f"{max_other}; alerts {sum(c['violation_lines'] for c in per_case.values())}"
                       f"/{6 * len(cases)}")


def crash_timeline(f: Flood, reported_by_a: set[int | None], b_alerts: list[Alert], t_kill: int,
                   t_ready: int) -> list[dict[str, Any]]:
    """The crash row's windows in order: when each was opened (the KVM_RUN that exited
    entered) and saved against the kill and B's ready line, and which instance reported it.
    B numbers windows from its adoption, so its alerts are matched by time: each B window's
    first line goes to the latest window saved before it arrived (windows are 0.7 s apart)."""
    by_b: set[int] = set()
    first: dict[int | None, int] = {}
    for a in b_alerts:
        first.setdefault(a.window, a.arrival_ns)
    for arrival in first.values():
        saved = [i for i, ts in enumerate(f.stamps) if ts <= arrival]
        if saved:
            by_b.add(saved[-1])
    out = []
    for i, (w, ts, entry) in enumerate(zip(f.windows, f.stamps, f.entries, strict=True)):
        if entry > t_ready:
            opened = "after ready"
        elif ts > t_ready:
            opened = "across ready"
        elif ts >= t_kill:
            opened = "gap"
        else:
            opened = "before kill"
        out.append({"window": w, "opened": opened,
                    "saved_ms_after_ready": round((ts - t_ready) / 1e6, 3),
                    "open_us": round((ts - entry) / 1e3, 1),
                    "reported_by": "B" if i in by_b else "A" if w in reported_by_a else None})
    return out


def crash_windows_ok(timeline: list[dict[str, Any]], b_windows: int) -> bool:
    """B reported every window opened after its ready line; each of its windows is one saved
    after the kill (B attaches, then adopts, then says ready: one saved in between is seen),
    and no two are one."""
    by_b = [w for w in timeline if w["reported_by"] == "B"]
    return (all(w["reported_by"] == "B" for w in timeline if w["opened"] == "after ready")
            and len(by_b) == b_windows
            and all(w["opened"] != "before kill" for w in by_b))


def flood_summary(fig: dict[str, Any], known: dict[str, Any]) -> str:
    return (f"generated {fig['generated']}, delivered {fig['delivered']}, lost "
            f"{fig['lost_violation']} (gen-del {fig['generated'] - fig['delivered']}); "
            f"violations_total {fig['violations_total']:g}, snapshots_total "
            f"{fig['snapshots_total']:g}/{fig['snapshots_generated']}, alerts_lost "
            f"{fig['alerts_lost_total']:g}; known after: "
            f"{'reported' if known['reported'] else 'NOT reported exactly'}; false "
            f"{known['correct_vmm_alerts'] + fig['foreign_windows']}")


PARSE_SCRIPT = r"""
import json, sys
from prometheus_client.parser import text_string_to_metric_families
text = sys.stdin.read()
out = {"families": 0, "max_label_len": {}, "fake": False}
try:
    for fam in text_string_to_metric_families(text):
        out["families"] += 1
        if "fake" in fam.name:
            out["fake"] = True
        for s in fam.samples:
            if "fake" in s.name:
                out["fake"] = True
            for k, v in s.labels.items():
                out["max_label_len"][k] = max(out["max_label_len"].get(k, 0), len(v))
except Exception as err:
    out["error"] = f"{type(err).__name__}: {err}"
print(json.dumps(out))
"""


def parse_with_prometheus_client(text: str) -> dict[str, Any]:
    proc = subprocess.run([str(VENV_PY), "-c", PARSE_SCRIPT], input=text, capture_output=True,
                          text=True, timeout=60)
    if proc.returncode:
        return {"error": proc.stderr.strip()[-300:]}
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


CRITERIA = {
    "churn": "every owned map (vcpus, vcpu_fds, vcpu_refs, run_threads, inflight, procs, "
             "unknown_fds, mid_counts, lost_windows, guest_*) has no entry of a gone process; "
             "gauges 0; dead VMs' series gone after retain_gone_seconds; RSS growth <= "
             f"{T_CHURN_RSS_MIB:.0f} MiB; no alert, no loss",
    "overload": "ringbuf 1 page: alerts_lost == generated - delivered (per process; the "
                "kernel's host-wide lost counter >= it), violations_total, snapshots_total "
                "exact once the daemon folded the process; known violation after reported "
                "(or counted exactly if the host's events filled the ring meanwhile), no "
                "false one",
    "stall": "SIGSTOP under a flood, SIGCONT: same checks as overload; /-/healthy after",
    "crash": "SIGKILL under load, restart through the lock wait: no old program left, no "
             "false or duplicate alert, every window opened after ready reported, running vCPUs "
             "re-learned",
    "soak": "1 busy vCPU + a snapshot every 10 ms: every alert delivered, nothing lost; RSS "
            f"slope <= {T_SOAK_RSS_SLOPE} MiB/min, |CPU slope| <= {T_SOAK_CPU_SLOPE} %/min",
    "storm": f"/metrics at 20 Hz during a flood: every alert delivered, alert p99 <= "
             f"{T_ALERT_P99_MS:.0f} ms, no scrape failed, scrape p99 <= {T_SCRAPE_P99_MS:.0f} ms",
    "hostile": "quotes, newlines, escapes, invalid UTF-8, 4 KiB in comm/argv/-name: every log "
               "line valid JSON, the exposition parses, labels bounded, alerts exact",
}


# ---- output ----------------------------------------------------------------------------------

def fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"
    return str(x)


def table(rows: list[Row]) -> str:
    head = ["row", "result", "measured", "pass criterion"]
    body = [[r.name, "PASS" if r.passed else "FAIL",
             (r.summary or "") + (f" ERROR: {r.error}" if r.error else "") +
             ("" if r.passed or r.error else
              " [failed: " + "; ".join(k for k, v in r.checks.items() if not v) + "]"),
             r.criterion] for r in rows]
    lines = []
    for cells in [head, ["-" * 7, "-" * 6, "-" * 8, "-" * 14], *body]:
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def host_facts() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "host": platform.node(), "kernel": platform.release(), "cpu_model": cpu,
            "cpus": os.cpu_count(), "python": sys.version.split()[0]}


def other_kvm_users() -> list[str]:
    """Processes with /dev/kvm open (their vCPUs share the daemon's maps): for the record."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in ("/dev/kvm", "anon_inode:kvm-vm"):
                        comm = (entry / "comm").read_text().strip()
                        found.append(f"{entry.name}: {comm}")
                        break
    return found


def preflight() -> None:
    if os.geteuid() != 0:
        raise FaultError("needs root (BPF and /dev/kvm): run with sudo")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise FaultError("/dev/kvm is missing or not read-write")
    if not VENV_PY.exists():
        raise FaultError(f"{VENV_PY} missing: run `make setup` first")
    probe = subprocess.run([str(VENV_PY), "-c", "import bcc, prometheus_client"],
                           capture_output=True, text=True)
    if probe.returncode:
        raise FaultError("bcc or prometheus_client not importable from .venv: `make setup`")
    if not any(os.path.isdir(p) for p in ("/sys/kernel/tracing/events",
                                          "/sys/kernel/debug/tracing/events")):
        raise FaultError("tracefs not mounted: mount -t tracefs nodev /sys/kernel/tracing")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", action="store_true",
                   help="each row in seconds, not minutes (the test suite's run)")
    p.add_argument("--only", help=f"comma-separated rows: {','.join(ROWS)} (default all)")
    p.add_argument("--out", type=Path, default=BENCH / "faults.json", help="JSON output path")
    p.add_argument("--soak-seconds", type=float,
                   help="soak length (default 600; 10 with --short)")
    p.add_argument("--churn-vms", type=int, help="VMs in the churn (default 10000; 1000 short)")
    p.add_argument("--workers", type=int, default=2, help="churn worker processes (2)")
    p.add_argument("--build-dir", type=Path, help="where to build (default: a temp dir)")
    args = p.parse_args(argv)
    args.rows = [r for r in ROWS if not args.only or r in args.only.split(",")]
    bad = set(args.only.split(",")) - set(ROWS) if args.only else set()
    if bad:
        p.error(f"--only: unknown rows {sorted(bad)}; choose from {','.join(ROWS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()

    def _terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through every `finally`: daemons are stopped

    signal.signal(signal.SIGTERM, _terminate)
    rows: list[Row] = []
    try:
        preflight()
        with tempfile.TemporaryDirectory(prefix="kct-faults-") as tmp:
            work = Path(tmp)
            exe = build(args.build_dir or work / "build")
            facts = host_facts()
            others = other_kvm_users()
            if others:
                log(f"warning: other KVM processes are running (their vCPUs share the "
                    f"daemon's maps): {others}")
            campaign = Campaign(args, exe, work)
            for name in args.rows:
                row = Row(name, CRITERIA[name])
                log(f"row {name}{' (short)' if args.short else ''}")
                t0 = time.monotonic()
                try:
                    getattr(campaign, name)(row)
                except (FaultError, OSError, subprocess.SubprocessError, ValueError,
                        KeyError, IndexError) as err:
                    row.error = f"{type(err).__name__}: {err}"
                row.seconds = time.monotonic() - t0
                log(f"row {name}: {'PASS' if row.passed else 'FAIL'} in {row.seconds:.0f} s: "
                    f"{row.summary}{' ' + row.error if row.error else ''}")
                rows.append(row)
            text = table(rows)
            print(text)
            result = {**facts, "short": args.short,
                      "args": {k: (str(v) if isinstance(v, Path) else v)
                               for k, v in vars(args).items()},
                      "elapsed_s": round(time.monotonic() - started, 1),
                      "other_kvm_processes_at_start": others,
                      "passed": all(r.passed for r in rows),
                      "rows": [r.to_dict() for r in rows], "table_text": text}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
            log(f"wrote {args.out} in {result['elapsed_s']} s")
    except FaultError as err:
        print(f"faults: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("faults: interrupted", file=sys.stderr)
        return 130
    return 0 if rows and all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
