"""The daemon as systemd runs it: sd_notify (READY, WATCHDOG, RELOADING, STOPPING), SIGHUP
reloads of the config file and --policy file (what they change, and that a refused one changes
nothing), the single-instance lock, and one-line config errors. (The unit file itself:
tests/unit/test_systemd_unit.py.)

The notify socket is a real AF_UNIX datagram socket this test binds; the daemon is the real
``python -m tracer run`` with the probes attached, and the guests are the built-in VMM's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import AnyUserTracer, free_port, requires_kvm_bpf
from daemon_proc import run_vmm
from metrics_scrape import scrape

pytestmark = [pytest.mark.e2e, requires_kvm_bpf]

REPO = Path(__file__).resolve().parents[2]
PREFIX = "kvm-completion-tracer: error:"
WATCHDOG_USEC = 200_000
START_TIMEOUT_S = 90

CONFIG = """\
snapshot_idle_seconds = 1.0
[log]
level = "info"
[labels]
site = "fra1"
"""


def tracer_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tracer", "run", "--log-format", "json", *args]


class Notifications:
    """The far end of $NOTIFY_SOCKET: every datagram, with the time it arrived.

    A thread reads them as they come, as systemd does: the kernel queues only a few unread
    datagrams (net.unix.max_dgram_qlen, 10 by default) before the daemon's next send blocks,
    and a test that runs VMMs for a few seconds would otherwise stall the daemon's loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.received: list[tuple[float, list[str]]] = []  # (wall-clock arrival, lines)
        self._empty_since = 0.0  # a recv that started then found the queue empty
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            started = time.monotonic()
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                self._empty_since = started
                continue
            except OSError:  # closed
                return
            self.received.append((time.time(), data.decode().splitlines()))

    def drain(self) -> None:
        """Until everything sent before this call has been read."""
        asked = time.monotonic()
        while self._reader.is_alive() and self._empty_since < asked:
            time.sleep(0.01)

    def messages(self) -> list[list[str]]:
        return [lines for _, lines in list(self.received)]

    def count(self, line: str) -> int:
        return sum(line in lines for lines in self.messages())

    def close(self) -> None:
        self._closed.set()
        self._reader.join(timeout=5)
        self.sock.close()


class Service:
    """One daemon started as systemd would: NOTIFY_SOCKET, WATCHDOG_USEC, its own state dir;
    the exporter on ``metrics_port`` (loopback) if given."""

    def __init__(self, tmp: Path, *args: str, metrics_port: int | None = None) -> None:
        self.tmp = tmp
        self.config = tmp / "config.toml"
        if not self.config.exists():
            self.config.write_text(CONFIG)
        self.state = tmp / "state"
        self.notify = Notifications(tmp / "notify.sock")
        self.out, self.err = tmp / "out.jsonl", tmp / "err.txt"
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify.path),
               "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        env.pop("WATCHDOG_PID", None)
        self.metrics_url = (None if metrics_port is None
                            else f"http://127.0.0.1:{metrics_port}/metrics")
        metrics = ["--no-metrics"] if metrics_port is None else [
            "--metrics-addr", f"127.0.0.1:{metrics_port}"]
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(
                tracer_argv("--config", str(self.config), "--state-dir", str(self.state),
                            *metrics, *args), cwd=REPO, env=env, stdout=out, stderr=err)

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.out.read_text().splitlines()]

    def wait_for(self, match: Callable[[], Any], timeout_s: float = 10) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = match()
            if found:
                return found
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: "
                                     f"{self.err.read_text()}")
            time.sleep(0.05)
        raise AssertionError(f"timed out; stdout: {self.out.read_text()}\nnotify: "
                             f"{self.notify.messages()}\nstderr: {self.err.read_text()}")

    def event(self, name: str, after: int = 0) -> dict[str, Any] | None:
        return next((e for e in self.lines()[after:] if e["event"] == name), None)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        self.notify.drain()  # what it sent on the way out
        return code


@pytest.fixture
def service_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kct-service-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def started(svc: Service) -> Iterator[Service]:
    """``svc`` once READY=1 has come; killed at the end if a test left it running."""
    try:
        svc.wait_for(lambda: svc.notify.count("READY=1"), timeout_s=START_TIMEOUT_S)
        yield svc
    finally:
        if svc.proc.poll() is None:
            svc.proc.kill()
            svc.proc.wait()
        svc.notify.close()


