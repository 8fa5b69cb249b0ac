"""tracer.symbolize against real processes: the frame-pointer path (the kernel's walk, the
fallback when no registers and stack were captured), names from llvm-symbolizer (C, C++, Rust,
file:line, inlined frames), where debug info is found, and how a stack is printed. The CFI path
is tests/unit/test_unwind.py.

The fixtures in symbolize_fixtures/ are stand-in VMMs (C, C++, Rust) built into tmp_path at test
time. Each prints a stack the way bpf_get_stack(BPF_F_USER_STACK) would capture it (innermost
first: an address in the current function, then return addresses) and blocks on stdin, so a test
symbolizes it alive, then after it exited, then after its binary was deleted. A fixture /proc is
used only where a real process cannot show the case (a garbage ELF mapped, LRU bounds).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tracer import symbolize
from tracer.symbolize import DebugFiles, Symbolizer, UserStack, frame_text, rust_name, stack_lines

FIXTURES = Path(__file__).resolve().parent / "symbolize_fixtures"
RUSTC = shutil.which("rustc") or "/root/.cargo/bin/rustc"


def build_c(tmp_path: Path, *flags: str, name: str = "vmm") -> Path:
    out = tmp_path / name
    subprocess.run(["gcc", "-O0", "-g", "-fno-omit-frame-pointer", *flags,
                    str(FIXTURES / "vmm.c"), "-o", str(out)], check=True)
    return out


def readelf_build_id(path: Path) -> str:
    text = subprocess.run(["readelf", "-n", str(path)], capture_output=True, text=True,
                          check=True).stdout
    m = re.search(r"Build ID: ([0-9a-f]+)", text)
    assert m, text
    return m[1]


@dataclass
class Vmm:
    proc: subprocess.Popen[str]
    frames: list[int]  # "frame 0x..." lines, innermost first
    values: dict[str, int]  # every other "key 0x..." line

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exit(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=10) == 0


@contextmanager
def running(*argv: str) -> Iterator[Vmm]:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        vmm = Vmm(proc, [], {})
        assert proc.stdout is not None
        for line in proc.stdout:
            key, _, value = line.strip().partition(" ")
            if key == "ready":
                break
            if key == "frame":
                vmm.frames.append(int(value, 16))
            else:
                vmm.values[key] = int(value, 16)
        else:
            pytest.fail(f"{argv[0]} exited before it was ready")
        yield vmm
    finally:
        proc.kill()
        proc.wait()


def names(stack: UserStack) -> list[str | None]:
    return [f.function for f in stack.frames]


# --- C: live, exited, deleted (the kernel's frame-pointer walk) ---------------------------------


def test_live_process_frames(tmp_path: Path) -> None:
    binary = build_c(tmp_path)
    with running(str(binary)) as vmm:
        stack = Symbolizer().symbolize(vmm.pid, vmm.frames)  # never remembered: reads live maps
    assert stack.method == "frame-pointer"
    assert names(stack)[:3] == ["vmm_ioctl_wrapper", "vmm_save_state", "main"]
    first, second = stack.frames[0], stack.frames[1]
    assert first.address == vmm.frames[0]  # the reported address is the original one
    assert first.function_offset == 4  # the innermost frame is not a return address
    assert first.module == str(binary)
    assert first.build_id == readelf_build_id(binary)
    assert first.file and first.file.endswith("vmm.c") and first.column
    assert second.file and second.line and second.line != first.line
    # The return into libc's start code: the module is known, and a libc frame is no wrong
    # frame (it follows a call), but the walk stops past it: not complete.
    libc = stack.frames[3]
    assert libc.module is not None and "libc" in Path(libc.module).name
    assert libc.build_id == readelf_build_id(Path(libc.module))
    json.dumps(stack.to_dict())  # what goes into an alert


def test_after_exit_and_after_deletion(tmp_path: Path) -> None:
    binary = build_c(tmp_path)
    symbolizer = Symbolizer()
    with running(str(binary)) as vmm:
        symbolizer.remember(vmm.pid)  # what the daemon does at the first vCPU
        alive = symbolizer.symbolize(vmm.pid, vmm.frames)
        vmm.exit()
        assert not Path(f"/proc/{vmm.pid}").exists()
        assert symbolizer.symbolize(vmm.pid, vmm.frames) == alive
        binary.unlink()
        assert symbolizer.symbolize(vmm.pid, vmm.frames) == alive
        # Without the snapshot nothing names the module: no frame, and the reason.
        symbolizer.forget(vmm.pid)
        gone = symbolizer.symbolize(vmm.pid, vmm.frames)
    assert names(alive)[:3] == ["vmm_ioctl_wrapper", "vmm_save_state", "main"]
    assert gone.frames == () and not gone.complete
    assert gone.why_partial and "no executable mapping" in gone.why_partial


def test_kernel_build_id_frames_after_exit(tmp_path: Path) -> None:
    """The probes' other form: (build-id, file offset), as BPF_F_STACK_BUILD_ID gives it."""
    binary = build_c(tmp_path)
    symbolizer = Symbolizer()
    with running(str(binary)) as vmm:
        live = symbolizer.symbolize(vmm.pid, vmm.frames)
        vmm.exit()
    raw = [(f.build_id, f.file_offset) for f in live.frames]
    assert all(b is not None and o is not None for b, o in raw)
    by_id = symbolizer.symbolize(vmm.pid, raw)  # type: ignore[arg-type]
    assert names(by_id) == names(live)
    assert [(f.file, f.line) for f in by_id.frames] == [(f.file, f.line) for f in live.frames]


