"""Per-vCPU statistics kept in the probes' ``vcpus`` map, and their totals per VM.

The kernel counts in each vCPU's map entry (exits by reason, the pending-duration histogram,
completions by path) and nothing else on the hot path. Python reads the entries at scrape time.
When a vCPU goes (its last fd closed, its process exited) its counts are folded into
:class:`VmLedger` under the VM's name before the entry is deleted, so the exported counters never
go backwards while the VM lives, and a VM restarted under the same name keeps counting up.

Pure Python: no bcc, no prometheus_client.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from tracer import abi

# Why a report went out without its user stack (probe counters; watch's ``stacks_missed``, the
# metric ``stacks_missed_total{reason}``): the kernel walk's map full or failed, the capture of
# registers and stack bytes failed, or was not sent (ring full, or no capture left until the
# daemon's next read of the ring).
STACK_MISS_REASONS: Final = ("stack_map_full", "stack_failed", "user_stack_failed",
                             "user_stack_dropped")


def maps_full(counters: Mapping[str, int]) -> dict[str, int]:
    """The probe counters (``<map>_map_full``) of failed inserts into the tracking maps. Not the
    stack map's taken buckets: they cost a report its stack, not tracking (STACK_MISS_REASONS).
    By suffix: lost_window_map_full is a map's, not a lost event type's."""
    return {name: n for name, n in counters.items()
            if name.endswith("_map_full") and name not in STACK_MISS_REASONS}


def events_lost_by_type(counters: Mapping[str, int]) -> dict[str, int]:
    """The probe counters of ring-buffer events dropped, by event type."""
    return {name.removeprefix("lost_"): n for name, n in counters.items()
            if name.startswith("lost_") and not name.endswith("_map_full")}


# bpf/completion.c: exits[] has one slot per reason below MAX_EXIT_REASON, then these two.
EXIT_SLOT_OTHER: Final = abi.MAX_EXIT_REASON
EXIT_SLOT_ERROR: Final = abi.MAX_EXIT_REASON + 1
EXIT_SLOTS: Final = abi.MAX_EXIT_REASON + 2
# pending_hist[s] counts windows that stayed pending v ns with 2**(s-1) <= v < 2**s (bcc's
# bpf_log2l); the last slot also takes everything longer.
HIST_SLOTS: Final = 40
# Exported bucket bounds: 2**10 ns (~1 us, below one exit round trip) .. 2**38 ns (~275 s).
FIRST_BUCKET_SLOT: Final = 10
BUCKET_BOUNDS_S: Final = tuple(2**s / 1e9 for s in range(FIRST_BUCKET_SLOT, HIST_SLOTS - 1))
PATHS: Final = ("reentry", "immediate_exit")  # enum completion_path


class RunState(enum.IntEnum):
    """enum vcpu_run_state in bpf/completion.c (the tests compare them)."""

    IDLE = 0
    RUNNING = 1
    PENDING = 2
    CLOSED = 3  # last fd gone; the entry waits for Python to read its statistics and delete it


def exit_slot_name(slot: int) -> str:
    if slot == EXIT_SLOT_ERROR:
        return "none_run_interrupted"  # KVM_RUN returned an error: signal or immediate_exit
    if slot == EXIT_SLOT_OTHER:
        return "unknown"
    return abi.exit_reason_name(slot)


@dataclass
class VcpuCounters:
    """One vCPU's statistics as the kernel kept them (or a sum of several)."""

    exits: list[int] = field(default_factory=lambda: [0] * EXIT_SLOTS)
    pending_hist: list[int] = field(default_factory=lambda: [0] * HIST_SLOTS)
    pending_ns_sum: int = 0
    completions: list[int] = field(default_factory=lambda: [0] * len(PATHS))

    def add(self, other: VcpuCounters) -> None:
        for mine, theirs in ((self.exits, other.exits), (self.pending_hist, other.pending_hist),
                             (self.completions, other.completions)):
            for i, value in enumerate(theirs[:len(mine)]):
                mine[i] += value
        self.pending_ns_sum += other.pending_ns_sum

    @property
    def userspace_exits(self) -> int:
        return sum(self.exits)

    @property
    def completed(self) -> int:
        return sum(self.pending_hist)

    def cumulative_buckets(self) -> list[tuple[float, int]]:
        """(upper bound in seconds, cumulative count) for each exported bucket, +Inf last."""
        out: list[tuple[float, int]] = []
        running = sum(self.pending_hist[:FIRST_BUCKET_SLOT + 1])
        for i, bound in enumerate(BUCKET_BOUNDS_S):
            if i:
                running += self.pending_hist[FIRST_BUCKET_SLOT + i]
            out.append((bound, running))
        out.append((float("inf"), self.completed))
        return out

    def pending_exits(self, leaves_pending: Iterable[int]) -> int:
        return sum(self.exits[r] for r in leaves_pending if 0 <= r < abi.MAX_EXIT_REASON)


def total(parts: Iterable[VcpuCounters]) -> VcpuCounters:
    out = VcpuCounters()
    for part in parts:
        out.add(part)
    return out


@dataclass
class VmLedger:
    """Counts of vCPUs that are gone, per VM name, and when each VM was last seen alive."""

    retired: dict[str, VcpuCounters] = field(default_factory=dict)
    gone_since: dict[str, float] = field(default_factory=dict)

    def retire(self, vm: str, counters: VcpuCounters) -> None:
        self.retired.setdefault(vm, VcpuCounters()).add(counters)

    def mark_gone(self, vm: str, now: float) -> None:
        self.gone_since.setdefault(vm, now)

    def mark_alive(self, vm: str) -> None:
        self.gone_since.pop(vm, None)

    def expired(self, now: float, retain_s: float) -> list[str]:
        """VMs gone for longer than ``retain_s``: their series may be dropped."""
        return [vm for vm, since in self.gone_since.items() if now - since >= retain_s]

    def drop(self, vm: str) -> None:
        self.retired.pop(vm, None)
        self.gone_since.pop(vm, None)


@dataclass(frozen=True)
class VcpuEntry:
    """One entry of the probes' ``vcpus`` map as a scrape reads it."""

    uid: int
    pid: int
    vcpu_id: int
    state: int  # enum vcpu_run_state; 3 = closed, waiting for Python to read and delete it
    counters: VcpuCounters
    pending_since_ns: int = 0  # CLOCK_MONOTONIC of the exit that opened the window (pending)
    comm: str = ""  # the creating thread's comm, kept by the kernel ("" for adopted vCPUs)