@pytest.fixture
def service(service_dir: Path) -> Iterator[Service]:
    with started(Service(service_dir)) as svc:
        yield svc


def test_ready_watchdog_reload_and_stop(service: Service) -> None:
    svc = service
    # READY=1 (with MAINPID and a STATUS) only once the probes are attached and `ready` logged.
    ready_msg = next(m for m in svc.notify.messages() if "READY=1" in m)
    assert f"MAINPID={svc.proc.pid}" in ready_msg
    assert any(line.startswith("STATUS=") for line in ready_msg)
    ready_line = svc.event("ready")
    assert ready_line is not None
    arrived = next(t for t, m in svc.notify.received if "READY=1" in m)
    logged = datetime.fromisoformat(ready_line["timestamp"].replace("Z", "+00:00")).timestamp()
    assert logged <= arrived, (logged, arrived)
    first = svc.notify.messages().index(ready_msg)
    assert not any("WATCHDOG=1" in m for m in svc.notify.messages()[:first])

    # WATCHDOG=1 about every WATCHDOG_USEC/2 from the loop.
    before = svc.notify.count("WATCHDOG=1")
    time.sleep(1.0)
    pings = svc.notify.count("WATCHDOG=1") - before
    assert pings >= 4, svc.notify.messages()

    # SIGHUP with a changed file: RELOADING=1, then READY=1, and the change named old -> new.
    svc.config.write_text(CONFIG.replace('"fra1"', '"fra2"').replace("1.0", "0.5")
                          + "[probes]\nringbuf_pages = 128\n")
    seen = len(svc.lines())
    ready_before = svc.notify.count("READY=1")
    svc.proc.send_signal(signal.SIGHUP)
    reloaded = svc.wait_for(lambda: svc.event("config_reloaded", seen))
    assert reloaded["changed"] == {"labels.site": "fra1 -> fra2",
                                   "snapshot_idle_seconds": "1.0 -> 0.5"}
    restart = svc.wait_for(lambda: svc.event("config_restart_required", seen))
    assert restart["keys"] == {"probes.ringbuf_pages": "64 -> 128"}
    svc.wait_for(lambda: svc.notify.count("READY=1") > ready_before)
    messages = svc.notify.messages()
    reloading = [i for i, m in enumerate(messages) if "RELOADING=1" in m]
    assert len(reloading) == 1
    assert any("READY=1" in m for m in messages[reloading[0] + 1:])

    # A broken file on reload: the daemon keeps running on the old configuration.
    svc.config.write_text("[log]\nlevel = \"loud\"\n")
    seen = len(svc.lines())
    svc.proc.send_signal(signal.SIGHUP)
    failed = svc.wait_for(lambda: svc.event("config_reload_failed", seen))
    assert "log.level" in failed["reason"] and str(svc.config) in failed["reason"]
    assert failed["level"] == "error"
    assert svc.event("config_reloaded", seen) is None
    svc.wait_for(lambda: svc.notify.count("RELOADING=1") == 2)
    watchdog = svc.notify.count("WATCHDOG=1")
    svc.wait_for(lambda: svc.notify.count("WATCHDOG=1") > watchdog + 2)  # still looping
    assert svc.proc.poll() is None

    # SIGTERM: STOPPING=1, `stopped`, exit 0.
    assert svc.stop() == 0
    assert svc.notify.count("STOPPING=1") == 1
    assert svc.lines()[-1]["event"] == "stopped"
    assert svc.err.read_text() == ""


# ---- what a reload changes, and what a refused one does not ------------------------------------

POLICY_CHANGE = """\
[policy]
ignored_exits = ["KVM_EXIT_MMIO"]
severity = { "save:KVM_EXIT_IO" = "critical" }
"""


