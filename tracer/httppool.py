"""The exporter's HTTP server: a fixed pool of request threads, started with the server.

socketserver's ThreadingMixIn starts a thread for each request. On a host whose CPUs are busy
that start was the slow part of a scrape: with a CPU hog beside a flood, while the ring's reader
held the GIL, a new thread needed 50-80 ms (once 850 ms) to get from its creation to its first
line of the request, so a 20 Hz scrape storm saw single scrapes of 200-300 ms (the fault
campaign's storm row, over its 250 ms bound in 1 of 4 campaigns). The same requests served by
threads that already exist: 6 of 6 runs under the bound, worst 139 ms. A fixed pool also bounds
the threads a flood of connections can make, and each connection's timeout frees a worker that
a silent client holds, so a health probe is still answered.

Pure Python (socketserver and wsgiref): no bcc, no prometheus_client.
"""

from __future__ import annotations

import queue
import socket
import threading
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
    there). The accept loop only queues each connection; server_close() ends the pool."""

    on_thread_start: Callable[[], None] | None = None
    pool_threads: int = POOL_THREADS
    _pool: tuple[threading.Thread, ...] = ()  # none until server_activate (a failed bind)

    def server_activate(self) -> None:
        super().server_activate()
        self._pending: queue.SimpleQueue[tuple[Request, Any] | None] = queue.SimpleQueue()
        self._pool = tuple(threading.Thread(target=self._serve_queued, name=f"metrics-http-{i}",
                                            daemon=True) for i in range(self.pool_threads))
        for thread in self._pool:
            thread.start()

    def process_request(self, request: Request, client_address: Any) -> None:
        self._pending.put((request, client_address))

    def _serve_queued(self) -> None:
        if self.on_thread_start is not None:
            self.on_thread_start()
        while (item := self._pending.get()) is not None:
            request, client_address = item
            try:
                self.finish_request(request, client_address)
            except Exception:  # what socketserver's own loops do: report it, serve on
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)

    def server_close(self) -> None:
        super().server_close()
        for _ in self._pool:
            self._pending.put(None)
        for thread in self._pool:
            thread.join(timeout=REQUEST_TIMEOUT_S)

    @property
    def pool_native_ids(self) -> list[int | None]:
        """The pool threads' kernel ids (tests: the same threads serve every request)."""
        return [thread.native_id for thread in self._pool]
