"""The daemon's lock, taken in turn.

The loop takes the lock once per ring-buffer event, thousands of times a second in a flood; a
scrape takes it once. CPython's ``threading.Lock`` is not fair: the loop, holding the GIL, takes
the lock again before a scrape woken by its release can, so with the CPUs busy a scrape waited
for the loop's whole backlog (the fault campaign's storm row: scrapes of 0.6-1.9 s, p99 over its
250 ms bound, in 3 of 5 runs with one CPU hog beside it). Here each taker draws a ticket and
they hold the lock in the order they asked for it: a scrape waits for one event, not a backlog.

Pure Python: no bcc, no prometheus_client.
"""

from __future__ import annotations

import threading
from types import TracebackType


class FairLock:
    """A non-reentrant lock held in first-come order (a ticket lock on a condition)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._next_ticket = 0
        self._serving = 0

    @property
    def queued(self) -> int:
        """The holder and the threads waiting for their turn."""
        with self._cond:
            return self._next_ticket - self._serving

    def acquire(self) -> None:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._serving:
                self._cond.wait()

    def release(self) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