def test_binary_deleted_while_running_reads_map_files(tmp_path: Path) -> None:
    binary = build_c(tmp_path)
    with running(str(binary)) as vmm:
        binary.unlink()  # /proc/PID/maps now says "... (deleted)"; map_files still opens it
        stack = Symbolizer().symbolize(vmm.pid, vmm.frames)
    assert names(stack)[:3] == ["vmm_ioctl_wrapper", "vmm_save_state", "main"]
    assert stack.frames[0].module == str(binary)


def test_non_pie(tmp_path: Path) -> None:
    binary = build_c(tmp_path, "-no-pie")
    with running(str(binary)) as vmm:
        stack = Symbolizer().symbolize(vmm.pid, vmm.frames)
    assert vmm.frames[0] < 0x1000000  # linked at its vaddr (0x400000), not relocated
    assert names(stack)[:3] == ["vmm_ioctl_wrapper", "vmm_save_state", "main"]


def test_one_open_per_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = build_c(tmp_path)
    opened: list[str] = []
    real = symbolize.ModuleCFI.open

    def counting(path: str) -> symbolize.ModuleCFI:
        opened.append(os.path.realpath(path))  # map_files/<range> links to the real path
        return real(path)

    monkeypatch.setattr(symbolize.ModuleCFI, "open", counting)
    symbolizer = Symbolizer()
    with running(str(binary)) as a, running(str(binary)) as b:
        symbolizer.remember(a.pid)
        symbolizer.remember(b.pid)
        assert names(symbolizer.symbolize(b.pid, b.frames))[0] == "vmm_ioctl_wrapper"
    assert opened.count(str(binary)) == 1, opened


# --- stripped binaries, frames that are not ---------------------------------------------------


def test_stripped_binary(tmp_path: Path) -> None:
    binary = build_c(tmp_path)
    subprocess.run(["strip", "--strip-all", str(binary)], check=True)
    with running(str(binary)) as vmm:
        stack = Symbolizer().symbolize(vmm.pid, vmm.frames)
    own = [f for f in stack.frames if f.module == str(binary)]
    assert len(own) == 3
    assert all(f.function is None and f.build_id == readelf_build_id(binary) for f in own)
    assert all(f.file_offset is not None for f in own)  # enough to symbolize offline later
    assert frame_text(stack.frames[0].to_dict()) == (
        f"{vmm.frames[0]:#x} ({binary.name}+{own[0].file_offset:#x})")


def test_stripped_binary_keeps_dynsym(tmp_path: Path) -> None:
    binary = build_c(tmp_path, "-rdynamic")  # exports its functions in .dynsym
    subprocess.run(["strip", "--strip-all", str(binary)], check=True)
    with running(str(binary)) as vmm:
        stack = Symbolizer().symbolize(vmm.pid, vmm.frames)
    assert names(stack)[:3] == ["vmm_ioctl_wrapper", "vmm_save_state", "main"]
    assert stack.frames[1].function_offset and not stack.frames[1].line


