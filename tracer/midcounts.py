"""What the kernel counts of every mid-completion report (``mid_counts`` and ``lost_windows``
in bpf/completion.c), so the violation, sanctioned and snapshot counters stay exact when the
ring buffer drops the reports' events.

A report is counted under a :class:`MidKey` that holds what the policy judges it on: the
ioctl, the exit reason, and for IO and Hyper-V exits the first four bytes of the exit union
(the port and direction that the port-0x7e and restore-after-OUT sanctions look at, the Hyper-V
exit type that tells a SynIC exit) plus the process's 0x7e quirk. A report the tracker never
received is judged again from its key alone. A window one of whose reports was lost is kept
with its save count (:class:`LostWindow`), so that it counts as a snapshot even when the
tracker saw fewer than two of its saves.

Pure Python (no bcc): tracer.probes reads the maps into these types, tracer.model mirrors them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from tracer import abi
from tracer.events import (
    EventFlag,
    HypervAccess,
    KernelEvent,
    PendingAccess,
    PioAccess,
    decode_access,
)

# The exits whose access head the kernel keys on (KVM_EXIT_IO_NR, KVM_EXIT_HYPERV_NR).
HEAD_EXITS = frozenset({abi.KVM_EXIT_IO, abi.KVM_EXIT_HYPERV})
# The key's flags: EV_F_ACCESS_VALID (the head was read) and EV_F_QUIRK_7E_DISABLED.
KEY_FLAGS = EventFlag.ACCESS_VALID | EventFlag.QUIRK_7E_DISABLED


class MidKey(NamedTuple):
    """``struct mid_key``: one count of ``mid_counts``."""

    pid: int
    cmd: int
    exit_reason: int
    head: int  # exit union bytes 0..3 (little-endian u32) for IO/Hyper-V exits, else 0
    flags: int  # EventFlag.ACCESS_VALID | EventFlag.QUIRK_7E_DISABLED

    @property
    def quirk_7e_disabled(self) -> bool:
        return bool(self.flags & EventFlag.QUIRK_7E_DISABLED)

    def access(self) -> PendingAccess | None:
        """The access as far as the head tells it (an IO exit's count is not in it)."""
        return access_of_head(self.exit_reason, self.head, self.flags)


def head_of_access(exit_reason: int, access: PendingAccess | None) -> int:
    """The head the kernel read for an access decoded from the whole exit union."""
    if exit_reason == abi.KVM_EXIT_IO and isinstance(access, PioAccess):
        direction = abi.KVM_EXIT_IO_OUT if access.direction == "out" else abi.KVM_EXIT_IO_IN
        return int.from_bytes(struct.pack("<BBH", direction, access.size, access.port),
                              "little")
    if exit_reason == abi.KVM_EXIT_HYPERV and isinstance(access, HypervAccess):
        return access.type
    return 0


def access_of_head(exit_reason: int, head: int, flags: int) -> PendingAccess | None:
    if exit_reason not in HEAD_EXITS or not flags & EventFlag.ACCESS_VALID:
        return None
    return decode_access(exit_reason, head.to_bytes(4, "little").ljust(abi.ACCESS_BYTES, b"\0"))


def key_of_event(ev: KernelEvent) -> MidKey:
    """The key the kernel counted a VIOLATION event under (its access was read at the same
    instant, from the same page, as the head)."""
    flags = int(ev.flags & EventFlag.QUIRK_7E_DISABLED)
    head = 0
    if ev.exit_reason in HEAD_EXITS and ev.access is not None:
        head = head_of_access(ev.exit_reason, ev.access)
        flags |= EventFlag.ACCESS_VALID
    return MidKey(ev.tgid, ev.cmd, ev.exit_reason, head, flags)


@dataclass(frozen=True)
class LostWindow:
    """``lost_windows``: a pending window one of whose reports found the ring buffer full."""

    vcpu_uid: int
    seq: int
    pid: int
    vcpu_id: int
    exit_reason: int
    head: int
    flags: int
    saves: int  # save kinds read in the window (up to its last report): 2+ is a snapshot
    reports: int  # every report in the window

    @property
    def key(self) -> tuple[int, int]:
        return (self.vcpu_uid, self.seq)

    @property
    def quirk_7e_disabled(self) -> bool:
        return bool(self.flags & EventFlag.QUIRK_7E_DISABLED)

    def access(self) -> PendingAccess | None:
        return access_of_head(self.exit_reason, self.head, self.flags)
