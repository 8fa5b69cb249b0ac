"""The fault campaign's crash row judges the restarted daemon by when each window was opened:
it must report every window whose KVM_RUN was entered after its ready line, may or may not see
one open across that line or saved in the restart's gap, and never one saved before the kill
(pure logic on synthetic timelines; the row itself runs in tests/e2e/test_faults.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # faults.py imports its sibling run.py by name
    try:
        spec = importlib.util.spec_from_file_location("bench_faults", BENCH / "faults.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_faults"] = module  # dataclasses resolve their module by name
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


faults = _load()
MS = 1_000_000
KILL, READY = 10_000 * MS, 12_000 * MS


def alert(window: int, arrival_ns: int) -> object:
    return faults.Alert(arrival_ns=arrival_ns, event="completion_violation", pid=1,
                        window=window, ioctl="KVM_GET_REGS", vm="kvmloop[1]", comm="kvmloop")


def flood(*windows: tuple[int, int]) -> object:
    """Windows as (entered, saved) ns; ids 100, 200, ..."""
    return faults.Flood({"pid": 1}, [100 * (i + 1) for i in range(len(windows))],
                        [s for _, s in windows], [e for e, _ in windows])


# Saved before the kill (A's), in the gap, open across B's ready line, opened after it.
WINDOWS = ((9_000 * MS, 9_000 * MS + 10_000), (11_000 * MS, 11_000 * MS + 10_000),
           (READY - 5 * MS, READY + 3 * MS), (13_000 * MS, 13_000 * MS + 10_000))


def test_windows_are_placed_by_when_they_were_opened_and_saved() -> None:
    b = [alert(7, 13_000 * MS + 40 * MS), alert(7, 13_000 * MS + 41 * MS)]
    timeline = faults.crash_timeline(flood(*WINDOWS), {100}, b, KILL, READY)
    assert [w["opened"] for w in timeline] == ["before kill", "gap", "across ready",
                                               "after ready"]
    assert [w["reported_by"] for w in timeline] == ["A", None, None, "B"]
    assert timeline[2]["open_us"] == 8000.0 and timeline[2]["saved_ms_after_ready"] == 3.0
    assert faults.crash_windows_ok(timeline, 1)


def test_a_window_open_across_ready_may_be_reported_or_not() -> None:
    b = [alert(6, READY + 20 * MS), alert(7, 13_000 * MS + 40 * MS)]
    timeline = faults.crash_timeline(flood(*WINDOWS), {100}, b, KILL, READY)
    assert [w["reported_by"] for w in timeline] == ["A", None, "B", "B"]
    assert faults.crash_windows_ok(timeline, 2)


def test_a_window_opened_after_ready_and_not_reported_fails_the_row() -> None:
    timeline = faults.crash_timeline(flood(*WINDOWS), {100}, [], KILL, READY)
    assert not faults.crash_windows_ok(timeline, 0)
    # ... also when B reported another window instead (counts alone would agree).
    b = [alert(6, READY + 20 * MS)]
    timeline = faults.crash_timeline(flood(*WINDOWS), {100}, b, KILL, READY)
    assert not faults.crash_windows_ok(timeline, 1)


def test_two_b_windows_on_one_flood_window_fail_the_row() -> None:
    b = [alert(7, 13_000 * MS + 40 * MS), alert(8, 13_000 * MS + 50 * MS)]
    timeline = faults.crash_timeline(flood(*WINDOWS), {100}, b, KILL, READY)
    assert not faults.crash_windows_ok(timeline, 2)


def test_a_window_saved_in_the_gap_may_be_reported_one_before_the_kill_may_not() -> None:
    # B attaches its probes, adopts, then says ready: a save in between is seen.
    b = [alert(5, 11_000 * MS + 30 * MS), alert(7, 13_000 * MS + 40 * MS)]
    timeline = faults.crash_timeline(flood(*WINDOWS), {100}, b, KILL, READY)
    assert timeline[1]["reported_by"] == "B"
    assert faults.crash_windows_ok(timeline, 2)
    # ... but B's probes did not exist before the kill.
    b = [alert(4, 9_000 * MS + 30 * MS), alert(7, 13_000 * MS + 40 * MS)]
    timeline = faults.crash_timeline(flood(*WINDOWS), set(), b, KILL, READY)
    assert timeline[0]["reported_by"] == "B"
    assert not faults.crash_windows_ok(timeline, 2)
