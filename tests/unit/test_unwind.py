"""tracer.unwind and the CFI path of tracer.symbolize on real processes: fixtures built here in
several flavours, captured as the probes capture a report (registers and top of stack, by
ptrace(2) here), unwound and symbolized, and compared frame by frame with gdb's backtrace of the
same process at the same point. Plus the pieces on their own: call instructions, the auxiliary
vector, a copy cut short, a forged return address."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from gdb_frames import frames as gdb_frames
from gdb_frames import gdb_path

from tracer.events import UserCapture
from tracer.symbolize import Symbolizer, UserStack
from tracer.unwind import AT_ENTRY, ModuleCFI, auxv_in, follows_call

FIXTURE = Path(__file__).resolve().parent / "symbolize_fixtures" / "blocked.c"
INLINE = "-DINNER_ATTR=static inline __attribute__((always_inline))"
FLAVOURS = {
    "O2-g": ["-O2", "-g"],
    "O0-g": ["-O0", "-g"],
    "O2-fp": ["-O2", "-g", "-fno-omit-frame-pointer"],
    "O2-stripped": ["-O2", "-s"],
    "O2-inlined": ["-O2", "-g", INLINE],
    # no .eh_frame for the program's own code: its CFI is in .debug_frame only
    "O2-debug-frame": ["-O2", "-g", "-fno-asynchronous-unwind-tables", "-fno-unwind-tables"],
}

needs_ptrace = pytest.mark.skipif(os.geteuid() != 0, reason="ptrace of a child needs root here")


# ---- call instructions --------------------------------------------------------------------------

@pytest.mark.parametrize("code", [
    bytes.fromhex("e8 10 20 30 40"),  # call rel32
    bytes.fromhex("ff d0"),  # call rax
    bytes.fromhex("41 ff d3"),  # call r11 (REX.B)
    bytes.fromhex("ff 15 00 10 00 00"),  # call [rip+disp32] (PLT-less calls)
    bytes.fromhex("ff 50 08"),  # call [rax+8]
    bytes.fromhex("ff 14 24"),  # call [rsp] (SIB)
    bytes.fromhex("ff 54 24 08"),  # call [rsp+8]
    bytes.fromhex("ff 94 24 00 01 00 00"),  # call [rsp+0x100]
    bytes.fromhex("ff 90 00 01 00 00"),  # call [rax+0x100]
    bytes.fromhex("ff 14 25 00 10 00 00"),  # call [disp32] (SIB, no base)
])
def test_calls_are_recognised(code: bytes) -> None:
    assert follows_call(b"\x90" * 8 + code)


@pytest.mark.parametrize("code", [
    bytes.fromhex("90 90 90 90 90 90 90"),  # nops
    bytes.fromhex("55 48 89 e5"),  # a function's entry: push rbp; mov rbp, rsp
    bytes.fromhex("ff e0"),  # jmp rax (FF /4): not a call
    bytes.fromhex("ff 20"),  # jmp [rax]
    bytes.fromhex("ff 50"),  # FF /2 [rax+disp8] without its displacement byte
    b"",
])
def test_other_bytes_are_not_calls(code: bytes) -> None:
    assert not follows_call(code)


# ---- the auxiliary vector -----------------------------------------------------------------------

def test_auxv_is_found_above_envp_and_not_in_a_cut_copy() -> None:
    auxv = Path("/proc/self/auxv").read_bytes()
    words = [int.from_bytes(auxv[i:i + 8], "little") for i in range(0, len(auxv), 8)]
    entry = words[words.index(AT_ENTRY) + 1]
    # argc, argv[0], NULL, envp[0], NULL, then the vector: as at the top of a main stack
    top = b"".join(w.to_bytes(8, "little") for w in (1, 0x7FFC0000, 0, 0x7FFC0100, 0))
    stack = os.urandom(512) + top + auxv + b"\0" * 64
    assert auxv_in(stack)[AT_ENTRY] == entry == os.getauxv(AT_ENTRY) if hasattr(
        os, "getauxv") else auxv_in(stack)[AT_ENTRY] == entry
    assert auxv_in(os.urandom(512) + top + auxv[:len(auxv) // 2]) == {}


# ---- real processes -----------------------------------------------------------------------------

def _build(tmp: Path, name: str, flags: list[str]) -> Path:
    cc = shutil.which("gcc")
    if cc is None:
        pytest.skip("gcc is not installed")
    out = tmp / f"blocked-{name}"
    subprocess.run([cc, *flags, "-pthread", "-o", str(out), str(FIXTURE)], check=True,
                   timeout=120)
    return out


@contextmanager
def _blocked(binary: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([str(binary), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _blocked_tid(proc: subprocess.Popen[str], thread: bool) -> int:
    """The thread blocked in read(0): the only thread besides main with --thread."""
    tid = proc.pid
    if thread:
        tid = next(t for t in sorted(int(t) for t in os.listdir(f"/proc/{proc.pid}/task"))
                   if t != proc.pid)
    # "ready" is printed just before read(): wait until the thread is inside it (syscall 0),
    # so the capture is at the syscall as the probes' is.
    deadline = time.monotonic() + 10
    while Path(f"/proc/{proc.pid}/task/{tid}/syscall").read_text().split()[0] != "0":
        assert time.monotonic() < deadline, "the fixture never blocked in read()"
        time.sleep(0.01)
    return tid


def _key(frame: dict[str, Any]) -> tuple[str, int, bool]:
    return (os.path.basename(frame["module"] or "?"), frame["file_offset"],
            bool(frame["inlined"]))


def _capture_and_gdb(binary: Path, tmp: Path, thread: bool
                     ) -> tuple[UserStack, list[dict[str, Any]]]:
    from ptrace_capture import capture

    with _blocked(binary, *(["--thread"] if thread else [])) as proc:
        tid = _blocked_tid(proc, thread)
        got = capture(tid)
        stack = Symbolizer().symbolize(proc.pid, [], got)
        reference = gdb_frames(["-p", str(tid)], tmp)
    return stack, reference


@needs_ptrace
@pytest.mark.parametrize("thread", [False, True], ids=["main", "thread"])
@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_cfi_stack_is_gdbs_backtrace(tmp_path: Path, flavour: str, thread: bool) -> None:
    if gdb_path() is None:
        pytest.skip("gdb is not installed (scripts/setup-host.sh test installs it)")
    binary = _build(tmp_path, flavour, FLAVOURS[flavour])
    stack, reference = _capture_and_gdb(binary, tmp_path, thread)
    frames = [f.to_dict() for f in stack.frames]
    assert stack.method == "cfi"
    assert stack.complete and stack.why_partial is None, stack
    # Frame for frame what gdb shows: module, file offset and inlining (gdb's frame 0 is the
    # syscall's return point in libc's read, as the probes' rip is).
    assert [_key(f) for f in frames] == [_key(g) for g in reference], (frames, reference)
    mine = [f for f in frames if f["module"] and os.path.samefile(f["module"], binary)]
    calls = [f for f in mine if f["function"] == "save_vcpu_state"]
    if flavour == "O2-stripped":  # no names: module+offset, the offsets gdb has too
        assert not any(f["function"] for f in mine) and len(mine) >= 3
        return
    assert len(calls) == 3  # the recursion: every level
    gdb_lines = [g["line"] for g in reference if g["function"] == "save_vcpu_state"]
    assert [f["line"] for f in calls] == gdb_lines
    assert all(f["file"] and f["file"].endswith("blocked.c") and f["column"] for f in calls)
    waiting = next(f for f in frames if f["function"] == "wait_for_stdin")
    assert waiting["inlined"] is (flavour == "O2-inlined")
    assert waiting["file"].endswith("blocked.c") and waiting["line"]
    if thread:  # ends in libc's thread start, named only where libc's symbols are installed
        assert os.path.basename(frames[-1]["module"]).startswith("libc"), frames
        assert frames[-1]["function"] in (None, "clone3", "__clone3", "__GI___clone3", "clone",
                                          "start_thread"), frames
    else:
        assert any(f["function"] == "main" for f in frames), frames


@needs_ptrace
def test_a_copy_cut_short_ends_the_stack_with_the_reason(tmp_path: Path) -> None:
    from ptrace_capture import capture

    binary = _build(tmp_path, "O2-g", FLAVOURS["O2-g"])
    with _blocked(binary) as proc:
        got = capture(_blocked_tid(proc, False))
        full = Symbolizer().symbolize(proc.pid, [], got)
        cut = Symbolizer().symbolize(proc.pid, [], replace(got, stack=got.stack[:48]))
    assert full.complete and len(cut.frames) < len(full.frames)
    assert not cut.complete and cut.why_partial and "stack copy" in cut.why_partial
    assert [f.file_offset for f in cut.frames] == [
        f.file_offset for f in full.frames[:len(cut.frames)]]


@needs_ptrace
def test_a_return_address_not_after_a_call_is_never_a_frame(tmp_path: Path) -> None:
    from ptrace_capture import capture

    binary = _build(tmp_path, "O2-g", FLAVOURS["O2-g"])
    with _blocked(binary) as proc:
        got = capture(_blocked_tid(proc, False))
        full = Symbolizer().symbolize(proc.pid, [], got)
        # Overwrite the first return address in the copy with an address in save_vcpu_state
        # with no call before it (mapped, executable). Not always its entry: gcc 14 may put a
        # call to a noreturn function right before it.
        ret = next(i for i, f in enumerate(full.frames)
                   if i and f.module and os.path.samefile(f.module, binary))
        first_ret = full.frames[ret].address
        mod = ModuleCFI.open(str(binary))
        vaddr = mod.vaddr_of(full.frames[ret].file_offset or 0)
        assert vaddr is not None
        bias = first_ret - vaddr
        start = vaddr - (full.frames[ret].function_offset or 0)
        entry = bias + next(v for v in range(start, start + 64)
                            if not follows_call(mod.code_before(v, 7)))
        at = got.stack.index(first_ret.to_bytes(8, "little"))
        forged = got.stack[:at] + entry.to_bytes(8, "little") + got.stack[at + 8:]
        bad = Symbolizer().symbolize(proc.pid, [], UserCapture(got.regs, forged))
        # And a return address in no mapping at all.
        wild = got.stack[:at] + (0x10B0008FFFFFFFF).to_bytes(8, "little") + got.stack[at + 8:]
        lost = Symbolizer().symbolize(proc.pid, [], UserCapture(got.regs, wild))
    before = [f.address for f in full.frames[:ret]]  # libc's, up to the program's first frame
    assert [f.address for f in bad.frames] == before
    assert not bad.complete and "does not follow a call" in (bad.why_partial or "")
    assert [f.address for f in lost.frames] == before
    assert not lost.complete and "no executable mapping" in (lost.why_partial or "")


@needs_ptrace
def test_a_process_gone_before_its_maps_were_read_unwinds_from_the_capture(
        tmp_path: Path) -> None:
    """What a test VMM that lives 5 ms gives: no /proc/PID. The kernel's walk names the module of
    rip (libc, by build-id); the auxiliary vector in the copy places the executable the process
    exec'd; the stack is the same as with the process alive."""
    from ptrace_capture import capture

    binary = _build(tmp_path, "O2-g", FLAVOURS["O2-g"])
    with _blocked(binary) as proc:
        got = capture(_blocked_tid(proc, False))
        alive = Symbolizer().symbolize(proc.pid, [], got)
        libc = alive.frames[0]
    assert libc.build_id and libc.file_offset is not None and alive.complete
    gone = tmp_path / "proc"  # a /proc where the VMM is gone; this process's own maps remain
    (gone / str(os.getpid())).mkdir(parents=True)
    (gone / str(os.getpid()) / "maps").write_text(Path("/proc/self/maps").read_text())
    symbolizer = Symbolizer(gone)
    symbolizer.index_binary(proc.pid, str(binary))  # what the EXEC event does (watch)
    stack = symbolizer.symbolize(proc.pid, [(libc.build_id, libc.file_offset)], got)
    assert stack.method == "cfi" and stack.complete
    assert [(f.file_offset, f.function) for f in stack.frames] == [
        (f.file_offset, f.function) for f in alive.frames]
    # A later report of the same process whose kernel walk is missing (its bucket in the stack
    # map was taken): the modules earlier captures placed still place its frames.
    again = symbolizer.symbolize(proc.pid, [], got)
    assert again.complete and [f.file_offset for f in again.frames] == [
        f.file_offset for f in alive.frames]
    symbolizer.forget(proc.pid)  # the process is gone from the tracker: so are its placements
    assert not symbolizer.symbolize(proc.pid, [], got).complete
    # Without the executable known, the stack stops where its frames begin, and says so.
    blind = Symbolizer(gone).symbolize(proc.pid, [(libc.build_id, libc.file_offset)], got)
    assert not blind.complete and len(blind.frames) < len(alive.frames)
    assert "no executable mapping" in (blind.why_partial or "")
    # Another binary under the name it exec'd (rebuilt since, or a relative name resolved in
    # another directory): none of its frames is printed (its entry is not where AT_ENTRY says,
    # or the return addresses do not follow a call in it).
    other = _build(tmp_path, "O0-g", FLAVOURS["O0-g"])
    wrong = Symbolizer(gone)
    wrong.index_binary(proc.pid, str(other))
    misled = wrong.symbolize(proc.pid, [(libc.build_id, libc.file_offset)], got)
    assert [(f.module, f.file_offset) for f in misled.frames] == [
        (f.module, f.file_offset) for f in blind.frames]


@needs_ptrace
def test_a_corrupt_eh_frame_ends_the_stack_and_never_raises(tmp_path: Path) -> None:
    from elftools.elf.elffile import ELFFile
    from ptrace_capture import capture

    binary = _build(tmp_path, "O2-g", FLAVOURS["O2-g"])
    with binary.open("rb") as f:
        eh = ELFFile(f).get_section_by_name(".eh_frame")
        assert eh is not None
        offset, size = eh["sh_offset"], eh["sh_size"]
    data = bytearray(binary.read_bytes())
    data[offset:offset + size] = b"\xff" * size  # every CIE/FDE length and id garbage
    binary.write_bytes(bytes(data))
    with _blocked(binary) as proc:
        got = capture(_blocked_tid(proc, False))
        stack = Symbolizer().symbolize(proc.pid, [], got)
    assert not stack.complete and stack.why_partial
    assert [os.path.basename(f.module or "") for f in stack.frames][:1] == ["libc.so.6"]
    assert all(os.path.basename(f.module or "") != binary.name or f is stack.frames[-1]
               for f in stack.frames)
