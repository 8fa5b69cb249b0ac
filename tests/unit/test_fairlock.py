"""tracer.fairlock: the daemon's lock is held in the order it was asked for, so a scrape that
waits for it gets it before the loop takes it again for its next event."""

from __future__ import annotations

import threading
import time

from tracer.fairlock import FairLock


def _wait_until(cond: object, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_a_waiting_thread_goes_before_the_holder_takes_it_again() -> None:
    lock = FairLock()
    order: list[str] = []

    def scrape() -> None:
        with lock:
            order.append("scrape")

    lock.acquire()  # the loop, handling an event
    waiter = threading.Thread(target=scrape)
    waiter.start()
    _wait_until(lambda: lock.queued == 2)  # the scrape is waiting
    lock.release()
    with lock:  # the loop's next event: after the scrape, not before
        order.append("loop")
    waiter.join(10)
    assert order == ["scrape", "loop"]
    assert lock.queued == 0


def test_many_threads_each_get_it_in_turn_and_exclusively() -> None:
    lock = FairLock()
    inside = [0]
    most = [0]
    counts = [0] * 4

    def work(i: int) -> None:
        for _ in range(500):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                counts[i] += 1
                inside[0] -= 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert counts == [500] * 4 and most[0] == 1 and lock.queued == 0


def test_an_exception_inside_releases_it() -> None:
    lock = FairLock()
    try:
        with lock:
            raise ValueError("boom")
    except ValueError:
        pass
    assert lock.queued == 0
    with lock:
        assert lock.queued == 1
