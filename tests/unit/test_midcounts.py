"""Exact counts when the ring buffer drops events (tracer.midcounts): the kernel's mid_counts
keys judged again for the sanctioned counter, and lost_windows counted as snapshots once."""

from __future__ import annotations

import struct
import threading

from probe_fakes import EXPECTED, ModelProbes, NamedProc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tracer import abi
from tracer.alerts import MemorySink
from tracer.events import (
    EventFlag,
    EventType,
    HypervAccess,
    KernelEvent,
    MmioAccess,
    PioAccess,
    decode_access,
)
from tracer.metrics import CompletionCollector, ExporterHealth, MetricsOptions
from tracer.midcounts import LostWindow, MidKey, access_of_head, head_of_access, key_of_event
from tracer.model import ProbeModel
from tracer.policy import PolicyOverrides, build_policy
from tracer.tracker import Tracker
from tracer.windows import kind_values

PID, VM_FD, FD = 4242, 3, 5
IO = abi.KVM_EXIT_IO
GET_REGS = abi.IOCTL_BY_NAME["KVM_GET_REGS"].number
GET_SREGS = abi.IOCTL_BY_NAME["KVM_GET_SREGS"].number
SET_REGS = abi.IOCTL_BY_NAME["KVM_SET_REGS"].number
OUT_3F8 = PioAccess(0x3F8, "out", 1, 1)
OUT_7E = PioAccess(0x7E, "out", 2, 1)


# ---- keys ---------------------------------------------------------------------------------------

def test_the_head_is_the_first_four_bytes_the_kernel_reads() -> None:
    for direction, size, port in ((1, 2, 0x7E), (0, 1, 0x3F8), (1, 4, 0xCF8)):
        raw = struct.pack("<BBHIQ", direction, size, port, 3, 0x1000).ljust(abi.ACCESS_BYTES,
                                                                             b"\0")
        access = decode_access(IO, raw)
        assert head_of_access(IO, access) == int.from_bytes(raw[:4], "little")
        back = access_of_head(IO, head_of_access(IO, access), EventFlag.ACCESS_VALID)
        assert isinstance(back, PioAccess) and isinstance(access, PioAccess)
        assert (back.port, back.direction, back.size) == (access.port, access.direction,
                                                           access.size)
    hv = access_of_head(abi.KVM_EXIT_HYPERV, 1, EventFlag.ACCESS_VALID)
    assert hv == HypervAccess(1)
    # Other exits carry no head; an unread head is no access at all.
    assert head_of_access(abi.KVM_EXIT_MMIO, MmioAccess(0xFEE00000, 4, True)) == 0
    assert access_of_head(abi.KVM_EXIT_MMIO, 0, EventFlag.ACCESS_VALID) is None
    assert access_of_head(IO, 0x7E0201, 0) is None


def _violation(access: PioAccess | None, flags: EventFlag) -> KernelEvent:
    return KernelEvent(type=EventType.VIOLATION, tgid=PID, tid=PID + 1, vcpu_id=0, fd=FD,
                       cmd=GET_REGS, exit_reason=IO, flags=flags, seq=1, pending_since_ns=0,
                       ts_ns=1, aux=0, vcpu_uid=1, access=access, comm="vmm")


def test_an_events_key_is_the_kernels() -> None:
    key = key_of_event(_violation(OUT_7E, EventFlag.ACCESS_VALID | EventFlag.QUIRK_7E_DISABLED
                                  | EventFlag.AT_RETURN))
    assert key == MidKey(PID, GET_REGS, IO, 0x007E0201, 3)
    assert key.quirk_7e_disabled
    assert key_of_event(_violation(None, EventFlag(0))) == MidKey(PID, GET_REGS, IO, 0, 0)


# ---- a rig whose ring drops what a test says ----------------------------------------------------

class LossyModel(ProbeModel):
    """The model, plus the kernel's lost_windows as a test fills it."""

    def __init__(self, pending: frozenset[int], kinds: dict[int, int]) -> None:
        super().__init__(pending, kinds)
        self.lost: dict[tuple[int, int], LostWindow] = {}

    def lost_windows(self) -> list[LostWindow]:
        return list(self.lost.values())

    def take_lost_window(self, vcpu_uid: int, seq: int) -> LostWindow | None:
        return self.lost.pop((vcpu_uid, seq), None)


