"""The kernel's window verdicts (bpf/completion.c ``state_ioctl_mid``), as Python sees them.

Per pending window the probes keep which save kinds (one per save ioctl) were read and whether
the process restored state. A lone read of one kind is *held*: if the window closes with that
one kind read and no restore in the process meanwhile, it was an inspection (counted in the
kernel's ``inspections`` map, never sent). A second kind, or a restore, makes the window a
finding: the held read is reported then (flag HELD) and every later state ioctl at once.

One kind of state alone cannot be restored into a VM (a restore needs the general registers and
the segments, the FPU, the MSRs, the LAPIC, ...); a VMM that saves in order to restore reads
several kinds. Strict mode (``inspection = "violation"``) holds nothing.

Pure Python (no bcc): tracer.probes writes :func:`kind_values` into ``ioctl_kinds`` and reads
:class:`HeldRead` from ``vcpus``; tracer.model mirrors the kernel.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, NamedTuple

from tracer import abi
from tracer.policy import CompletionPolicy

KIND_SAVE: Final = 1  # enum ioctl_kind
KIND_RESTORE: Final = 2
KIND_BIT_SHIFT: Final = 8
KIND_HOLD: Final = 1 << 16
MAX_KIND_BITS: Final = 32  # vcpu_state.window_kinds is a u32


class HeldWhy(enum.IntEnum):
    """``enum held_why``: what made a window holding a read a finding."""

    SNAPSHOT = 1  # another kind of state was read in the window
    RESTORE = 2  # state was restored (in the window, or elsewhere in the process meanwhile)

    @property
    def judged_on(self) -> str:
        return self.name.lower()


def save_kind_bits() -> dict[int, int]:
    """Save ioctl number -> its bit in window_kinds (by name order: stable across runs)."""
    saves = sorted(abi.SAVE_IOCTLS, key=lambda n: abi.IOCTLS[n].name)
    if len(saves) > MAX_KIND_BITS:
        raise ValueError(f"{len(saves)} save ioctls: window_kinds holds {MAX_KIND_BITS}")
    return {number: bit for bit, number in enumerate(saves)}


def kind_values(policy: CompletionPolicy) -> dict[int, int]:
    """``ioctl_kinds``: kind | bit << 8 | HOLD for every save and restore ioctl. A save is held
    (a lone read of it can be an inspection) when the policy says so (:meth:`is_peek`)."""
    out = {}
    for number, bit in save_kind_bits().items():
        hold = KIND_HOLD if policy.is_peek(abi.IOCTLS[number].name) else 0
        out[number] = KIND_SAVE | bit << KIND_BIT_SHIFT | hold
    for number in abi.RESTORE_IOCTLS:
        out[number] = KIND_RESTORE
    return out


def split_held_aux(aux: int) -> tuple[HeldWhy | None, int]:
    """A HELD violation's aux: why it was reported, and how many reads of its kind it stands
    for (at least one)."""
    why = aux & 0xFF
    return (HeldWhy(why) if why in HeldWhy._value2member_map_ else None), max(1, aux >> 8)


@dataclass(frozen=True)
class HeldRead:
    """A vCPU's window holding a read when its process ended (``vcpus`` fields)."""

    uid: int
    pid: int
    vcpu_id: int
    tid: int
    fd: int
    cmd: int
    reads: int
    exit_reason: int
    seq: int
    pending_since_ns: int
    ts_ns: int
    restore_gen: int  # the process's restore generation at the read


class InspectionKey(NamedTuple):
    """``struct insp_key``: one count of ``inspections``."""

    pid: int
    cmd: int
    exit_reason: int


def judge_at_exit(held: HeldRead, final_gen: int | None) -> str:
    """A window still holding a read when its process exited or exec'd: ``"inspection"``,
    ``"restore"`` (the process restored state while it was open), or ``"unverified"`` (the
    exit event that carries the final restore generation was lost)."""
    if final_gen is None:
        return "unverified"
    return "inspection" if final_gen == held.restore_gen else "restore"
