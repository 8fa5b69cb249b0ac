"""The exporter's HTTP server (tracer.httppool): requests served by a fixed pool of threads
started with the server, a silent client not holding up the others, and a clean close."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from tracer.httppool import POOL_THREADS, PooledWSGIServer


class _Handler(WSGIRequestHandler):
    timeout = 30.0  # longer than the test: only the pool can keep a silent client from blocking

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serving(started: list[int], timeout: float = _Handler.timeout,
            ) -> Iterator[tuple[PooledWSGIServer, list[int], str]]:
    served: list[int] = []

    class Handler(_Handler):
        pass

    Handler.timeout = timeout

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        served.append(threading.get_native_id())
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok\n"]

    class Server(PooledWSGIServer):
        @staticmethod
        def on_thread_start() -> None:
            started.append(threading.get_native_id())

    server = make_server("127.0.0.1", 0, app, Server, handler_class=Handler)
    assert isinstance(server, PooledWSGIServer)
    loop = threading.Thread(target=server.serve_forever, daemon=True)
    loop.start()
    try:
        yield server, served, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        loop.join(timeout=5)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as resp:
        body: bytes = resp.read()
        return body


def test_every_request_is_served_by_the_threads_started_with_the_server() -> None:
    started: list[int] = []
    with serving(started) as (server, served, url):
        before = threading.active_count()
        for _ in range(3 * POOL_THREADS):
            assert _get(url) == b"ok\n"
            # The client has its answer a moment before the thread is idle again (it closes
            # the connection first): scrapes come seconds apart, this test's at once.
            deadline = time.monotonic() + 5
            while server.idle_threads < POOL_THREADS and time.monotonic() < deadline:
                time.sleep(0.01)
        assert threading.active_count() == before  # no thread started for a request
        assert len(served) == 3 * POOL_THREADS
        pool_ids = [thread.native_id for thread in server._pool]
        assert set(served) <= set(pool_ids)
        # One after another: the thread that went idle last serves the next (its malloc arena
        # already holds a page; round the pool each thread's would grow to one).
        assert len(set(served)) == 1
        assert sorted(started) == sorted(i for i in pool_ids if i is not None)
        assert len(started) == POOL_THREADS


def test_a_silent_client_does_not_hold_up_the_others() -> None:
    started: list[int] = []
    with serving(started) as (_server, _served, url):
        host, port = url.removeprefix("http://").rstrip("/").split(":")
        silent = [socket.create_connection((host, int(port))) for _ in range(POOL_THREADS - 1)]
        try:
            time.sleep(0.2)  # each taken by a pool thread, which waits for its request line
            t0 = time.monotonic()
            assert _get(url) == b"ok\n"
            assert time.monotonic() - t0 < 5
        finally:
            for conn in silent:
                conn.close()


def test_a_pool_held_by_silent_clients_serves_again_after_their_timeout() -> None:
    """Every pool thread taken by a client that sends nothing: a request waits for the first of
    them to time out (the exporter's REQUEST_TIMEOUT_S; here 0.5 s), not forever."""
    started: list[int] = []
    with serving(started, timeout=0.5) as (_server, _served, url):
        host, port = url.removeprefix("http://").rstrip("/").split(":")
        silent = [socket.create_connection((host, int(port))) for _ in range(POOL_THREADS)]
        try:
            t0 = time.monotonic()
            assert _get(url) == b"ok\n"
            assert 0.3 < time.monotonic() - t0 < 5
        finally:
            for conn in silent:
                conn.close()


def test_the_exporter_frees_a_silent_clients_thread() -> None:
    from tracer.httppool import REQUEST_TIMEOUT_S
    from tracer.metrics import _QuietHandler

    assert _QuietHandler.timeout == REQUEST_TIMEOUT_S


def test_closing_the_server_ends_its_pool_busy_threads_included() -> None:
    started: list[int] = []
    with serving(started, timeout=0.5) as (server, _served, url):
        assert _get(url) == b"ok\n"
        pool = list(server._pool)
        host, port = url.removeprefix("http://").rstrip("/").split(":")
        silent = socket.create_connection((host, int(port)))  # holds a thread until its timeout
        time.sleep(0.1)
    silent.close()
    assert len(pool) == POOL_THREADS
    assert not any(thread.is_alive() for thread in pool)


def test_a_server_whose_bind_failed_closes_cleanly() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        try:
            make_server("127.0.0.1", port, lambda e, s: [], PooledWSGIServer)
        except OSError as err:
            assert "in use" in str(err)  # the bind's error, not one from server_close
        else:
            raise AssertionError("the bind to a taken port succeeded")
