"""What the probes capture at a report, taken from a live process with ptrace(2) instead: the
registers it saved entering the kernel (struct user_regs_struct, <sys/user.h>: the UAPI
pt_regs fields first, in the same order) and the top of its stack from /proc/PID/mem, in the
same 512-byte pieces as bpf/completion.c. For unit tests of the unwinder on real processes
(no bcc, no KVM). Root (or CAP_SYS_PTRACE) only."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from tracer.events import PT_REGS, USTACK_BYTES, USTACK_CHUNK, UserCapture

PTRACE_GETREGS = 12
PTRACE_ATTACH = 16
PTRACE_DETACH = 17
USER_REGS_WORDS = 27  # struct user_regs_struct on x86-64: pt_regs' 21, then fs/gs bases, segs

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long


def _ptrace(request: int, pid: int, data: ctypes.c_void_p | None = None) -> None:
    if _libc.ptrace(request, pid, None, data) == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"ptrace({request}, {pid}): {os.strerror(err)}")


def capture(pid: int, size: int = USTACK_BYTES) -> UserCapture:
    """Stop ``pid`` (a process blocked in a system call), read its registers and stack, and let
    it go on."""
    _ptrace(PTRACE_ATTACH, pid)
    try:
        os.waitpid(pid, 0)
        regs = (ctypes.c_ulonglong * USER_REGS_WORDS)()
        _ptrace(PTRACE_GETREGS, pid, ctypes.cast(regs, ctypes.c_void_p))
        named = dict(zip(PT_REGS, list(regs)[:len(PT_REGS)], strict=True))
        stack = b""
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            while len(stack) < size:
                try:
                    mem.seek(named["rsp"] + len(stack))
                    chunk = mem.read(USTACK_CHUNK)
                except OSError:
                    break
                if len(chunk) != USTACK_CHUNK:
                    break
                stack += chunk
        return UserCapture(named, stack)
    finally:
        _ptrace(PTRACE_DETACH, pid)