class Rig:
    def __init__(self, inspection: str = "violation") -> None:
        policy = build_policy(PolicyOverrides(arch="x86_64", inspection=inspection))
        self.model = LossyModel(policy.pending_exits, kind_values(policy))
        self.sink = MemorySink()
        self.tracker = Tracker(policy, self.sink, NamedProc({PID: "web01"}), self.model)
        self.probes = ModelProbes(self.model)
        self.probes.lost = 0
        self.registry = CollectorRegistry()
        self.registry.register(CompletionCollector(
            self.tracker, self.probes, threading.Lock(),
            ExporterHealth(expected_probes=EXPECTED, bcc_version="0.26.0"),
            MetricsOptions()))
        self.model.ioctl_enter(PID, PID + 1, VM_FD, abi.KVM_CREATE_VCPU, 0)
        self.model.ioctl_exit(PID, PID + 1, FD)
        self.deliver(self.model.drain())
        self.held: list[KernelEvent] = []

    def deliver(self, events: list[KernelEvent]) -> None:
        for ev in events:
            self.tracker.handle(ev)

    def window(self, access: PioAccess, cmds: list[int], delivered: int) -> int:
        """An exit with ``access`` pending, then ``cmds`` mid-completion, of whose reports the
        ring takes the first ``delivered`` (the kernel keeps the window in lost_windows)."""
        self.model.ioctl_enter(PID, PID + 1, FD, abi.KVM_RUN)
        self.deliver(self.model.drain())
        self.model.userspace_exit(PID + 1, IO, 0, access)
        for cmd in cmds:
            self.model.ioctl_enter(PID, PID + 1, FD, cmd)
            self.model.ioctl_exit(PID, PID + 1, 0)
        reports = [ev for ev in self.model.drain() if ev.type is EventType.VIOLATION]
        self.deliver(reports[:delivered])
        (vcpu,) = self.model.vcpus.values()
        if delivered < len(reports):
            self.probes.lost += len(reports) - delivered
            key = key_of_event(reports[0])
            saves = len({c for c in cmds if abi.IOCTLS[c].kind is abi.IoctlKind.SAVE})
            self.model.lost[(vcpu.uid, vcpu.seq)] = LostWindow(
                vcpu.uid, vcpu.seq, PID, 0, IO, key.head, key.flags, saves, len(cmds))
            self.held = reports[delivered:]
        return vcpu.seq

    def complete(self) -> None:
        """KVM_RUN again: the window closes (its WINDOW_CLOSED delivered)."""
        self.model.ioctl_enter(PID, PID + 1, FD, abi.KVM_RUN)
        self.deliver(self.model.drain())
        self.model.userspace_exit(PID + 1, abi.EXIT_REASON_BY_NAME["KVM_EXIT_HLT"], 0, None)
        self.deliver(self.model.drain())

    def reenter_unseen(self) -> list[KernelEvent]:
        """KVM_RUN again, its WINDOW_CLOSED still in flight (returned): the kernel has closed
        the window, the tracker does not know yet."""
        self.model.ioctl_enter(PID, PID + 1, FD, abi.KVM_RUN)
        return self.model.drain()

    def sweep(self) -> None:
        self.tracker.sweep()

    def scrape(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        text = generate_latest(self.registry).decode()
        return {tuple(sorted(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples
                if s.name == name}


def test_a_window_seen_in_part_is_a_snapshot_by_the_kernels_save_count() -> None:
    rig = Rig()
    rig.window(OUT_3F8, [GET_REGS, GET_SREGS, SET_REGS], delivered=1)
    rig.complete()
    (snap,) = rig.sink.snapshots
    assert snap.events_lost and snap.ioctls == ["KVM_GET_REGS"]
    assert "2 kinds of state read" in snap.reason
    assert rig.tracker.stats.snapshots["web01"] == 1
    assert rig.model.lost == {}  # taken
    assert rig.scrape("kvm_completion_snapshots_total") == {(("vm", "web01"),): 1.0}
    # every report counted, of which 2 never arrived: the saves, and a restore after an OUT
    assert sum(rig.scrape("kvm_completion_violations_total").values()) == 2
    assert rig.scrape("kvm_completion_sanctioned_total") == {
        (("rule", "restore-after-pio"), ("vm", "web01")): 1.0}
    rig.sweep()
    assert rig.tracker.stats.snapshots["web01"] == 1


def test_a_window_never_seen_is_counted_by_the_sweep_once_even_if_its_events_come_late() -> None:
    rig = Rig()
    rig.window(OUT_3F8, [GET_REGS, GET_SREGS], delivered=0)
    late = rig.held + rig.reenter_unseen()
    assert rig.sink.snapshots == []
    rig.sweep()
    (snap,) = rig.sink.snapshots
    assert snap.closed_by == "events_lost" and snap.access["port"] == "0x3f8"
    assert rig.model.lost == {}
    rig.sweep()
    # Some events were in flight after all: the tracker's own window closes, counted already.
    rig.deliver(late)
    rig.tracker.tick()
    assert len(rig.sink.snapshots) == 1
    assert rig.scrape("kvm_completion_snapshots_total") == {(("vm", "web01"),): 1.0}


def test_an_open_window_waits_for_the_kernel_to_close_it() -> None:
    rig = Rig()
    rig.window(OUT_3F8, [GET_REGS, GET_SREGS], delivered=0)
    rig.tracker.sweep()  # the model's vCPU is still pending
    assert rig.sink.snapshots == [] and len(rig.model.lost) == 1


def test_lost_port_7e_syncs_are_sanctioned_not_violations_nor_snapshots() -> None:
    rig = Rig()
    cmds = [GET_REGS, GET_SREGS, SET_REGS]
    rig.window(OUT_7E, cmds, delivered=1)
    rig.complete()
    rig.sweep()
    rig.window(OUT_7E, cmds, delivered=0)
    rig.reenter_unseen()
    rig.sweep()
    assert rig.sink.snapshots == []
    assert rig.scrape("kvm_completion_sanctioned_total") == {
        (("rule", "port-0x7e"), ("vm", "web01")): 6.0}
    assert rig.scrape("kvm_completion_violations_total") == {}


def test_lost_restores_after_an_out_are_sanctioned_as_such() -> None:
    rig = Rig()
    rig.window(OUT_3F8, [SET_REGS, SET_REGS], delivered=0)
    assert rig.scrape("kvm_completion_sanctioned_total") == {
        (("rule", "restore-after-pio"), ("vm", "web01")): 2.0}
    assert rig.scrape("kvm_completion_violations_total") == {}


def test_a_held_peek_in_a_window_that_lost_a_report_is_a_violation() -> None:
    """A KVM_GET_REGS held, a KVM_GET_SREGS after it: the kernel reports both (the held read
    first); the second report dropped. The one delivered keeps its verdict (the kernel judged
    the window), the lost one is counted, never an inspection."""
    rig = Rig(inspection="benign")
    rig.window(OUT_3F8, [GET_REGS, GET_SREGS], delivered=1)
    rig.complete()
    assert rig.tracker.inspection_counts() == {}
    (seen,) = rig.sink.violations
    assert seen.ioctl == "KVM_GET_REGS" and seen.judged_on == "snapshot"
    assert rig.tracker.unverified() == {"web01": 1}
    assert sum(rig.scrape("kvm_completion_violations_total").values()) == 2
    assert rig.scrape("kvm_completion_inspections_total") == {}
    assert rig.scrape("kvm_completion_snapshots_total") == {(("vm", "web01"),): 1.0}


def test_a_lone_peek_still_completes_as_an_inspection() -> None:
    rig = Rig(inspection="benign")
    rig.window(OUT_3F8, [GET_REGS], delivered=1)
    assert rig.model.out == []  # nothing sent: nothing to lose
    rig.complete()
    assert rig.tracker.inspection_counts() == {("web01", "KVM_GET_REGS", "KVM_EXIT_IO"): 1}
    assert rig.sink.violations == []
