"""User stacks of offending ioctls, symbolized: function+offset, module path, build-id.

The probes hand over return addresses (a frame-pointer walk by the kernel). A test VMM often
exits milliseconds after its violation, before Python reads the event, so the process's
executable mappings are remembered while it surely lives (its first vCPU), and every module is
parsed once and kept by build-id (or by file identity): a stack of a process that is gone, or of
a binary deleted since, still resolves.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from tracer import demangle, elf

MAX_PROCESSES: Final = 4096  # remembered mappings (LRU)
MAX_MODULES: Final = 64  # parsed ELF files (LRU)
# Where a frame-pointer walk normally ends: anything else as the last frame means it stopped
# early (a function built without frame pointers).
OUTERMOST: Final = frozenset({"_start", "__libc_start_main", "__libc_start_call_main",
                              "start_thread", "clone", "clone3", "thread_start", "main",
                              "__clone", "__clone3", "std::rt::lang_start_internal"})
# A build-id frame's file offset at or above this is negative: the kernel resolves a frame by
# the first mapping ending above its address without checking that it starts below it, so an
# address in no mapping (a walk through a frame that kept no frame pointer) comes out as an
# offset before the start of the next module's file.
UNMAPPED_OFFSET: Final = 1 << 63
# Syscall wrappers that keep no frame: their caller is missing from a frame-pointer walk.
LEAF_WRAPPERS: Final = frozenset({"ioctl", "__ioctl", "__GI___ioctl", "syscall"})
NO_FP_HINT: Final = ("binaries built without frame pointers give only the frames the kernel "
                     "could unwind (build with -fno-omit-frame-pointer, or Rust "
                     "-C force-frame-pointers=yes)")


@dataclass(frozen=True)
class StackFrame:
    address: int
    module: str | None
    build_id: str | None
    file_offset: int | None
    function: str | None
    function_offset: int | None
    # Not in the walk: the caller of a frameless syscall wrapper (libc's ioctl keeps no frame,
    # so a frame-pointer walk skips the function that called it), read back from the call
    # instruction before the next frame's return address.
    inferred: bool = False

    def describe(self) -> str:
        what = self.function or "??"
        if self.function and self.function_offset:
            what += f"+{self.function_offset:#x}"
        where = self.module or "?"
        if self.build_id:
            where += f", build-id {self.build_id}"
        return f"{what} ({where})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class UserStack:
    frames: tuple[StackFrame, ...]
    partial: bool
    why_partial: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"frames": [f.to_dict() for f in self.frames], "partial": self.partial,
                "why_partial": self.why_partial}


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    offset: int
    path: str
    inode: int


def read_maps(pid: int, proc_root: Path = Path("/proc")) -> list[Mapping]:
    """The executable file mappings of ``pid`` (empty when it is gone or unreadable)."""
    out = []
    try:
        text = (proc_root / str(pid) / "maps").read_text(errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or "x" not in parts[1] or not parts[5].startswith("/"):
            continue
        start, _, end = parts[0].partition("-")
        with contextlib.suppress(ValueError):
            out.append(Mapping(int(start, 16), int(end, 16), int(parts[2], 16),
                               parts[5].removesuffix(" (deleted)"), int(parts[4])))
    return out


# One frame as the probes give it: (build-id hex, file offset) when the kernel resolved the
# module (BPF_F_STACK_BUILD_ID), else (None, the raw address).
RawFrame = tuple[str | None, int]
DEBUG_ROOT: Final = Path("/usr/lib/debug/.build-id")
OWN_LIBRARIES: Final = ("libc.so", "libc-", "ld-linux", "libstdc++", "libgcc_s", "libm.so",
                        "libpthread", "libdl")


class Symbolizer:
    def __init__(self, proc_root: Path = Path("/proc")) -> None:
        self.proc_root = proc_root
        self._maps: OrderedDict[int, list[Mapping]] = OrderedDict()
        # file identity (path, inode) -> parsed symbols; None: not readable as ELF
        self._modules: OrderedDict[tuple[str, int], elf.ElfSymbols | None] = OrderedDict()
        # build-id -> (path, symbols): how a frame of a process long gone still resolves
        self._by_build_id: OrderedDict[str, tuple[str, elf.ElfSymbols]] = OrderedDict()
        self._own_indexed = False

    def remember(self, pid: int) -> None:
        """Snapshot ``pid``'s executable mappings and index their modules by build-id."""
        maps = read_maps(pid, self.proc_root)
        if not maps:
            return
        self._maps[pid] = maps
        self._maps.move_to_end(pid)
        while len(self._maps) > MAX_PROCESSES:
            self._maps.popitem(last=False)
        for m in maps:  # parse while the files are surely reachable
            self._module(pid, m)

    def index_file(self, path: Path) -> None:
        """Index one file by its build-id (a debug file, a binary about to run)."""
        self._index_path(path, str(path))

    def index_binary(self, pid: int, path: str) -> None:
        """A binary ``pid`` exec'd (by the name given to execve): through the process while it
        lives (its exe, cwd and root), else as we see the path."""
        proc = self.proc_root / str(pid)
        for candidate in (proc / "exe", proc / "cwd" / path, proc / "root" / path.lstrip("/"),
                          Path(path)):
            if self._index_path(candidate, path):
                return

    def _index_path(self, candidate: Path, name: str) -> bool:
        try:
            st = candidate.stat()
            with candidate.open("rb") as f:
                symbols = elf.read_symbols(f)
        except (OSError, elf.ElfError):
            return False
        self._modules[(name, st.st_ino)] = symbols
        self._index(name, symbols)
        return True

    def _index_own_libraries(self) -> None:
        """The system libraries this process maps too (libc, the loader, libstdc++, ...): the
        same files as a VMM's, found without the VMM's /proc."""
        self._own_indexed = True
        for m in read_maps(os.getpid(), self.proc_root):
            if Path(m.path).name.startswith(OWN_LIBRARIES):
                self._module(os.getpid(), m)

    def forget(self, pid: int) -> None:
        self._maps.pop(pid, None)

    def _index(self, path: str, symbols: elf.ElfSymbols | None) -> None:
        if symbols is not None and symbols.build_id:
            self._by_build_id[symbols.build_id] = (path, symbols)
            self._by_build_id.move_to_end(symbols.build_id)
            while len(self._by_build_id) > MAX_MODULES:
                self._by_build_id.popitem(last=False)

    def _module(self, pid: int, m: Mapping) -> elf.ElfSymbols | None:
        key = (m.path, m.inode)
        if key in self._modules:
            self._modules.move_to_end(key)
            return self._modules[key]
        symbols = None
        # map_files works for deleted files and other mount namespaces; then the process's
        # root; then the path as we see it.
        for candidate in (self.proc_root / str(pid) / "map_files" / f"{m.start:x}-{m.end:x}",
                          self.proc_root / str(pid) / "root" / m.path.lstrip("/"),
                          Path(m.path)):
            try:
                with candidate.open("rb") as f:
                    symbols = elf.read_symbols(f)
                break
            except (OSError, elf.ElfError):
                continue
        self._modules[key] = symbols
        while len(self._modules) > MAX_MODULES:
            self._modules.popitem(last=False)
        self._index(m.path, symbols)
        return symbols

    def _by_id(self, pid: int, build_id: str) -> tuple[str, elf.ElfSymbols] | None:
        hit = self._by_build_id.get(build_id)
        if hit is None and os.path.exists(self.proc_root / str(pid)):
            self.remember(pid)  # alive: its mappings name the module
            hit = self._by_build_id.get(build_id)
        if hit is None and not self._own_indexed:
            self._index_own_libraries()
            hit = self._by_build_id.get(build_id)
        if hit is None:  # a debuginfo package's layout
            debug = DEBUG_ROOT / build_id[:2] / f"{build_id[2:]}.debug"
            if debug.is_file():
                self.index_file(debug)
                hit = self._by_build_id.get(build_id)
        return hit

    def _mapping(self, pid: int, address: int) -> Mapping | None:
        for m in self._maps.get(pid, ()):
            if m.start <= address < m.end:
                return m
        return None

    def symbolize(self, pid: int, raw: Sequence[RawFrame | int]) -> UserStack:
        frames = []
        for i, item in enumerate(raw):
            build_id, value = (None, item) if isinstance(item, int) else item
            if build_id and value >= UNMAPPED_OFFSET:
                break  # the walk left the mappings: this frame and the rest are not code
            frames.append(self._frame_by_id(pid, build_id, value, i > 0) if build_id
                          else self._frame(pid, value, i > 0))
        caller = self._wrapper_caller(frames)
        if caller is not None:
            frames.insert(1, caller)
        return UserStack(tuple(frames), *self._partial(frames))

    def _symbols_of(self, frame: StackFrame) -> elf.ElfSymbols | None:
        if frame.build_id and frame.build_id in self._by_build_id:
            return self._by_build_id[frame.build_id][1]
        for (path, _inode), symbols in self._modules.items():
            if path == frame.module:
                return symbols
        return None

    def _wrapper_caller(self, frames: list[StackFrame]) -> StackFrame | None:
        """The function that called a leaf syscall wrapper, from ``call rel32`` (E8) just before
        the return address of the next frame; None when that is not a direct call."""
        if len(frames) < 2 or frames[0].function not in LEAF_WRAPPERS:
            return None
        ret = frames[1]
        if ret.module is None or ret.file_offset is None or ret.file_offset < 5:
            return None
        symbols = self._symbols_of(ret)
        ret_vaddr = symbols.vaddr_of(ret.file_offset) if symbols is not None else None
        if symbols is None or ret_vaddr is None:
            return None
        try:
            with open(ret.module, "rb") as f:
                f.seek(ret.file_offset - 5)
                code = f.read(5)
        except OSError:
            return None
        if len(code) != 5 or code[0] != 0xE8:
            return None
        target = ret_vaddr + int.from_bytes(code[1:], "little", signed=True)
        hit = symbols.lookup(target)
        if hit is None or hit[1] != 0:
            return None
        return StackFrame(0, ret.module, symbols.build_id, None, demangle.demangle(hit[0]),
                          None, inferred=True)

    def _frame_by_id(self, pid: int, build_id: str, file_offset: int,
                     caller: bool) -> StackFrame:
        hit = self._by_id(pid, build_id)
        if hit is None:
            return StackFrame(0, None, build_id, file_offset, None, None)
        path, symbols = hit
        return self._named(0, path, symbols, file_offset, caller)

    def _frame(self, pid: int, address: int, caller: bool) -> StackFrame:
        m = self._mapping(pid, address)
        if m is None and os.path.exists(self.proc_root / str(pid)):
            self.remember(pid)  # alive: new mappings (dlopen), or never seen
            m = self._mapping(pid, address)
        if m is None:
            return StackFrame(address, None, None, None, None, None)
        file_offset = address - m.start + m.offset
        symbols = self._module(pid, m)
        if symbols is None:
            return StackFrame(address, m.path, None, file_offset, None, None)
        return self._named(address, m.path, symbols, file_offset, caller)

    @staticmethod
    def _named(address: int, path: str, symbols: elf.ElfSymbols, file_offset: int,
               caller: bool) -> StackFrame:
        # A return address points after the call: look up the call instruction itself.
        vaddr = symbols.vaddr_of(file_offset - (1 if caller else 0))
        hit = symbols.lookup(vaddr) if vaddr is not None else None
        if hit is None:
            return StackFrame(address, path, symbols.build_id, file_offset, None, None)
        name, offset = hit
        return StackFrame(address, path, symbols.build_id, file_offset,
                          demangle.demangle(name), offset + (1 if caller else 0))

    @staticmethod
    def _partial(frames: list[StackFrame]) -> tuple[bool, str | None]:
        if not frames:
            return True, "no frames could be read"
        last = frames[-1].function or ""
        if len(frames) < 2:
            return True, f"only {len(frames)} frame: {NO_FP_HINT}"
        # Past main the walk reaches libc's start code, which a libc without .symtab (Debian's)
        # leaves unnamed: a known outermost function followed by at most two such frames.
        tail = [f.function for f in frames[-3:]]
        while len(tail) > 1 and tail[-1] is None:
            tail.pop()
        named = tail[-1] or ""
        if named in OUTERMOST or named.endswith(("::main", "lang_start_internal")):
            return False, None
        return True, f"the frame-pointer walk ended in {last or 'an unknown frame'}: {NO_FP_HINT}"


