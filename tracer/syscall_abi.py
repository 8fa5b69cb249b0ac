"""The x86-64 syscall ABI the raw syscall probes rely on (bpf/completion.c, RAW_SYSCALLS).

raw_syscalls:sys_enter hands the programs the syscall number and the saved user registers; the
arguments are read from those at the offsets of the UAPI ``struct pt_regs`` (<asm/ptrace.h>).
tests/unit/test_syscall_abi.py checks every number here against <asm/unistd_64.h>,
<asm/ptrace.h> and the GDT selector layout through the C compiler.
"""

from __future__ import annotations

import platform
from typing import Final

# <asm/unistd_64.h>: the syscalls the probes follow.
SYSCALL_NUMBERS: Final = {
    "ioctl": 16, "close": 3, "dup": 32, "dup2": 33, "dup3": 292, "fcntl": 72, "mmap": 9,
    "close_range": 436,
}
# offsetof(struct pt_regs, <field>) in <asm/ptrace.h> (x86-64 user view; the kernel's struct
# has the same layout under shorter names). The probes read r10 .. cs in one copy.
PT_REGS_OFFSETS: Final = {
    "r10": 56, "r9": 64, "r8": 72, "rax": 80, "rcx": 88, "rdx": 96, "rsi": 104, "rdi": 112,
    "orig_rax": 120, "rip": 128, "cs": 136,
}
# The user ip and stack pointer in the same struct: where a held read was issued (its return
# address is at rsp), and the indexes of the u64 regs[] copy of a user stack record.
PT_REGS_IP_SP_OFFSETS: Final = {"rip": 128, "rsp": 152}
# __USER_CS: GDT entry 6 (GDT_ENTRY_DEFAULT_USER_CS), RPL 3. A 32-bit syscall comes from
# __USER32_CS (entry 4) and uses other numbers.
USER64_CS: Final = 6 * 8 + 3


def raw_syscalls_supported() -> bool:
    """The raw syscall probes know this ABI only (elsewhere: the classic tracepoints)."""
    return platform.machine() == "x86_64"


# "raw": raw_syscalls sys_enter/sys_exit (x86-64; far cheaper per syscall), "classic": the
# per-syscall tracepoints (any arch; the benchmark's comparison point).
SYSCALL_PROBE_KINDS: Final = ("raw", "classic")
# Classic by default: raw sys_enter/sys_exit run a program on every syscall of the host, which
# measured here costs every non-KVM syscall far more than it saves per exit (bench/README.md).
DEFAULT_SYSCALL_PROBES: Final = "classic"


def cflags() -> dict[str, int]:
    flags = {f"NR_{name.upper()}": nr for name, nr in SYSCALL_NUMBERS.items()}
    flags["PT_REGS_R10_OFF"] = PT_REGS_OFFSETS["r10"]
    flags["USER64_CS"] = USER64_CS
    return flags
