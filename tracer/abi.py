"""KVM userspace ABI tables the tracer relies on (x86_64, generic _IOC encoding).

Every number here is checked against the system's ``<linux/kvm.h>`` by
``tests/unit/test_abi_headers.py`` through the C compiler; nothing is trusted as copied.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

KVMIO: Final = 0xAE

# --- exit reasons (struct kvm_run.exit_reason) -------------------------------------------------
EXIT_REASONS: Final[dict[int, str]] = {
    0: "KVM_EXIT_UNKNOWN",
    1: "KVM_EXIT_EXCEPTION",
    2: "KVM_EXIT_IO",
    3: "KVM_EXIT_HYPERCALL",
    4: "KVM_EXIT_DEBUG",
    5: "KVM_EXIT_HLT",
    6: "KVM_EXIT_MMIO",
    7: "KVM_EXIT_IRQ_WINDOW_OPEN",
    8: "KVM_EXIT_SHUTDOWN",
    9: "KVM_EXIT_FAIL_ENTRY",
    10: "KVM_EXIT_INTR",
    11: "KVM_EXIT_SET_TPR",
    12: "KVM_EXIT_TPR_ACCESS",
    13: "KVM_EXIT_S390_SIEIC",
    14: "KVM_EXIT_S390_RESET",
    15: "KVM_EXIT_DCR",
    16: "KVM_EXIT_NMI",
    17: "KVM_EXIT_INTERNAL_ERROR",
    18: "KVM_EXIT_OSI",
    19: "KVM_EXIT_PAPR_HCALL",
    20: "KVM_EXIT_S390_UCONTROL",
    21: "KVM_EXIT_WATCHDOG",
    22: "KVM_EXIT_S390_TSCH",
    23: "KVM_EXIT_EPR",
    24: "KVM_EXIT_SYSTEM_EVENT",
    25: "KVM_EXIT_S390_STSI",
    26: "KVM_EXIT_IOAPIC_EOI",
    27: "KVM_EXIT_HYPERV",
    28: "KVM_EXIT_ARM_NISV",
    29: "KVM_EXIT_X86_RDMSR",
    30: "KVM_EXIT_X86_WRMSR",
    31: "KVM_EXIT_DIRTY_RING_FULL",
    32: "KVM_EXIT_AP_RESET_HOLD",
    33: "KVM_EXIT_X86_BUS_LOCK",
    34: "KVM_EXIT_XEN",
    35: "KVM_EXIT_RISCV_SBI",
    36: "KVM_EXIT_RISCV_CSR",
    37: "KVM_EXIT_NOTIFY",
    38: "KVM_EXIT_LOONGARCH_IOCSR",
    39: "KVM_EXIT_MEMORY_FAULT",
    40: "KVM_EXIT_TDX",
}
EXIT_REASON_BY_NAME: Final[dict[str, int]] = {name: num for num, name in EXIT_REASONS.items()}
# The BPF policy array is indexed by exit reason; reasons at or above this are never pending.
MAX_EXIT_REASON: Final = 64

KVM_EXIT_IO: Final = 2
KVM_EXIT_HYPERCALL: Final = 3
KVM_EXIT_MMIO: Final = 6
KVM_EXIT_HYPERV: Final = 27
KVM_EXIT_X86_RDMSR: Final = 29
KVM_EXIT_X86_WRMSR: Final = 30
KVM_EXIT_IO_IN: Final = 0
KVM_EXIT_IO_OUT: Final = 1
KVM_EXIT_HYPERV_HCALL: Final = 2

# -EINTR as returned by KVM_RUN after an immediate exit or a pending signal.
EINTR_ERRNO: Final = -4


def exit_reason_name(reason: int) -> str:
    return EXIT_REASONS.get(reason, f"KVM_EXIT_{reason}")


# --- ioctl numbers ---------------------------------------------------------------------------
class IoctlKind(enum.Enum):
    RUN = "run"
    SAVE = "save"  # reads vCPU state
    RESTORE = "restore"  # writes vCPU state
    VCPU_LIFECYCLE = "vcpu_lifecycle"  # creates a vCPU fd
    VM = "vm"  # VM or system ioctls the tracer (or the built-in VMM) cares about
    OTHER = "other"


@dataclass(frozen=True)
class Ioctl:
    name: str
    number: int
    kind: IoctlKind


def _ioc(direction: int, nr: int, size: int) -> int:
    """The generic _IOC encoding (asm-generic/ioctl.h): dir<<30 | size<<16 | type<<8 | nr."""
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(0, nr, 0)


def _iow(nr: int, size: int) -> int:
    return _ioc(1, nr, size)


def _ior(nr: int, size: int) -> int:
    return _ioc(2, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(3, nr, size)


_S, _R, _V, _O = IoctlKind.SAVE, IoctlKind.RESTORE, IoctlKind.VM, IoctlKind.OTHER

# name, number, kind.  Sizes are those of the UAPI structs on x86_64.
_IOCTL_TABLE: Final[tuple[tuple[str, int, IoctlKind], ...]] = (
    ("KVM_GET_API_VERSION", _io(0x00), _V),
    ("KVM_CREATE_VM", _io(0x01), _V),
    ("KVM_CHECK_EXTENSION", _io(0x03), _V),
    ("KVM_GET_VCPU_MMAP_SIZE", _io(0x04), _V),
    ("KVM_CREATE_VCPU", _io(0x41), IoctlKind.VCPU_LIFECYCLE),
    ("KVM_SET_USER_MEMORY_REGION", _iow(0x46, 0x20), _V),
    ("KVM_SET_TSS_ADDR", _io(0x47), _V),
    ("KVM_CREATE_IRQCHIP", _io(0x60), _V),
    ("KVM_RUN", _io(0x80), IoctlKind.RUN),
    ("KVM_ENABLE_CAP", _iow(0xA3, 0x68), _V),
    ("KVM_X86_SET_MSR_FILTER", _iow(0xC6, 0x188), _V),
    # vCPU state getters (a snapshot reads these)
    ("KVM_GET_REGS", _ior(0x81, 0x90), _S),
    ("KVM_GET_SREGS", _ior(0x83, 0x138), _S),
    ("KVM_GET_MSRS", _iowr(0x88, 0x8), _S),
    ("KVM_GET_FPU", _ior(0x8C, 0x1A0), _S),
    ("KVM_GET_LAPIC", _ior(0x8E, 0x400), _S),
    ("KVM_GET_CPUID2", _iowr(0x91, 0x8), _S),
    ("KVM_GET_MP_STATE", _ior(0x98, 0x4), _S),
    ("KVM_GET_VCPU_EVENTS", _ior(0x9F, 0x40), _S),
    ("KVM_GET_DEBUGREGS", _ior(0xA1, 0x80), _S),
    ("KVM_GET_TSC_KHZ", _io(0xA3), _S),
    ("KVM_GET_XSAVE", _ior(0xA4, 0x1000), _S),
    ("KVM_GET_XCRS", _ior(0xA6, 0x188), _S),
    ("KVM_GET_ONE_REG", _iow(0xAB, 0x10), _S),  # encoded _IOW although it reads
    ("KVM_GET_REG_LIST", _iowr(0xB0, 0x8), _S),
    ("KVM_GET_NESTED_STATE", _iowr(0xBE, 0x80), _S),
    ("KVM_XEN_VCPU_GET_ATTR", _iowr(0xCA, 0x48), _S),
    ("KVM_GET_SREGS2", _ior(0xCC, 0x140), _S),
    ("KVM_GET_XSAVE2", _ior(0xCF, 0x1000), _S),
    ("KVM_GET_DEVICE_ATTR", _iow(0xE2, 0x18), _S),
    # vCPU state setters (a restore writes these)
    ("KVM_SET_REGS", _iow(0x82, 0x90), _R),
    ("KVM_SET_SREGS", _iow(0x84, 0x138), _R),
    ("KVM_SET_MSRS", _iow(0x89, 0x8), _R),
    ("KVM_SET_FPU", _iow(0x8D, 0x1A0), _R),
    ("KVM_SET_LAPIC", _iow(0x8F, 0x400), _R),
    ("KVM_SET_CPUID2", _iow(0x90, 0x8), _R),
    ("KVM_SET_MP_STATE", _iow(0x99, 0x4), _R),
    ("KVM_SET_GUEST_DEBUG", _iow(0x9B, 0x48), _R),
    ("KVM_SET_VCPU_EVENTS", _iow(0xA0, 0x40), _R),
    ("KVM_SET_DEBUGREGS", _iow(0xA2, 0x80), _R),
    ("KVM_SET_TSC_KHZ", _io(0xA2), _R),
    ("KVM_SET_XSAVE", _iow(0xA5, 0x1000), _R),
    ("KVM_SET_XCRS", _iow(0xA7, 0x188), _R),
    ("KVM_SET_ONE_REG", _iow(0xAC, 0x10), _R),
    ("KVM_SET_NESTED_STATE", _iow(0xBF, 0x80), _R),
    ("KVM_XEN_VCPU_SET_ATTR", _iow(0xCB, 0x48), _R),
    ("KVM_SET_SREGS2", _iow(0xCD, 0x140), _R),
    ("KVM_SET_DEVICE_ATTR", _iow(0xE1, 0x18), _R),
    # vCPU ioctls that are neither: injecting events before re-entry is normal VMM behaviour
    ("KVM_INTERRUPT", _iow(0x86, 0x4), _O),
    ("KVM_NMI", _io(0x9A), _O),
    ("KVM_SET_SIGNAL_MASK", _iow(0x8B, 0x4), _O),
    ("KVM_KVMCLOCK_CTRL", _io(0xAD), _O),
    # QEMU's kvmvapic issues these inside the port-0x7e exit, next to its state sync.
    ("KVM_TPR_ACCESS_REPORTING", _iowr(0x92, 0x28), _O),
    ("KVM_SET_VAPIC_ADDR", _iow(0x93, 0x8), _O),
)

IOCTLS: Final[dict[int, Ioctl]] = {num: Ioctl(name, num, kind) for name, num, kind in _IOCTL_TABLE}
IOCTL_BY_NAME: Final[dict[str, Ioctl]] = {i.name: i for i in IOCTLS.values()}
SAVE_IOCTLS: Final[frozenset[int]] = frozenset(n for n, i in IOCTLS.items() if i.kind is _S)
RESTORE_IOCTLS: Final[frozenset[int]] = frozenset(n for n, i in IOCTLS.items() if i.kind is _R)

KVM_RUN: Final = IOCTL_BY_NAME["KVM_RUN"].number
KVM_CREATE_VCPU: Final = IOCTL_BY_NAME["KVM_CREATE_VCPU"].number
KVM_ENABLE_CAP: Final = IOCTL_BY_NAME["KVM_ENABLE_CAP"].number
KVM_CAP_DISABLE_QUIRKS: Final = 116
KVM_CAP_DISABLE_QUIRKS2: Final = 213
KVM_X86_QUIRK_OUT_7E_INC_RIP: Final = 1 << 3
# What the built-in VMM needs besides the ioctls.
KVM_API_VERSION: Final = 12
KVM_CAP_X86_USER_SPACE_MSR: Final = 188
KVM_MSR_EXIT_REASON_INVAL: Final = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN: Final = 1 << 1
KVM_MSR_EXIT_REASON_FILTER: Final = 1 << 2


def ioctl_name(number: int) -> str:
    known = IOCTLS.get(number)
    return known.name if known else f"0x{number:08X}"


# --- struct kvm_run offsets (UAPI, stable) ---------------------------------------------------
@dataclass(frozen=True)
class KvmRunLayout:
    immediate_exit: int = 1
    exit_reason: int = 8
    flags: int = 14
    exit_union: int = 32
    io_direction: int = 32
    io_size: int = 33
    io_port: int = 34
    io_count: int = 36
    io_data_offset: int = 40
    mmio_phys_addr: int = 32
    mmio_data: int = 40
    mmio_len: int = 48
    mmio_is_write: int = 52
    msr_error: int = 32
    msr_reason: int = 40
    msr_index: int = 44
    msr_data: int = 48
    hypercall_nr: int = 32
    hyperv_type: int = 32


KVM_RUN_LAYOUT: Final = KvmRunLayout()
# Bytes of the exit union the probes copy when an exit leaves a completion pending.
ACCESS_BYTES: Final = 24