def test_a_walk_into_garbage_stops_before_it(tmp_path: Path) -> None:
    """What a frame-pointer walk through a function without frame pointers gives: whatever rbp
    held. Never printed as a frame: not in a mapping, or not after a call."""
    binary = build_c(tmp_path)
    with running(str(binary)) as vmm:
        symbolizer = Symbolizer()
        wild = symbolizer.symbolize(vmm.pid, [vmm.frames[0], 0x10B0008FFFFFFFF])
        entry = symbolizer.symbolize(vmm.pid, [vmm.frames[0], vmm.values["entry"]])
    assert len(wild.frames) == 1 and not wild.complete
    assert "no executable mapping" in (wild.why_partial or "")
    assert len(entry.frames) == 1 and "does not follow a call" in (entry.why_partial or "")


def make_proc(root: Path, pid: int, maps: str) -> None:
    (root / str(pid)).mkdir(parents=True, exist_ok=True)
    (root / str(pid) / "maps").write_text(maps)


def test_garbage_module_gives_no_frame(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.so"
    garbage.write_bytes(b"\x7fELF\x02\x01" + os.urandom(200))
    proc = tmp_path / "proc"
    make_proc(proc, 42, f"7f0000000000-7f0000001000 r-xp 00002000 08:01 99 {garbage}\n")
    stack = Symbolizer(proc).symbolize(42, [0x7F0000000010, 0x7F0000000020])
    assert stack.frames == () and not stack.complete


def test_unknown_process_and_nothing_captured(tmp_path: Path) -> None:
    stack = Symbolizer(tmp_path).symbolize(12345, [0x1000, 0x2000])  # no such pid, ever
    assert stack.frames == () and not stack.complete and stack.why_partial
    empty = Symbolizer(tmp_path).symbolize(12345, [])
    assert empty.method == "none" and not empty.complete and empty.why_partial
    assert stack_lines(empty.to_dict()) == ["  stack: not captured (no stack was captured)"]
    # Captured, but its first address in no module known: said so, not "not captured".
    unplaced = UserStack((), "cfi", False, "0x7f00 is in no executable mapping of the process",
                         copied_bytes=4096)
    assert stack_lines(unplaced.to_dict()) == [
        "  stack: captured (4096 bytes) but not unwound (0x7f00 is in no executable mapping "
        "of the process)"]


def test_process_snapshots_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(symbolize, "MAX_PROCESSES", 2)
    binary = build_c(tmp_path)
    proc = tmp_path / "proc"
    line = f"555500000000-555500001000 r-xp 00001000 08:01 1 {binary}\n"
    symbolizer = Symbolizer(proc)
    for pid in (1, 2, 3):
        make_proc(proc, pid, line)
        symbolizer.remember(pid)
    shutil.rmtree(proc)  # all gone: only the snapshots remain
    assert symbolizer.symbolize(1, [0x555500000010]).frames == ()  # evicted
    assert symbolizer.symbolize(3, [0x555500000010]).frames[0].module == str(binary)


# --- where debug info comes from ------------------------------------------------------------------


def _split_debug(binary: Path, debug: Path) -> None:
    subprocess.run(["objcopy", "--only-keep-debug", str(binary), str(debug)], check=True)
    subprocess.run(["objcopy", "--strip-debug", str(binary)], check=True)


def test_debug_file_by_build_id_directory(tmp_path: Path) -> None:
    binary = build_c(tmp_path)
    bid = readelf_build_id(binary)
    root = tmp_path / "debug"
    (root / ".build-id" / bid[:2]).mkdir(parents=True)
    _split_debug(binary, root / ".build-id" / bid[:2] / f"{bid[2:]}.debug")
    with running(str(binary)) as vmm:
        without = Symbolizer(debug_files=DebugFiles(tmp_path / "none")).symbolize(
            vmm.pid, vmm.frames)
        found = Symbolizer(debug_files=DebugFiles(root)).symbolize(vmm.pid, vmm.frames)
    assert without.frames[0].function == "vmm_ioctl_wrapper" and without.frames[0].line is None
    assert found.frames[0].file and found.frames[0].file.endswith("vmm.c")
    assert found.frames[0].line


def test_debug_file_by_gnu_debuglink(tmp_path: Path) -> None:
    binary = build_c(tmp_path)
    (tmp_path / ".debug").mkdir()
    debug = tmp_path / ".debug" / "vmm.dbg"
    _split_debug(binary, debug)
    subprocess.run(["objcopy", f"--add-gnu-debuglink={debug}", str(binary)], check=True,
                   cwd=tmp_path)
    with running(str(binary)) as vmm:
        stack = Symbolizer(debug_files=DebugFiles(tmp_path / "none")).symbolize(
            vmm.pid, vmm.frames)
    assert stack.frames[0].file and stack.frames[0].file.endswith("vmm.c")


# --- printing -------------------------------------------------------------------------------------


def test_frames_print_as_asan_does() -> None:
    inlined = {"address": 0x55D0, "module": "/usr/bin/vmm", "build_id": "ab", "file_offset": 0x15D0,
               "function": "save_vcpu_state", "function_offset": None, "file": "src/vcpu.c",
               "line": 119, "column": 9, "inlined": True}
    caller = dict(inlined, function="vmm_run", line=137, column=13, inlined=False)
    bare = dict(inlined, function="kvm_vcpu_ioctl", function_offset=0x67, file=None, line=None,
                column=None, inlined=False)
    none = dict(bare, function=None, function_offset=None, module=None, file_offset=None)
    assert frame_text(inlined) == ("0x55d0 in save_vcpu_state src/vcpu.c:119:9 (vmm+0x15d0) "
                                   "[inlined]")
    assert frame_text(caller) == "0x55d0 in vmm_run src/vcpu.c:137:13 (vmm+0x15d0)"
    assert frame_text(bare) == "0x55d0 in kvm_vcpu_ioctl+0x67 (vmm+0x15d0)"
    assert frame_text(none) == "0x55d0 (unknown module)"
    lines = stack_lines({"frames": [inlined, caller], "method": "cfi", "complete": True})
    assert lines == ["  stack (cfi):", f"    #0 {frame_text(inlined)}",
                     f"    #1 {frame_text(caller)}"]
    cut = stack_lines({"frames": [bare], "method": "frame-pointer", "complete": False,
                       "why_partial": "the frame-pointer walk left the mappings"})
    assert cut[0] == ("  stack (frame-pointer, incomplete: the frame-pointer walk left the "
                      "mappings):")


@pytest.mark.parametrize(("raw", "shown"), [
    ("buggy_vmm::save_vcpu_state::h1684c1ab45a3a335", "buggy_vmm::save_vcpu_state"),
    ("std::rt::lang_start::_$u7b$$u7b$closure$u7d$$u7d$::h0123456789abcdef",
     "std::rt::lang_start::{{closure}}"),
    ("_$LT$T$u20$as$u20$core..fmt..Debug$GT$::fmt::h0123456789abcdef",
     "<T as core::fmt::Debug>::fmt"),
    ("__libc_start_main@GLIBC_2.2.5", "__libc_start_main"),
    ("ns::Class::method(int)", "ns::Class::method(int)"),
])
def test_names_as_a_person_reads_them(raw: str, shown: str) -> None:
    assert rust_name(raw) == shown


# --- C++ and Rust ---------------------------------------------------------------------------------


def test_cpp_method(tmp_path: Path) -> None:
    binary = tmp_path / "vmm-cpp"
    subprocess.run(["g++", "-O0", "-fno-omit-frame-pointer", str(FIXTURES / "vmm.cpp"), "-o",
                    str(binary)], check=True)
    with running(str(binary)) as vmm:
        # A return address, so not the first frame: looked up at address - 1.
        stack = Symbolizer().symbolize(vmm.pid, [vmm.frames[0], vmm.frames[0]])
    assert stack.frames[1].function == "ns::Class::method(int)"


@pytest.mark.parametrize("mangling", ["v0", "legacy"])
def test_rust_functions(tmp_path: Path, mangling: str) -> None:
    binary = tmp_path / "vmm-rs"
    # Stable rustc accepts only v0 for -C symbol-mangling-version; legacy is the default.
    flags = ["-C", "symbol-mangling-version=v0"] if mangling == "v0" else []
    subprocess.run([RUSTC, "--crate-name", "vmmtest", "-C", "force-frame-pointers=yes", "-C",
                    "opt-level=0", *flags, str(FIXTURES / "vmm.rs"), "-o", str(binary)],
                   check=True)
    with running(str(binary)) as vmm:
        symbolizer = Symbolizer()
        # A function's own address, then a return address into it (looked up at address - 1).
        stack = symbolizer.symbolize(vmm.pid, [vmm.values["fn"], vmm.frames[0]])
        generic = symbolizer.symbolize(vmm.pid, [vmm.values["generic"]]).frames[0]
    assert names(stack) == ["vmmtest::vmm::save_vcpu_state", "vmmtest::vmm::save_vcpu_state"]
    assert stack.frames[0].function_offset == 0
    assert generic.function == ("<vmmtest::vmm::Vcpu>::save_state::<u32>" if mangling == "v0"
                                else "vmmtest::vmm::Vcpu::save_state")
