"""tracer.sdnotify against real AF_UNIX datagram sockets (a path, and the abstract namespace)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tracer.sdnotify import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(2)
    yield sock, str(path)
    sock.close()


def received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().splitlines()


def nothing_pending(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(2)
    return False


def test_ready_status_mainpid(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready(status="watching")
    assert received(sock) == ["READY=1", f"MAINPID={os.getpid()}", "STATUS=watching"]
    assert notifier.reloading()
    lines = received(sock)
    assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=")
    assert int(lines[1].partition("=")[2]) > 0
    assert notifier.stopping()
    assert received(sock) == ["STOPPING=1"]
    notifier.close()


def test_abstract_namespace_socket() -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"kct-test-{os.getpid()}"
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).stopping()
        assert received(sock) == ["STOPPING=1"]
    finally:
        sock.close()


def test_no_socket_is_a_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready() and not notifier.stopping()
    notifier.watchdog_tick()
    assert notifier.errors == 0


def test_unsupported_address_is_ignored() -> None:
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


def test_manager_gone_is_counted_not_raised(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not notifier.ready()
    assert notifier.errors == 1


def test_watchdog_pings_every_half_interval(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    now = [100.0]
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}, clock=lambda: now[0])
    assert notifier.watchdog_interval_s == pytest.approx(0.1)
    notifier.watchdog_tick()
    assert received(sock) == ["WATCHDOG=1"]
    now[0] += 0.05
    notifier.watchdog_tick()
    assert nothing_pending(sock)
    now[0] += 0.06
    notifier.watchdog_tick()
    assert received(sock) == ["WATCHDOG=1"]


@pytest.mark.parametrize("env", [{"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "abc"},
                                 {"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}, {}])
def test_no_watchdog(listener: tuple[socket.socket, str], env: dict[str, str]) -> None:
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path, **env})
    assert notifier.watchdog_interval_s is None
    notifier.watchdog_tick()
    assert nothing_pending(sock)


def test_watchdog_pid_ours(listener: tuple[socket.socket, str]) -> None:
    _sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000",
                         "WATCHDOG_PID": str(os.getpid())})
    assert notifier.watchdog_interval_s == pytest.approx(0.5)


def _fill(sock_path: str, n: Notifier) -> int:
    """Ping until the listener's queue is full (it never reads); how many pings went."""
    sent = 0
    while n.send("WATCHDOG=1", wait=False):
        sent += 1
        assert sent < 100_000, "the queue never filled"
    return sent


def test_a_manager_that_stops_reading_never_stalls_the_loop(
        listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import tracer.sdnotify as sdnotify

    _, path = listener
    monkeypatch.setattr(sdnotify, "SEND_TIMEOUT_S", 1.0)
    clock = [0.0]
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}, clock=lambda: clock[0])
    assert _fill(path, n) > 0
    errors = n.errors
    t0 = time.monotonic()
    n.watchdog_tick()  # a ping into a full queue: dropped at once, counted
    assert time.monotonic() - t0 < 0.5  # no wait at all; loose for a loaded CI host
    assert n.errors == errors + 1
    t0 = time.monotonic()
    assert n.stopping() is False  # a state change waits, but only SEND_TIMEOUT_S
    assert 0.9 <= time.monotonic() - t0 < 5.0
    assert n.errors == errors + 2
