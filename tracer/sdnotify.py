"""systemd's notify protocol (``sd_notify(3)``) without libsystemd: datagrams to $NOTIFY_SOCKET.

``READY=1`` once the probes are attached, ``WATCHDOG=1`` every ``WATCHDOG_USEC / 2`` (sent from
the daemon loop's housekeeping, so a stuck loop stops pinging), ``RELOADING=1`` then ``READY=1``
around a SIGHUP reload, ``STOPPING=1`` on shutdown. Without $NOTIFY_SOCKET every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping


def _address(raw: str) -> str | bytes | None:
    """``/path`` or ``@abstract`` (sent as a leading NUL); anything else is ignored."""
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None  # vsock:... and other schemes: not supported, stay silent


# The manager's queue holds few unread datagrams (net.unix.max_dgram_qlen, 10 by default): a
# manager that stops reading must not stall the event loop. State changes wait this long at
# most; a watchdog ping never waits (a full queue means the manager is not reading anyway).
SEND_TIMEOUT_S = 1.0


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.clock = clock
        self.watchdog_interval_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        for_us = not watchdog_pid or watchdog_pid == str(os.getpid())
        if usec.isdigit() and int(usec) > 0 and for_us:
            self.watchdog_interval_s = int(usec) / 2e6
        self._next_ping = 0.0
        self._sock: socket.socket | None = None
        self.errors = 0  # failed sends (the manager went away): counted, never raised

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str, wait: bool = True) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; False when disabled or the send failed (or
        would have waited: more than SEND_TIMEOUT_S, or at all with ``wait=False``)."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                                           | socket.SOCK_NONBLOCK)
            data = "\n".join(assignments).encode() + b"\n"
            # An unconnected datagram socket cannot poll for room in the peer's queue: retry.
            deadline = time.monotonic() + (SEND_TIMEOUT_S if wait else 0.0)
            while True:
                try:
                    self._sock.sendto(data, self.address)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.01)
        except OSError:  # BlockingIOError: the manager's queue stayed full
            self.errors += 1
            return False
        return True

    def ready(self, status: str = "") -> bool:
        lines = ["READY=1", f"MAINPID={os.getpid()}"]
        if status:
            lines.append(f"STATUS={status}")
        return self.send(*lines)

    def reloading(self) -> bool:
        # MONOTONIC_USEC is what Type=notify-reload (systemd 253+) wants next to RELOADING=1.
        now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={now_us}")

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def watchdog_tick(self) -> None:
        """Housekeeping hook: ``WATCHDOG=1`` when half the watchdog interval has passed."""
        if self.watchdog_interval_s is None or self.address is None:
            return
        now = self.clock()
        if now >= self._next_ping:
            self.send("WATCHDOG=1", wait=False)
            self._next_ping = now + self.watchdog_interval_s

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