def effects(svc: Service) -> dict[str, Any]:
    """What the running configuration does to two buggy VMMs run one after the other: an MMIO
    write saved mid-completion, then an OUT saved mid-completion.

    The ring buffer delivers in order, so once the OUT's violation is logged every event of the
    MMIO run before it has been handled: no violation for that pid by then means none at all."""
    mmio = run_vmm("buggy-mmio-write", 1)
    pio = run_vmm("buggy-io-out", 1)

    def pio_lines() -> list[dict[str, Any]]:
        return [e for e in svc.lines() if e["event"] == "completion_violation"
                and e["pid"] == pio.pid]

    line = svc.wait_for(lambda: next(iter(pio_lines()), None))
    # The OUT's first line is not its last: on a loaded host the reader may still have its
    # other saves in the ring (a scrape then counted 7 of 10). Each is logged once handled
    # (and counted before that): the scrape waits for all of them.
    svc.wait_for(lambda: len(pio_lines()) >= len(pio.violations))
    assert svc.metrics_url is not None
    samples = scrape(svc.metrics_url)
    ours = {k: v for k, v in samples.items() if k[0].startswith("kvm_completion_")}
    io_series: dict[str, float] = {}  # severity -> violations (summed over the ioctls)
    for (name, labels), value in ours.items():
        if (name == "kvm_completion_violations_total" and ("vm", line["vm"]) in labels
                and ("exit_reason", "KVM_EXIT_IO") in labels):
            severity = dict(labels)["severity"]
            io_series[severity] = io_series.get(severity, 0) + value
    pid_events = [e["event"] for e in svc.lines() if e.get("pid") in (pio.pid, mmio.pid)]
    return {
        "severity": line["severity"],
        "line_labels": line.get("labels"),
        "mmio_violations": sum(1 for e in svc.lines() if e["event"] == "completion_violation"
                               and e["pid"] == mmio.pid),
        "debug_lines": "vcpu_created" in pid_events,  # logged at debug
        # every series of ours carries the static labels, whatever their value
        "series_labels": {tuple((k, v) for k, v in labels if k in ("site", "rack"))
                          for (_name, labels), _value in ours.items()},
        "io_violations_by_severity": io_series,
        "io_saves_mid_completion": len(pio.violations),  # the VMM's own count
    }


def test_reload_changes_level_policy_and_labels_and_a_bad_one_changes_nothing(
        service_dir: Path) -> None:
    policy = service_dir / "policy.toml"
    policy.write_text("")
    svc = Service(service_dir, "--policy", str(policy), metrics_port=free_port())
    with started(svc):
        before = effects(svc)
        assert before["severity"] == "error" and before["mmio_violations"] >= 1
        assert before["line_labels"] == {"site": "fra1"}
        assert before["series_labels"] == {(("site", "fra1"),)}
        assert not before["debug_lines"]
        assert before["io_violations_by_severity"] == {
            "error": before["io_saves_mid_completion"]}

        # One reload: log level, a label changed and one added, and a --policy file change.
        svc.config.write_text(CONFIG.replace('"info"', '"debug"').replace('"fra1"', '"fra2"')
                              + 'rack = "r7"\n')
        policy.write_text(POLICY_CHANGE)
        seen = len(svc.lines())
        svc.proc.send_signal(signal.SIGHUP)
        reloaded = svc.wait_for(lambda: svc.event("config_reloaded", seen))
        assert reloaded["changed"] == {
            "labels.rack": "(unset) -> r7", "labels.site": "fra1 -> fra2",
            "log.level": "info -> debug",
            "policy.ignored_exits": '[] -> ["KVM_EXIT_MMIO"]',
            "policy.severity": '{} -> {"save:KVM_EXIT_IO": "critical"}'}
        after = effects(svc)
        assert after["severity"] == "critical"  # the severity override
        assert after["mmio_violations"] == 0  # MMIO no longer leaves a completion pending
        assert after["line_labels"] == {"site": "fra2", "rack": "r7"}
        assert after["series_labels"] == {(("rack", "r7"), ("site", "fra2"))}  # sorted
        assert after["debug_lines"]
        assert after["io_violations_by_severity"] == {
            "critical": after["io_saves_mid_completion"]}

        # A refused reload: a valid config change next to a --policy file naming a bogus exit.
        svc.config.write_text(CONFIG.replace('"fra1"', '"fra3"'))
        policy.write_text('[policy]\nignored_exits = ["BOGUS"]\n')
        seen = len(svc.lines())
        svc.proc.send_signal(signal.SIGHUP)
        failed = svc.wait_for(lambda: svc.event("config_reload_failed", seen))
        assert failed["reason"].startswith(f"{policy}: policy.ignored_exits: unknown exit "
                                           "reason 'BOGUS'"), failed
        assert failed["kept"] == "the running configuration", failed
        assert svc.event("config_reloaded", seen) is None
        # Exactly what the good reload set up (the VMM's vm name has its pid in it: each run's
        # series are its own).
        assert effects(svc) == after
        assert svc.stop() == 0
        assert svc.err.read_text() == ""


