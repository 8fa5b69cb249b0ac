"""tracer.syscall_abi against the system's x86-64 headers, through the C compiler."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
from cprog import CC, run_c

from tracer import syscall_abi

pytestmark = [
    pytest.mark.skipif(CC is None, reason="no C compiler (cc) on this host"),
    pytest.mark.skipif(platform.machine() != "x86_64", reason="the x86-64 syscall ABI"),
]


def test_syscall_numbers_match_unistd(tmp_path: Path) -> None:
    body = [f'    printf("{n} %d\\n", __NR_{n});' for n in syscall_abi.SYSCALL_NUMBERS]
    assert run_c(tmp_path, body, ["asm/unistd_64.h"]) == syscall_abi.SYSCALL_NUMBERS


def test_pt_regs_offsets_match_ptrace_h(tmp_path: Path) -> None:
    body = [f'    printf("{f} %zu\\n", offsetof(struct pt_regs, {f}));'
            for f in syscall_abi.PT_REGS_OFFSETS]
    assert run_c(tmp_path, body, ["asm/ptrace.h"]) == syscall_abi.PT_REGS_OFFSETS


def test_ip_and_sp_offsets_match_ptrace_h(tmp_path: Path) -> None:
    body = [f'    printf("{f} %zu\\n", offsetof(struct pt_regs, {f}));'
            for f in syscall_abi.PT_REGS_IP_SP_OFFSETS]
    assert run_c(tmp_path, body, ["asm/ptrace.h"]) == syscall_abi.PT_REGS_IP_SP_OFFSETS


def test_the_one_read_covers_r10_to_cs_contiguously() -> None:
    # struct syscall_regs in bpf/completion.c: eleven u64 from r10 up to and including cs.
    offsets = list(syscall_abi.PT_REGS_OFFSETS.values())
    assert offsets == list(range(offsets[0], offsets[0] + 8 * len(offsets), 8))
    source = (Path(__file__).resolve().parents[2] / "bpf" / "completion.c").read_text()
    assert "u64 r10, r9, r8, ax, cx, dx, si, di, orig_ax, ip, cs;" in source


def test_user64_cs_is_the_selector_this_process_runs_with() -> None:
    # A 64-bit process's own CS: what the kernel saves in pt_regs for its syscalls.
    assert syscall_abi.USER64_CS == 0x33
    code = ("unsigned short cs; __asm__(\"mov %%cs, %0\" : \"=r\"(cs)); "
            "printf(\"cs %u\\n\", cs);")
    assert CC is not None
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        got = run_c(Path(tmp), [f"    {code}"], [])
    assert got == {"cs": syscall_abi.USER64_CS}
