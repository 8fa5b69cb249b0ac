"""/-/ready and /-/healthy of a real daemon: 503 while the probes compile (the exporter is bound
by then and /metrics already answers), 200 from the ``ready`` line on, and nothing once stopped.

The 503 while *stopping* is not checked here: the window between SIGTERM and the exporter's
close is a few milliseconds, too short to hit reliably (tests/unit/test_metrics.py covers it).
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import free_port, requires_kvm_bpf
from daemon_proc import DaemonProcess

pytestmark = [pytest.mark.e2e, requires_kvm_bpf]


def _get(url: str) -> tuple[int, str] | None:
    """(status, body), or None while nothing listens."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except (ConnectionError, urllib.error.URLError):
        return None


def test_health_endpoints_follow_the_daemons_start_and_stop() -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    started: list[DaemonProcess] = []
    failed: list[BaseException] = []

    def start() -> None:
        try:  # the last --metrics-addr wins: this test knows the port before the daemon is up
            started.append(DaemonProcess("--metrics-addr", f"127.0.0.1:{port}"))
        except BaseException as err:
            failed.append(err)

    starter = threading.Thread(target=start)
    starter.start()
    early: dict[str, tuple[int, str] | None] = {}
    deadline = time.monotonic() + 60
    while starter.is_alive() and time.monotonic() < deadline:
        early["ready"] = _get(f"{base}/-/ready")
        if early["ready"] is not None:  # bound: the probes are compiling now (seconds)
            early["healthy"] = _get(f"{base}/-/healthy")
            early["metrics"] = _get(f"{base}/metrics")
            break
        time.sleep(0.02)
    starter.join(timeout=120)
    assert not failed, failed
    (daemon,) = started
    try:
        assert early["ready"] == (503, "not ready: compiling and attaching the probes\n")
        assert early["healthy"] == (503, "event loop not started: compiling and attaching "
                                         "the probes\n")
        metrics = early["metrics"]
        assert metrics is not None and metrics[0] == 200 and "process_" in metrics[1]

        ready_line = daemon.wait_for(lambda e: e["event"] == "ready")
        # Processes the daemon could not inspect are counted (e.g. a sandbox's init); VMMs
        # among them come with exactly one warning, right after the ready line; none without.
        lines = daemon.lines()
        warnings = [e for e in lines if e["event"] == "vcpu_discovery_incomplete"]
        unreadable = ready_line["processes_unreadable"]
        assert 0 <= ready_line["vmms_unreadable"] <= unreadable
        assert len(warnings) == int(ready_line["vmms_unreadable"] > 0), warnings
        assert all(lines.index(w) == lines.index(ready_line) + 1 for w in warnings)
        for warning in warnings:
            assert warning["processes_unreadable"] == unreadable
            assert warning["likely_cause"] and warning["fix"]
        expected = len(ready_line["probes"])
        assert _get(f"{base}/-/ready") == (200, f"ready: watching, {expected} probes "
                                                "attached\n")
        healthy = _get(f"{base}/-/healthy")
        assert healthy is not None and healthy[0] == 200
        assert healthy[1].startswith("healthy: last ring-buffer poll ")
        metrics = _get(f"{base}/metrics")
        assert metrics is not None and "kvm_completion_probes_attached" in metrics[1]
        assert daemon.stop() == 0
        assert _get(f"{base}/-/ready") is None  # the exporter is closed with the daemon
    finally:
        daemon.kill()