def test_second_instance_fails_and_the_first_keeps_running(service: Service,
                                                           service_dir: Path) -> None:
    second = subprocess.run(
        tracer_argv("--config", str(service.config), "--state-dir", str(service.state),
                    "--no-metrics", "--lock-wait", "0.5"), cwd=REPO, capture_output=True,
        text=True, timeout=60)
    assert second.returncode == 1, second
    # refused before the probes load: no `starting`, one line saying it waits for the holder
    (waiting,) = [json.loads(line) for line in second.stdout.splitlines()]
    assert (waiting["event"], waiting["holder_pid"]) == ("waiting_for_lock",
                                                         str(service.proc.pid)), second
    assert second.stderr.splitlines() == [
        f"{PREFIX} another kvm-completion-tracer is already running (pid {service.proc.pid}, "
        f"holding {service.state / 'kvm-completion-tracer.lock'}; waited 0.5 s for it to "
        "exit)"], second
    watchdog = service.notify.count("WATCHDOG=1")
    service.wait_for(lambda: service.notify.count("WATCHDOG=1") > watchdog + 2)
    assert service.proc.poll() is None
    assert service.stop() == 0


# ---- one line and a non-zero exit for every bad start -------------------------------------------

def one_line(argv: list[str], *needles: str, any_user: AnyUserTracer | None = None) -> str:
    """``any_user``: run from its world-readable copy (a user other than root)."""
    where: dict[str, Any] = {"cwd": REPO}
    if any_user is not None:
        where = {"cwd": any_user.cwd, "env": dict(any_user.env)}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, **where)
    assert done.returncode != 0, done
    assert "Traceback" not in done.stdout + done.stderr, done
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), done
    for needle in needles:
        assert needle in lines[0], done
    assert done.stdout == "", done
    return lines[0]


def test_unknown_key(service_dir: Path) -> None:
    config = service_dir / "c.toml"
    config.write_text("[probes]\nring_pages = 64\n")
    one_line(tracer_argv("--config", str(config)), str(config), "unknown key 'probes.ring_pages'")


def test_wrong_type(service_dir: Path) -> None:
    config = service_dir / "c.toml"
    config.write_text("[metrics]\nper_vcpu = \"yes\"\n")
    one_line(tracer_argv("--config", str(config)), str(config), "metrics.per_vcpu",
             "expected true or false")


def test_missing_given_config(service_dir: Path) -> None:
    one_line(tracer_argv("--config", str(service_dir / "absent.toml")), "absent.toml",
             "No such file")


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) missing")
def test_unreadable_config(service_dir: Path, tracer_for_any_user: AnyUserTracer) -> None:
    config = service_dir / "c.toml"
    config.write_text(CONFIG)
    config.chmod(0o600)
    service_dir.chmod(0o755)
    one_line(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
              *tracer_for_any_user.argv, "run", "--log-format", "json", "--config", str(config)],
             str(config), "Permission denied", any_user=tracer_for_any_user)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) missing")
def test_unwritable_state_dir(service_dir: Path) -> None:
    state = service_dir / "ro"
    state.mkdir()
    # read-only bind mount, in a private mount namespace (the host's mounts are not touched)
    script = (f"mount --bind {shlex.quote(str(state))} {shlex.quote(str(state))} && "
              f"mount -o remount,bind,ro {shlex.quote(str(state))} && "
              f"exec {shlex.join(tracer_argv('--state-dir', str(state), '--no-metrics'))}")
    line = one_line(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                    f"state directory {state} is not writable", "Read-only file system")
    assert "--state-dir" in line


def test_state_dir_is_a_file(service_dir: Path) -> None:
    afile = service_dir / "file"
    afile.write_text("")
    one_line(tracer_argv("--state-dir", str(afile), "--no-metrics"), "is not a directory")


@pytest.mark.parametrize("addr", ["9110", "::1:9110", "[::1]:0", "host:65536", "[::1]9110"])
def test_malformed_metrics_addr(addr: str) -> None:
    one_line(tracer_argv("--metrics-addr", addr), f"--metrics-addr {addr}")
