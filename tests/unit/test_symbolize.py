"""tracer.symbolize and tracer.elf against real processes.

The fixtures in symbolize_fixtures/ are stand-in VMMs (C, C++, Rust) built into tmp_path at test
time. Each prints a stack the way bpf_get_stack(BPF_F_USER_STACK) would capture it (innermost
first: an address in the current function, then return addresses) and blocks on stdin, so a test
symbolizes it alive, then after it exited, then after its binary was deleted. A fixture /proc is
used only where a real process cannot show the case (a garbage ELF mapped, LRU bounds).
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest

from tracer import elf, symbolize
from tracer.symbolize import StackFrame, Symbolizer, UserStack

FIXTURES = Path(__file__).resolve().parent / "symbolize_fixtures"
RUSTC = shutil.which("rustc") or "/root/.cargo/bin/rustc"


def build_c(tmp_path: Path, *flags: str, name: str = "vmm") -> Path:
    out = tmp_path / name
    subprocess.run(["gcc", "-O0", "-fno-omit-frame-pointer", *flags, str(FIXTURES / "vmm.c"),
                    "-o", str(out)], check=True)
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


# --- C: live, exited, deleted -------------------------------------------------------------------


def test_live_process_frames(tmp_path: Path) -> None:
    binary = build_c(tmp_path)
    with running(str(binary)) as vmm:
        stack = Symbolizer().symbolize(vmm.pid, vmm.frames)  # never remembered: reads live maps
    assert names(stack)[:3] == ["vmm_ioctl_wrapper", "vmm_save_state", "main"]
    first, second = stack.frames[0], stack.frames[1]
    assert first.address == vmm.frames[0]  # the reported address is the original one
    assert first.function_offset == 4  # the innermost frame is not a return address
    assert first.module == str(binary)
    assert first.build_id == readelf_build_id(binary)
    assert second.function_offset is not None and second.function_offset > 0
    # The return into libc's start code: the module is known even where libc has no .symtab.
    libc = stack.frames[3]
    assert libc.module is not None and "libc" in Path(libc.module).name
    assert libc.build_id == readelf_build_id(Path(libc.module))
    # Walked past main into libc: a complete stack, not one cut short by missing frame pointers.
    assert not stack.partial and stack.why_partial is None
    assert first.describe() == (
        f"vmm_ioctl_wrapper+0x4 ({binary}, build-id {readelf_build_id(binary)})")
    json.dumps(stack.to_dict())  # what goes into an alert


def test_file_offset_maps_to_the_symbol(tmp_path: Path) -> None:
    binary = build_c(tmp_path)
    with running(str(binary)) as vmm:
        frame = Symbolizer().symbolize(vmm.pid, vmm.frames[:1]).frames[0]
    nm = subprocess.run(["nm", str(binary)], capture_output=True, text=True, check=True).stdout
    value = int(next(line.split()[0] for line in nm.splitlines()
                     if line.endswith(" vmm_ioctl_wrapper")), 16)
    with binary.open("rb") as f:
        symbols = elf.read_symbols(f)
    assert frame.file_offset is not None
    assert symbols.vaddr_of(frame.file_offset) == value + 4


def test_libc_function(tmp_path: Path) -> None:
    with running(str(build_c(tmp_path))) as vmm:
        frame = Symbolizer().symbolize(vmm.pid, [vmm.values["read"]]).frames[0]
    assert frame.function in {"read", "__read", "__libc_read"}
    assert frame.function_offset == 0


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
        # Without the snapshot nothing names the module, but nothing raises either.
        symbolizer.forget(vmm.pid)
        gone = symbolizer.symbolize(vmm.pid, vmm.frames)
    assert names(alive)[:3] == ["vmm_ioctl_wrapper", "vmm_save_state", "main"]
    assert all(f.module is None and f.function is None for f in gone.frames)
    assert gone.partial


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
    assert [f.function_offset for f in by_id.frames] == [f.function_offset for f in live.frames]


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


def test_one_parse_per_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = build_c(tmp_path)
    parsed: list[str] = []
    real = elf.read_symbols

    def counting(f: BinaryIO) -> elf.ElfSymbols:
        parsed.append(os.path.realpath(f.name))  # map_files/<range> links to the real path
        return real(f)

    monkeypatch.setattr(elf, "read_symbols", counting)
    symbolizer = Symbolizer()
    with running(str(binary)) as a, running(str(binary)) as b:
        symbolizer.remember(a.pid)
        symbolizer.remember(b.pid)
        assert names(symbolizer.symbolize(b.pid, b.frames))[0] == "vmm_ioctl_wrapper"
    assert parsed.count(str(binary)) == 1, parsed


# --- stripped and broken binaries ----------------------------------------------------------------


def test_stripped_binary(tmp_path: Path) -> None:
    binary = build_c(tmp_path)
    subprocess.run(["strip", "--strip-all", str(binary)], check=True)
    with running(str(binary)) as vmm:
        stack = Symbolizer().symbolize(vmm.pid, vmm.frames)
    own = [f for f in stack.frames if f.module == str(binary)]
    assert len(own) == 3
    assert all(f.function is None and f.build_id == readelf_build_id(binary) for f in own)
    assert all(f.file_offset is not None for f in own)  # enough to symbolize offline later
    assert stack.frames[0].describe().startswith("?? (")


def test_stripped_binary_keeps_dynsym(tmp_path: Path) -> None:
    binary = build_c(tmp_path, "-rdynamic")  # exports its functions in .dynsym
    subprocess.run(["strip", "--strip-all", str(binary)], check=True)
    with binary.open("rb") as f:
        assert "vmm_save_state" in elf.read_symbols(f).names
    with running(str(binary)) as vmm:
        stack = Symbolizer().symbolize(vmm.pid, vmm.frames)
    assert names(stack)[:3] == ["vmm_ioctl_wrapper", "vmm_save_state", "main"]


@pytest.mark.parametrize("data", [b"", b"\x7fELF", b"MZ" + b"\0" * 100,
                                  b"\x7fELF\x01\x01" + b"\0" * 58,  # 32-bit
                                  b"\x7fELF\x02\x02" + b"\0" * 58])  # big-endian
def test_not_an_elf64_le(data: bytes) -> None:
    with pytest.raises(elf.ElfError):
        elf.read_symbols(io.BytesIO(data))


def test_truncated_and_corrupt_elf(tmp_path: Path) -> None:
    data = build_c(tmp_path).read_bytes()
    for size in range(0, len(data), 101):  # section headers sit at the end: all truncated
        with pytest.raises(elf.ElfError):
            elf.read_symbols(io.BytesIO(data[:size]))
    rnd = random.Random(7)
    for _ in range(400):  # flipped header/table bytes: a typed error or a result, nothing else
        corrupt = bytearray(data)
        for _ in range(rnd.randint(1, 6)):
            area = rnd.choice([64, 64 + 56 * 13, len(data)])
            pos = rnd.randrange(area) if area != len(data) else len(data) - 1 - rnd.randrange(
                64 * 31)
            corrupt[pos] = rnd.randrange(256)
        with suppress(elf.ElfError):
            elf.read_symbols(io.BytesIO(bytes(corrupt)))
    # A huge offset in a real file: refused before seek/read try to use it.
    big = bytearray(data)
    big[32:40] = (1 << 62).to_bytes(8, "little")  # e_phoff
    path = tmp_path / "huge"
    path.write_bytes(bytes(big))
    with path.open("rb") as f, pytest.raises(elf.ElfError):
        elf.read_symbols(f)


def make_proc(root: Path, pid: int, maps: str) -> None:
    (root / str(pid)).mkdir(parents=True, exist_ok=True)
    (root / str(pid) / "maps").write_text(maps)


def test_garbage_module_gives_no_function(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.so"
    garbage.write_bytes(b"\x7fELF\x02\x01" + os.urandom(200))
    proc = tmp_path / "proc"
    make_proc(proc, 42, f"7f0000000000-7f0000001000 r-xp 00002000 08:01 99 {garbage}\n")
    stack = Symbolizer(proc).symbolize(42, [0x7F0000000010, 0x7F0000000020])
    assert [f.module for f in stack.frames] == [str(garbage)] * 2
    assert [f.file_offset for f in stack.frames] == [0x2010, 0x2020]
    assert names(stack) == [None, None] and stack.partial


def test_unknown_process_and_unmapped_addresses(tmp_path: Path) -> None:
    stack = Symbolizer(tmp_path).symbolize(12345, [0x1000, 0x2000])  # no such pid, ever
    assert stack.frames == (StackFrame(0x1000, None, None, None, None, None),
                            StackFrame(0x2000, None, None, None, None, None))
    assert stack.partial
    empty = Symbolizer(tmp_path).symbolize(12345, [])
    assert empty.partial and empty.why_partial


def test_new_mapping_refreshes_the_snapshot(tmp_path: Path) -> None:
    """An address outside every remembered mapping (a dlopen since) re-reads a live process."""
    binary = build_c(tmp_path)
    proc = tmp_path / "proc"
    make_proc(proc, 7, "")
    symbolizer = Symbolizer(proc)
    symbolizer.remember(7)
    nm = subprocess.run(["nm", str(binary)], capture_output=True, text=True, check=True).stdout
    value = int(next(line.split()[0] for line in nm.splitlines()
                     if line.endswith(" vmm_save_state")), 16)
    # A PIE's text: vaddr == file offset in gcc's layout, mapped with its page offset.
    start, page = 0x555500000000, value & ~0xFFF
    (proc / "7" / "maps").write_text(
        f"{start:x}-{start + 0x1000:x} r-xp {page:08x} 08:01 1 {binary}\n")
    frame = symbolizer.symbolize(7, [start + (value - page)]).frames[0]
    assert frame.function == "vmm_save_state" and frame.function_offset == 0


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
    assert symbolizer.symbolize(1, [0x555500000010]).frames[0].module is None  # evicted
    assert symbolizer.symbolize(3, [0x555500000010]).frames[0].module == str(binary)


def test_partial_stacks() -> None:
    def frame(function: str | None) -> StackFrame:
        return StackFrame(0, "/x", None, 0, function, 0)

    partial = Symbolizer._partial  # the heuristic alone, on made-up walks
    assert partial([frame("ioctl")])[0]
    cut, why = partial([frame("ioctl"), frame("vmm_run_vcpu")])
    assert cut and why is not None and "vmm_run_vcpu" in why and "frame pointer" in why
    assert partial([frame("ioctl"), frame(None)])[0]
    assert partial([frame("a"), frame("main"), frame(None)]) == (False, None)
    assert partial([frame("a"), frame("start_thread"), frame("clone3")]) == (False, None)


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