def stack_lines(stack: dict[str, Any] | None) -> list[str]:
    """A symbolized stack (``UserStack.to_dict()``) as the indented lines of a report: the
    gate's report and the console log renderer print it alike."""
    if not stack or not stack.get("frames"):
        return ["  stack: not captured"]
    if stack.get("partial"):
        header = f"  stack (may be partial: {stack.get('why_partial') or 'reason unknown'}):"
    else:
        header = "  stack:"
    return [header, *(f"    #{i} {frame_text(frame)}" for i, frame in enumerate(stack["frames"]))]


def frame_text(frame: dict[str, Any]) -> str:
    """``0xADDR in function+0xOFF (module, build-id ID)``. A frame the kernel resolved by
    build-id has no address (0): ``in function+0xOFF (module+0xFILEOFF, build-id ID)``, the
    file offset being what locates it in the binary of that build-id."""
    address = frame.get("address")
    module = frame.get("module") or "unknown module"
    file_offset = frame.get("file_offset")
    function = frame.get("function")
    tail = f", build-id {frame['build_id']}" if frame.get("build_id") else ""
    if frame.get("inferred"):
        tail += ", inferred from the call instruction"
    head = f"0x{address:x}" if isinstance(address, int) and address else ""
    # With an address a named frame needs no offset; without one the file offset is the place.
    if file_offset is not None and not (head and function):
        module += f"+0x{file_offset:x}"
    if function:
        offset = frame.get("function_offset")
        head += (" in " if head else "in ") + function + (f"+0x{offset:x}" if offset else "")
    return f"{head or '??'} ({module}{tail})"
