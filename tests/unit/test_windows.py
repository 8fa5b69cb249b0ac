"""The kernel's window rule as Python encodes and reads it (tracer.windows)."""

from __future__ import annotations

from tracer import abi
from tracer.policy import PolicyOverrides, build_policy
from tracer.windows import (
    KIND_BIT_SHIFT,
    KIND_HOLD,
    KIND_RESTORE,
    KIND_SAVE,
    HeldRead,
    HeldWhy,
    judge_at_exit,
    kind_values,
    save_kind_bits,
    split_held_aux,
)

GET_REGS = abi.IOCTL_BY_NAME["KVM_GET_REGS"].number
GET_LAPIC = abi.IOCTL_BY_NAME["KVM_GET_LAPIC"].number
SET_REGS = abi.IOCTL_BY_NAME["KVM_SET_REGS"].number


def test_every_save_kind_has_its_own_bit_and_is_held_by_default() -> None:
    values = kind_values(build_policy(PolicyOverrides(arch="x86_64")))
    saves = [values[n] for n in abi.SAVE_IOCTLS]
    assert all(v & 0xFF == KIND_SAVE and v & KIND_HOLD for v in saves)
    bits = {(v >> KIND_BIT_SHIFT) & 0xFF for v in saves}
    assert len(bits) == len(abi.SAVE_IOCTLS) and max(bits) < 32
    assert all(values[n] == KIND_RESTORE for n in abi.RESTORE_IOCTLS)
    assert set(values) == set(abi.SAVE_IOCTLS) | set(abi.RESTORE_IOCTLS)


def test_strict_mode_holds_nothing_and_peek_ioctls_narrow_it() -> None:
    strict = kind_values(build_policy(PolicyOverrides(arch="x86_64", inspection="violation")))
    assert not any(v & KIND_HOLD for v in strict.values())
    narrow = kind_values(build_policy(PolicyOverrides(arch="x86_64",
                                                      peek_ioctls=["KVM_GET_LAPIC"])))
    assert narrow[GET_LAPIC] & KIND_HOLD and not narrow[GET_REGS] & KIND_HOLD
    # the bits do not depend on the policy: the kernel compares them within one window
    assert {n: v & ~KIND_HOLD for n, v in narrow.items()} == {
        n: v & ~KIND_HOLD for n, v in strict.items()}


def test_bits_are_stable_by_name() -> None:
    bits = save_kind_bits()
    by_name = sorted(abi.IOCTLS[n].name for n in abi.SAVE_IOCTLS)
    assert [abi.IOCTLS[n].name for n, _ in sorted(bits.items(), key=lambda kv: kv[1])] == by_name


def test_held_aux_says_why_and_how_many() -> None:
    assert split_held_aux(int(HeldWhy.RESTORE) | 3 << 8) == (HeldWhy.RESTORE, 3)
    assert split_held_aux(int(HeldWhy.SNAPSHOT)) == (HeldWhy.SNAPSHOT, 1)
    assert split_held_aux(0x7F) == (None, 1)
    assert HeldWhy.SNAPSHOT.judged_on == "snapshot"


def _held(gen: int) -> HeldRead:
    return HeldRead(uid=1, pid=2, vcpu_id=0, tid=3, fd=5, cmd=GET_REGS, reads=1,
                    exit_reason=abi.KVM_EXIT_IO, seq=1, pending_since_ns=10, ts_ns=20,
                    restore_gen=gen)


def test_a_window_open_at_exit_is_judged_by_the_restore_generation() -> None:
    assert judge_at_exit(_held(4), 4) == "inspection"
    assert judge_at_exit(_held(4), 5) == "restore"
    assert judge_at_exit(_held(4), None) == "unverified"
