"""ctypes mirrors of the x86_64 KVM UAPI structs the VMM passes to its ioctls.

Sizes are asserted at import against the ones encoded in the ioctl numbers of
:mod:`tracer.abi` (the ``size`` field of ``_IOC``), so a layout slip cannot go unnoticed.
"""

from __future__ import annotations

import ctypes
from typing import Final

from tracer import abi

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class UserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class EnableCap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class Regs(ctypes.Structure):
    _fields_ = [
        (name, u64)
        for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
                     "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
    ]


class Segment(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class DTable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS: Final = 256


class Sregs(ctypes.Structure):
    _fields_ = [
        ("cs", Segment),
        ("ds", Segment),
        ("es", Segment),
        ("fs", Segment),
        ("gs", Segment),
        ("ss", Segment),
        ("tr", Segment),
        ("ldt", Segment),
        ("gdt", DTable),
        ("idt", DTable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class MsrEntry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class Msrs1(ctypes.Structure):
    """``struct kvm_msrs`` followed by exactly one entry (the header alone is the ioctl size)."""

    _fields_ = [("nmsrs", u32), ("pad", u32), ("entry", MsrEntry)]


class MsrsHeader(ctypes.Structure):
    _fields_ = [("nmsrs", u32), ("pad", u32)]


class VcpuEvents(ctypes.Structure):
    # Opaque to the VMM: it is saved and written back unchanged, like a snapshot would.
    _fields_ = [("raw", u8 * 64)]


class MpState(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


class Fpu(ctypes.Structure):
    _fields_ = [("raw", u8 * 416)]


class Xcr(ctypes.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class Xcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", Xcr * 16), ("padding", u64 * 16)]


class DebugRegs(ctypes.Structure):
    _fields_ = [
        ("db", u64 * 4),
        ("dr6", u64),
        ("dr7", u64),
        ("flags", u64),
        ("reserved", u64 * 9),
    ]


class Xsave(ctypes.Structure):
    _fields_ = [("region", u32 * 1024)]


class CpuidEntry2(ctypes.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


CPUID_MAX_ENTRIES: Final = 256


class Cpuid2(ctypes.Structure):
    _fields_ = [
        ("nent", u32),
        ("padding", u32),
        ("entries", CpuidEntry2 * CPUID_MAX_ENTRIES),
    ]


class Cpuid2Header(ctypes.Structure):
    _fields_ = [("nent", u32), ("padding", u32)]


def _ioctl_size(name: str) -> int:
    return (abi.IOCTL_BY_NAME[name].number >> 16) & 0x3FFF


# The struct each ioctl's _IOC size field names; checked once at import.
_SIZE_CHECKS: Final[tuple[tuple[str, type[ctypes.Structure]], ...]] = (
    ("KVM_SET_USER_MEMORY_REGION", UserspaceMemoryRegion),
    ("KVM_ENABLE_CAP", EnableCap),
    ("KVM_GET_REGS", Regs),
    ("KVM_GET_SREGS", Sregs),
    ("KVM_GET_MSRS", MsrsHeader),
    ("KVM_GET_VCPU_EVENTS", VcpuEvents),
    ("KVM_GET_MP_STATE", MpState),
    ("KVM_GET_FPU", Fpu),
    ("KVM_GET_XCRS", Xcrs),
    ("KVM_GET_DEBUGREGS", DebugRegs),
    ("KVM_GET_XSAVE", Xsave),
    ("KVM_GET_CPUID2", Cpuid2Header),
)
for _name, _struct in _SIZE_CHECKS:
    if ctypes.sizeof(_struct) != _ioctl_size(_name):
        raise ImportError(f"{_struct.__name__} is {ctypes.sizeof(_struct)} bytes, {_name} says "
                          f"{_ioctl_size(_name)}")
