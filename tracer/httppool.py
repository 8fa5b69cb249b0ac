"""The exporter's HTTP server: a fixed pool of request threads, started with the server.

socketserver's ThreadingMixIn starts a thread for each request. On a host whose CPUs are busy
that start was the slow part of a scrape: with a CPU hog beside a flood, while the ring's reader
held the GIL, a new thread needed 50-80 ms (once 850 ms) to get from its creation to its first
line of the request, so a 20 Hz scrape storm saw single scrapes of 200-300 ms (the fault
campaign's storm row, over its 250 ms bound in 1 of 4 campaigns). Served by threads that
already exist: 10 of 10 runs of the row under the bound (docs/reliability.md). A pool also bounds
the threads a flood of connections can make, and each connection's timeout frees a worker that
a silent client holds, so a health probe is still answered.

Pure Python (socketserver and wsgiref): no bcc, no prometheus_client.
"""

from __future__ import annotations

import queue
import socket
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Final
from wsgiref.simple_server import WSGIServer

POOL_THREADS: Final = 4  # scrapes, health probes, and a few silent clients at once
# A connection that sends nothing holds its worker this long (Prometheus's default scrape
# timeout): socketserver.StreamRequestHandler.timeout, set on each connection's socket.
REQUEST_TIMEOUT_S: Final = 10.0

Request = socket.socket | tuple[bytes, socket.socket]


class PooledWSGIServer(WSGIServer):
    """A WSGIServer whose requests are served by POOL_THREADS threads started with it.

    ``on_thread_start`` runs first in each pool thread (the exporter raises its priority
    there). The accept loop only hands each connection over: to the thread that went idle
    last, so one after another the requests are served by one thread, whose memory is warm
    (its malloc arena holds the last page: handed round the pool, a host's big pages grew the
    daemon's RSS by one page per thread, +6 MiB in the fault campaign's churn row); the others
    serve only requests that overlap. server_close() ends the pool."""

    on_thread_start: Callable[[], None] | None = None
    pool_threads: int = POOL_THREADS
    _pool: tuple[threading.Thread, ...] = ()  # none until server_activate (a failed bind)

    def server_activate(self) -> None:
        super().server_activate()
        self._handover = threading.Lock()
        self._idle: list[queue.SimpleQueue[tuple[Request, Any] | None]] = []
        self._backlog: deque[tuple[Request, Any]] = deque()  # while every thread is busy
        self._closing = False
        inboxes = [queue.SimpleQueue[tuple[Request, Any] | None]()
                   for _ in range(self.pool_threads)]
        self._idle.extend(reversed(inboxes))
        self._pool = tuple(threading.Thread(target=self._serve_handed, args=(inbox,),
                                            name=f"metrics-http-{i}", daemon=True)
                           for i, inbox in enumerate(inboxes))
        for thread in self._pool:
            thread.start()

    def process_request(self, request: Request, client_address: Any) -> None:
        with self._handover:
            if self._idle:
                self._idle.pop().put((request, client_address))
            else:
                self._backlog.append((request, client_address))

    def _serve_handed(self, inbox: queue.SimpleQueue[tuple[Request, Any] | None]) -> None:
        if self.on_thread_start is not None:
            self.on_thread_start()
        while (item := inbox.get()) is not None:
            while item is not None:
                self._serve_one(*item)
                with self._handover:  # the backlog first, else idle: under one hold
                    if self._backlog:
                        item = self._backlog.popleft()
                    else:
                        item = None
                        if self._closing:
                            return
                        self._idle.append(inbox)

    def _serve_one(self, request: Request, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # what socketserver's own loops do: report it, serve on
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def server_close(self) -> None:
        super().server_close()
        if not self._pool:
            return
        with self._handover:  # a busy thread ends when done; an idle one at its None
            self._closing = True
            inboxes, self._idle = self._idle, []
        for inbox in inboxes:
            inbox.put(None)
        for thread in self._pool:
            thread.join(timeout=REQUEST_TIMEOUT_S)

    @property
    def idle_threads(self) -> int:
        """Pool threads waiting for a request now."""
        with self._handover:
            return len(self._idle)
