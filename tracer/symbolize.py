"""User stacks of offending ioctls: unwound with the modules' CFI (tracer.unwind) from the
registers and stack bytes the probes captured at the report, else the kernel's frame-pointer
walk; symbolized by llvm-symbolizer (function, file:line:column, inlined frames, C++ and Rust
demangled) with the debug info found the standard ways.

A test VMM often exits milliseconds after its violation, before Python reads the event, so the
process's executable mappings are remembered while it surely lives (its first vCPU), and every
module is opened once and kept by build-id (or file identity): a stack of a process that is
gone, or of a binary deleted since, still resolves.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import os
import re
import shutil
import subprocess
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, TypeVar

from tracer.events import UserCapture
from tracer.unwind import (
    AT_BASE,
    AT_ENTRY,
    Mapping,
    ModuleCFI,
    RawFrame,
    UnwindError,
    Unwound,
    auxv_in,
    follows_call,
    mappings_of,
    unwind,
)

MAX_PROCESSES: Final = 4096  # remembered mappings (LRU)
MAX_MODULES: Final = 64  # opened ELF files (LRU, by build-id or file identity)
MAX_SYMBOLIZED: Final = 65536  # symbolizer answers (LRU, by object and address)
REFRESH_S: Final = 1.0  # a live process's mappings are re-read at most this often
MAX_DEBUG_FILES: Final = 1024  # debug file look-ups (LRU, by build-id)
SYMBOLIZER_TIMEOUT_S: Final = 10.0
DEBUGINFOD_TIMEOUT_S: Final = 30
# Where a thread starts: a stack that reached one of these is complete, named or not (the CFI of
# _start and clone3 marks its return address undefined, which says so too).
OUTERMOST: Final = frozenset({"_start", "__libc_start_main", "__libc_start_call_main",
                              "start_thread", "clone", "clone3", "__clone", "__clone3",
                              "thread_start", "__clone_internal"})
# A build-id frame's file offset at or above this is negative: the kernel resolves a frame by
# the first mapping ending above its address without checking that it starts below it.
UNMAPPED_OFFSET: Final = 1 << 63
DEBUG_ROOT: Final = Path("/usr/lib/debug")
OWN_LIBRARIES: Final = ("libc.so", "libc-", "ld-linux", "libstdc++", "libgcc_s", "libm.so",
                        "libpthread", "libdl")
# System modules: not the VMM's own code (call sites skip them).
SYSTEM_MODULES: Final = ("libc.so", "libc-", "ld-linux", "libc.musl", "ld-musl", "libpthread",
                         "libdl", "[vdso]", "linux-vdso")
SELF: Final = "\0self"
_RUST_HASH: Final = re.compile(r"::h[0-9a-f]{16}$")
_RUST_ESCAPE: Final = re.compile(r"\$(SP|BP|RF|LT|GT|LP|RP|C|u[0-9a-f]{1,6})\$")
_RUST_ESCAPES: Final = {"SP": "@", "BP": "*", "RF": "&", "LT": "<", "GT": ">", "LP": "(",
                        "RP": ")", "C": ","}
_SYMBOL_VERSION: Final = re.compile(r"@@?[A-Za-z0-9_.]+$")  # __libc_start_main@GLIBC_2.2.5


@dataclass(frozen=True)
class StackFrame:
    address: int
    module: str | None
    build_id: str | None
    file_offset: int | None
    function: str | None
    function_offset: int | None
    file: str | None = None
    line: int | None = None
    column: int | None = None
    inlined: bool = False  # inlined into the next frame (same address)

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address, "module": self.module, "build_id": self.build_id,
                "file_offset": self.file_offset, "function": self.function,
                "function_offset": self.function_offset, "file": self.file, "line": self.line,
                "column": self.column, "inlined": self.inlined}


@dataclass(frozen=True)
class UserStack:
    frames: tuple[StackFrame, ...]
    method: str  # "cfi" | "frame-pointer" | "none"
    complete: bool
    why_partial: str | None
    copied_bytes: int = 0  # cfi: the stack bytes the probe copied, and how many the walk read
    used_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"frames": [f.to_dict() for f in self.frames], "method": self.method,
                "complete": self.complete, "partial": not self.complete,
                "why_partial": self.why_partial, "copied_bytes": self.copied_bytes,
                "used_bytes": self.used_bytes}


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


# One frame of the kernel's walk: (build-id hex, file offset) when it resolved the module
# (BPF_F_STACK_BUILD_ID), else (None, the raw address).
KernelFrame = tuple[str | None, int]


class LlvmSymbolizer:
    """One long-running ``llvm-symbolizer --output-style=JSON``: per query (object, address)
    the function, file, line, column and inlined frames, demangled (Itanium C++, Rust legacy
    and v0). Answers are cached; a dead or hung process is restarted at the next query."""

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or find_llvm_symbolizer()
        self._proc: subprocess.Popen[str] | None = None
        self._cache: OrderedDict[tuple[str, int], list[dict[str, Any]]] = OrderedDict()

    def close(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(OSError):
                self._proc.kill()
            self._proc.wait()
            self._proc = None

    def lookup(self, obj: str, vaddr: int, identity: str | None = None) -> list[dict[str, Any]]:
        """llvm-symbolizer's frames for ``vaddr`` in ``obj`` (cached by ``identity``, the
        contents' build-id, when given), innermost (inlined) first; empty when unknown or the
        tool is missing."""
        key = (identity or obj, vaddr)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        frames = self._ask(obj, vaddr)
        _put_recent(self._cache, key, frames, MAX_SYMBOLIZED)
        return frames

    def _ask(self, obj: str, vaddr: int) -> list[dict[str, Any]]:
        if self.binary is None or "\n" in obj or '"' in obj:
            return []
        for _attempt in range(2):
            proc = self._proc
            if proc is None or proc.poll() is not None:
                proc = self._proc = subprocess.Popen(
                    [self.binary, "--output-style=JSON", "--inlining", "--demangle",
                     "--functions=linkage"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                    text=True, bufsize=1)
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(f'"{obj}" {vaddr:#x}\n')
                proc.stdin.flush()
                line = proc.stdout.readline()
                answer = json.loads(line)
            except (OSError, ValueError):
                self.close()
                continue
            return [s for s in answer.get("Symbol", []) if isinstance(s, dict)]
        return []


K = TypeVar("K")
V = TypeVar("V")


def _put_recent(lru: OrderedDict[K, V], key: K, value: V, most: int) -> None:
    """``lru[key] = value`` as its most recent entry, the least recent dropped past ``most``."""
    lru[key] = value
    lru.move_to_end(key)
    while len(lru) > most:
        lru.popitem(last=False)


def find_llvm_symbolizer() -> str | None:
    found = shutil.which("llvm-symbolizer")
    if found:
        return found
    versions = sorted(Path("/usr/lib").glob("llvm-*/bin/llvm-symbolizer"))
    return str(versions[-1]) if versions else None


def rust_name(name: str) -> str:
    """A demangled name as a person reads it: a versioned ELF symbol without its version; a
    Rust legacy symbol (the Itanium demangler leaves its hash and escapes) as rustc-demangle's
    alternate form prints it: without the hash, ``$LT$``/``$u7b$``... as the characters."""
    name = _SYMBOL_VERSION.sub("", name)
    if not _RUST_HASH.search(name) and not _RUST_ESCAPE.search(name):
        return name
    name = _RUST_HASH.sub("", name)
    name = re.sub(r"(^|::|\.\.)_(?=\$)", r"\1", name)
    name = _RUST_ESCAPE.sub(lambda m: _RUST_ESCAPES.get(m[1]) or chr(int(m[1][1:], 16))
                            if m[1] in _RUST_ESCAPES or m[1][0] == "u" else m[0], name)
    return name.replace("..", "::")


class DebugFiles:
    """Where a module's DWARF is: the module itself, /usr/lib/debug/.build-id/xx/yyyy.debug,
    its .gnu_debuglink (next to it, in .debug/, under /usr/lib/debug), then a debuginfod
    server when DEBUGINFOD_URLS is set (elfutils' debuginfod-find, which caches)."""

    def __init__(self, debug_root: Path = DEBUG_ROOT) -> None:
        self.debug_root = debug_root
        self._found: OrderedDict[str, str | None] = OrderedDict()

    def find(self, path: str, build_id: str | None, directory: str | None = None) -> str | None:
        """The file with ``path``'s DWARF; ``directory``: where the module lives (for its
        .gnu_debuglink) when ``path`` is another name of it."""
        key = build_id or path
        if key not in self._found:
            found = self._search(path, build_id, directory or str(Path(path).parent))
            # The module itself is kept as "itself": ``path`` may be a name of this moment.
            self._found[key] = SELF if found == path else found
            while len(self._found) > MAX_DEBUG_FILES:
                self._found.popitem(last=False)
        self._found.move_to_end(key)
        found = self._found[key]
        return path if found == SELF else found

    def _search(self, path: str, build_id: str | None, directory: str) -> str | None:
        from elftools.common.exceptions import ELFError
        from elftools.elf.elffile import ELFFile

        link = None
        try:
            with open(path, "rb") as f:
                elf = ELFFile(f)
                if elf.get_section_by_name(".debug_info") is not None or \
                        elf.get_section_by_name(".zdebug_info") is not None:
                    return path
                sec = elf.get_section_by_name(".gnu_debuglink")
                if sec is not None:
                    link = sec.data().split(b"\0", 1)[0].decode("utf-8", "replace")
        except (OSError, ELFError, ValueError):
            pass
        if build_id:
            candidate = self.debug_root / ".build-id" / build_id[:2] / f"{build_id[2:]}.debug"
            if candidate.is_file():
                return str(candidate)
        if link and "/" not in link:
            here = Path(directory)
            for candidate in (here / link, here / ".debug" / link,
                              self.debug_root / here.relative_to("/") / link
                              if here.is_absolute() else here / link):
                if candidate.is_file() and str(candidate) != path:
                    return str(candidate)
        if build_id and os.environ.get("DEBUGINFOD_URLS"):
            return fetch_debuginfod(build_id)
        return None


def fetch_debuginfod(build_id: str) -> str | None:
    """The debug file of ``build_id`` from the servers in DEBUGINFOD_URLS, through elfutils'
    client library (libdebuginfod: its cache, timeouts and URL list; Debian's libdebuginfod1,
    no server installed). None when the library, the servers or the file are not there."""
    if not re.fullmatch(r"[0-9a-f]{2,}", build_id):
        return None
    lib = _libdebuginfod()
    if lib is None:
        return None
    # Read by debuginfod_begin: a server that does not answer stalls this report at most this
    # long (the library's own default is 90 s).
    os.environ.setdefault("DEBUGINFOD_TIMEOUT", str(DEBUGINFOD_TIMEOUT_S))
    client = lib.debuginfod_begin()
    if not client:
        return None
    path = ctypes.c_char_p()
    try:
        # build_id_len 0: the build-id is given as a hex string (<elfutils/debuginfod.h>).
        fd = lib.debuginfod_find_debuginfo(client, build_id.encode(), 0, ctypes.byref(path))
    finally:
        lib.debuginfod_end(client)
    if fd < 0 or not path.value:
        return None
    os.close(fd)
    found = os.fsdecode(path.value)
    return found if os.path.isfile(found) else None


@functools.cache
def _libdebuginfod() -> Any:
    name = ctypes.util.find_library("debuginfod") or "libdebuginfod.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    lib.debuginfod_begin.restype = ctypes.c_void_p
    lib.debuginfod_end.argtypes = [ctypes.c_void_p]
    lib.debuginfod_find_debuginfo.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int,
                                              ctypes.POINTER(ctypes.c_char_p)]
    lib.debuginfod_find_debuginfo.restype = ctypes.c_int
    return lib


class Symbolizer:
    def __init__(self, proc_root: Path = Path("/proc"), llvm: LlvmSymbolizer | None = None,
                 debug_files: DebugFiles | None = None) -> None:
        self.proc_root = proc_root
        self.llvm = llvm or LlvmSymbolizer()
        self.debug_files = debug_files or DebugFiles()
        self._maps: OrderedDict[int, list[Mapping]] = OrderedDict()
        # file identity (path, inode) -> the opened module; None: not readable as ELF
        self._modules: OrderedDict[tuple[str, int], ModuleCFI | None] = OrderedDict()
        self._by_build_id: OrderedDict[str, ModuleCFI] = OrderedDict()
        self._exe: OrderedDict[int, ModuleCFI] = OrderedDict()  # pid -> the binary it exec'd
        # pid -> where the captures placed its modules (a gone process's address space): a
        # report whose kernel walk is missing (its stack map bucket was taken) uses them.
        self._placed: OrderedDict[int, dict[int, tuple[Mapping, ModuleCFI]]] = OrderedDict()
        self._refreshed: dict[int, float] = {}  # pid -> when its mappings were last re-read
        self._warmed: set[str] = set()  # modules llvm-symbolizer has loaded (by identity)
        self._named_cache: OrderedDict[tuple[RawFrame, bool], list[StackFrame]] = OrderedDict()
        self._own_indexed = False

    def close(self) -> None:
        self.llvm.close()
        for mod in self._modules.values():
            if mod is not None:
                mod.close()

    # ---- processes and modules -----------------------------------------------------------------
    def remember(self, pid: int) -> None:
        """Snapshot ``pid``'s executable mappings and open their modules."""
        maps = read_maps(pid, self.proc_root)
        if not maps:
            return
        _put_recent(self._maps, pid, maps, MAX_PROCESSES)
        for m in maps:  # open while the files are surely reachable
            mod = self._module(pid, m)
            if mod is not None:
                self._warm(mod)

    def _warm(self, mod: ModuleCFI) -> None:
        """Have llvm-symbolizer load a module's symbols and debug info once, when its process
        is first seen (its first vCPU), not at its first finding: that first look-up costs
        tens of milliseconds for a large binary."""
        if mod.identity in self._warmed:
            return
        if len(self._warmed) >= MAX_DEBUG_FILES:  # bounded: warming again is only slower
            self._warmed.clear()
        self._warmed.add(mod.identity)
        own = mod.path_for_symbols
        obj = self.debug_files.find(own, mod.build_id, str(Path(mod.path).parent))
        if obj:
            self.llvm.lookup(obj, mod.entry, f"{mod.identity}:debug")

    def _refresh(self, pid: int) -> bool:
        """Read ``pid``'s mappings again, at most once a second (a report's frames that no
        mapping holds, such as the kernel's walk through garbage, must not make every report
        of a busy VMM read /proc); False when it is gone or was read just now."""
        now = time.monotonic()
        if now - self._refreshed.get(pid, -REFRESH_S) < REFRESH_S:
            return False
        self._refreshed[pid] = now
        while len(self._refreshed) > MAX_PROCESSES:
            self._refreshed.pop(next(iter(self._refreshed)))
        if not os.path.exists(self.proc_root / str(pid)):
            return False
        self.remember(pid)
        return True

    def forget(self, pid: int) -> None:
        self._refreshed.pop(pid, None)
        self._maps.pop(pid, None)
        self._exe.pop(pid, None)
        self._placed.pop(pid, None)

    def index_file(self, path: Path) -> None:
        """Open one file and index it by its build-id (a binary about to run)."""
        self._index_path(path, str(path))

    def index_binary(self, pid: int, path: str) -> None:
        """A binary ``pid`` exec'd (by the name given to execve): through the process while it
        lives (its exe, cwd and root), else as we see the path."""
        proc = self.proc_root / str(pid)
        for candidate in (proc / "exe", proc / "cwd" / path, proc / "root" / path.lstrip("/"),
                          Path(path)):
            mod = self._index_path(candidate, path)
            if mod is not None:
                _put_recent(self._exe, pid, mod, MAX_PROCESSES)
                return

    def _index_path(self, candidate: Path, name: str) -> ModuleCFI | None:
        try:
            st = candidate.stat()
            mod = ModuleCFI.open(str(candidate))
        except (OSError, UnwindError):
            return None
        mod.path = name
        self._keep((name, st.st_ino), mod)
        return mod

    def _keep(self, key: tuple[str, int], mod: ModuleCFI | None) -> None:
        old = self._modules.pop(key, None)
        if old is not None and old is not mod and old not in self._by_build_id.values():
            old.close()
        self._modules[key] = mod
        while len(self._modules) > MAX_MODULES:
            _k, gone = self._modules.popitem(last=False)
            if gone is not None and self._by_build_id.get(gone.build_id or "") is not gone:
                gone.close()
        if mod is not None and mod.build_id:
            self._by_build_id[mod.build_id] = mod
            self._by_build_id.move_to_end(mod.build_id)
            while len(self._by_build_id) > MAX_MODULES:
                _b, gone = self._by_build_id.popitem(last=False)
                if gone not in self._modules.values():
                    gone.close()

    def _module(self, pid: int, m: Mapping) -> ModuleCFI | None:
        key = (m.path, m.inode)
        if key in self._modules:
            self._modules.move_to_end(key)
            return self._modules[key]
        mod = None
        # map_files works for deleted files and other mount namespaces; then the process's
        # root; then the path as we see it.
        for candidate in (self.proc_root / str(pid) / "map_files" / f"{m.start:x}-{m.end:x}",
                          self.proc_root / str(pid) / "root" / m.path.lstrip("/"),
                          Path(m.path)):
            try:
                mod = ModuleCFI.open(str(candidate))
            except UnwindError:
                continue
            mod.path = m.path
            break
        self._keep(key, mod)
        return mod

    def _index_own_libraries(self) -> None:
        """The system libraries this process maps too (libc, the loader, ...): the same files as
        a VMM's, found without the VMM's /proc."""
        self._own_indexed = True
        for m in read_maps(os.getpid(), self.proc_root):
            if Path(m.path).name.startswith(OWN_LIBRARIES):
                self._module(os.getpid(), m)

    def warm_system_libraries(self) -> None:
        """At start-up: open libc and the loader (the files every VMM maps too) and have
        llvm-symbolizer load them (~110 ms here, with libc's debug info), so a VMM's first
        finding does not wait for it."""
        if not self._own_indexed:
            self._index_own_libraries()
        for mod in list(self._modules.values()):
            if mod is not None:
                self._warm(mod)

    def _by_id(self, pid: int, build_id: str) -> ModuleCFI | None:
        hit = self._by_build_id.get(build_id)
        if hit is None and self._refresh(pid):  # alive: its mappings name the module
            hit = self._by_build_id.get(build_id)
        if hit is None and not self._own_indexed:
            self._index_own_libraries()
            hit = self._by_build_id.get(build_id)
        return hit

    # ---- stacks --------------------------------------------------------------------------------
    def symbolize(self, pid: int, kernel_frames: Sequence[KernelFrame | int],
                  capture: UserCapture | None = None) -> UserStack:
        """The report's stack: unwound with CFI from ``capture`` when there is one, else (or
        when that gives less) the kernel's frame-pointer walk ``kernel_frames``. Never raises:
        the alert goes out whatever its stack."""
        try:
            return self._symbolize(pid, kernel_frames, capture)
        except Exception as err:  # unreadable modules of every kind: the stack says so
            return UserStack((), "none", False, f"the stack could not be read: "
                                                f"{type(err).__name__}: {err}")

    def _symbolize(self, pid: int, kernel_frames: Sequence[KernelFrame | int],
                   capture: UserCapture | None) -> UserStack:
        cfi = self._unwind(pid, capture, kernel_frames) if capture is not None else None
        fp = self._frame_pointer(pid, kernel_frames) if kernel_frames else None
        if cfi is not None and (cfi.complete or fp is None or not fp[0].complete
                                or len(cfi.frames) >= len(fp[0].frames)):
            return replace(self._stack(cfi, "cfi", [True] * len(cfi.frames)),
                           copied_bytes=len(capture.stack) if capture else 0,
                           used_bytes=cfi.bytes_used)
        if fp is not None:
            return self._stack(fp[0], "frame-pointer", fp[1])
        return UserStack((), "none", False, "no stack was captured")

    def _unwind(self, pid: int, capture: UserCapture,
                kernel_frames: Sequence[KernelFrame | int]) -> Unwound:
        rip = capture.regs["rip"]
        maps = self._maps.get(pid)
        if not maps or not any(m.start <= rip < m.end for m in maps):
            self._refresh(pid)  # alive: new mappings (dlopen), or never seen
            maps = self._maps.get(pid, [])
        found = None
        if any(m.start <= rip < m.end for m in maps):
            found = unwind(capture.regs, capture.stack, maps, lambda m: self._module(pid, m),
                           self._outermost)
            if found.complete:
                return found
        # Mappings read while the process was exiting can be partial: the capture's own say.
        derived, known = self._derived_maps(pid, capture, kernel_frames)
        own = unwind(capture.regs, capture.stack, derived, lambda m: known.get(m.start),
                     self._outermost)
        if found is None or own.complete or len(own.frames) > len(found.frames):
            return own
        return found

    def _derived_maps(self, pid: int, capture: UserCapture,
                      kernel_frames: Sequence[KernelFrame | int]
                      ) -> tuple[list[Mapping], dict[int, ModuleCFI]]:
        """Where the modules were loaded, for a process gone before its mappings were read (a
        test VMM that lives 5 ms): the kernel's walk names the module of each address it
        read (the registers' rip, then the return addresses of the frame-pointer chain, which
        the stack copy holds too); the auxiliary vector at the top of the main thread's stack
        says where the executable (AT_ENTRY) and the loader (AT_BASE) are."""
        out: list[Mapping] = []
        known: dict[int, ModuleCFI] = {}

        def place(m: Mapping, mod: ModuleCFI) -> None:  # unless it overlaps one placed
            if not any(o.start < m.end and m.start < o.end for o in out):
                out.append(m)
                known[m.start] = mod

        def add(mod: ModuleCFI | None, bias: int) -> None:
            if mod is None or bias % 4096:
                return
            for m in mappings_of(mod, bias, mod.path):
                place(m, mod)

        def word(addr: int) -> int | None:
            off = addr - capture.sp
            return (int.from_bytes(capture.stack[off:off + 8], "little")
                    if 0 <= off <= len(capture.stack) - 8 else None)

        fp: int | None = capture.regs["rbp"]
        for i, item in enumerate(kernel_frames):
            address = capture.regs["rip"] if i == 0 else (word(fp + 8) if fp else None)
            if i > 0:
                fp = word(fp) if fp else None
            if address is None:
                break
            if isinstance(item, tuple) and item[0] and item[1] < UNMAPPED_OFFSET:
                mod = self._by_id(pid, item[0])
                vaddr = mod.vaddr_of(item[1]) if mod is not None else None
                if mod is not None and vaddr is not None:
                    add(mod, address - vaddr)
        aux = auxv_in(capture.stack)
        exe = self._exe.get(pid)
        if exe is not None and AT_ENTRY in aux:
            add(exe, 0 if exe.fixed else aux[AT_ENTRY] - exe.entry)
        if aux.get(AT_BASE):
            if not self._own_indexed:
                self._index_own_libraries()
            loader = next((m for m in self._modules.values()
                           if m is not None and Path(m.path).name.startswith("ld-linux")), None)
            add(loader, aux[AT_BASE])
        # What earlier captures of this address space placed (its libc, from a report whose
        # kernel walk resolved rip), and what this one adds for the next.
        placed = self._placed.get(pid, {})
        for m, mod in list(placed.values()):
            place(m, mod)
        for m in out:
            placed.setdefault(m.start, (m, known[m.start]))
        _put_recent(self._placed, pid, placed, MAX_PROCESSES)
        return out, known

    def _outermost(self, frame: RawFrame) -> bool:
        mod = self._by_build_id.get(frame.build_id or "")
        if mod is None:
            return False
        vaddr = mod.vaddr_of(frame.file_offset)
        if vaddr is None:
            return False
        names = self.llvm.lookup(mod.path_for_symbols, vaddr - 1, mod.identity)
        return any(rust_name(s.get("FunctionName") or "") in OUTERMOST for s in names)

    def _mapping(self, pid: int, address: int) -> Mapping | None:
        def find() -> Mapping | None:
            return next((m for m in self._maps.get(pid, []) if m.start <= address < m.end), None)

        found = find()
        if found is None and self._refresh(pid):  # alive: new mappings, or never seen
            found = find()
        return found

    def _frame_pointer(self, pid: int, raw: Sequence[KernelFrame | int]
                       ) -> tuple[Unwound, list[bool]] | None:
        """The kernel's walk, each frame checked as the CFI unwinder checks its own: in a known
        module, and (past the first) after a call instruction; the rest is dropped."""
        frames: list[RawFrame] = []
        why: str | None = None
        for item in raw:
            build_id, value = (None, item) if isinstance(item, int) else item
            if build_id is None:
                m = self._mapping(pid, value)
                mod = self._module(pid, m) if m is not None else None
                if m is None or mod is None:
                    why = f"{value:#x} is in no executable mapping of the process"
                    break
                frame = RawFrame(value, m.path, value - m.start + m.offset, mod.build_id)
            else:
                mod = self._by_id(pid, build_id) if value < UNMAPPED_OFFSET else None
                if mod is None:
                    why = ("the frame-pointer walk left the mappings" if value >= UNMAPPED_OFFSET
                           else f"no module with build-id {build_id} is known")
                    break
                frame = RawFrame(0, mod.path, value, build_id)
            vaddr = mod.vaddr_of(frame.file_offset)
            if frames and (vaddr is None or not follows_call(mod.code_before(vaddr, 7))):
                why = (f"{os.path.basename(frame.module)}+{frame.file_offset:#x} does not follow "
                       "a call instruction")
                break
            frames.append(frame)
            if self._outermost(frame):
                return Unwound(frames, True, None), [False] * len(frames)
        if why is None:
            why = ("the frame-pointer walk ended before the thread's start (a function without "
                   "frame pointers)")
        return Unwound(frames, False, why), [False] * len(frames)

    def _stack(self, unwound: Unwound, method: str, _checked: list[bool]) -> UserStack:
        frames: list[StackFrame] = []
        for i, raw in enumerate(unwound.frames):
            frames.extend(self._named(raw, caller=i > 0))
        return UserStack(tuple(frames), method, unwound.complete, unwound.why_incomplete)

    def _named(self, raw: RawFrame, caller: bool) -> list[StackFrame]:
        """The frame (and the frames inlined at its address, innermost first); the same
        frame of a loop's next report is a dictionary look-up."""
        key = (raw, caller)
        hit = self._named_cache.get(key)
        if hit is not None:
            self._named_cache.move_to_end(key)
            return hit
        named = self._name(raw, caller)
        if raw.build_id:  # a frame without a build-id names nothing for sure later
            _put_recent(self._named_cache, key, named, MAX_SYMBOLIZED)
        return named

    def _name(self, raw: RawFrame, caller: bool) -> list[StackFrame]:
        mod = self._by_build_id.get(raw.build_id or "") or next(
            (m for m in self._modules.values() if m is not None and m.path == raw.module), None)
        vaddr = mod.vaddr_of(raw.file_offset) if mod is not None else None
        base = StackFrame(raw.address, raw.module, raw.build_id, raw.file_offset, None, None)
        if mod is None or vaddr is None:
            return [base]
        # A return address points after the call: look up the call instruction itself.
        look = vaddr - 1 if caller else vaddr
        own = mod.path_for_symbols
        obj = self.debug_files.find(own, mod.build_id, str(Path(mod.path).parent))
        answers = self.llvm.lookup(obj, look, f"{mod.identity}:debug") if obj else []
        if obj != own and not any(a.get("FunctionName") for a in answers):
            answers = self.llvm.lookup(own, look, mod.identity)  # its own (dynamic) symbols
        out = []
        for j, ans in enumerate(answers):
            name = rust_name(ans.get("FunctionName") or "") or None
            start = _hex(ans.get("StartAddress"))
            last = j == len(answers) - 1
            out.append(StackFrame(
                raw.address, raw.module, raw.build_id, raw.file_offset, name,
                vaddr - start if last and start is not None and name else None,
                # A file without a line is a compile unit's name (a Rust crate built without
                # debug info keeps one): nothing to point at.
                ans.get("FileName") or None if ans.get("Line") else None,
                ans.get("Line") or None, ans.get("Column") or None, inlined=not last))
        return out or [base]


def _hex(value: Any) -> int | None:
    try:
        return int(value, 16) if isinstance(value, str) and value else None
    except ValueError:
        return None


def stack_lines(stack: dict[str, Any] | None) -> list[str]:
    """A symbolized stack (``UserStack.to_dict()``) as the indented lines of a report: the
    gate's report and the console log renderer print it alike."""
    if not stack or not stack.get("frames"):
        why = f" ({stack['why_partial']})" if stack and stack.get("why_partial") else ""
        if stack and stack.get("copied_bytes"):  # captured; its first address in no module
            return [f"  stack: captured ({stack['copied_bytes']} bytes) but not unwound{why}"]
        return [f"  stack: not captured{why}"]
    method = stack.get("method") or "frame-pointer"
    if stack.get("complete", not stack.get("partial")):
        header = f"  stack ({method}):"
    else:
        header = (f"  stack ({method}, incomplete: "
                  f"{stack.get('why_partial') or 'reason unknown'}):")
    return [header, *(f"    #{i} {frame_text(frame)}" for i, frame in enumerate(stack["frames"]))]


def frame_text(frame: dict[str, Any]) -> str:
    """``0xADDR in function file:line:col (module+0xOFFSET)`` as ASan prints a frame; an inlined
    frame is marked, a frame of the kernel's walk has no address (the module's build-id and file
    offset say where it is)."""
    address = frame.get("address")
    head = f"0x{address:x}" if isinstance(address, int) and address else "0x?"
    function = frame.get("function")
    if function:
        offset = frame.get("function_offset")
        head += f" in {function}" + (f"+0x{offset:x}" if offset and not frame.get("line")
                                     else "")
    if frame.get("file"):
        head += f" {frame['file']}"
        if frame.get("line"):
            head += f":{frame['line']}"
            if frame.get("column"):
                head += f":{frame['column']}"
    module = frame.get("module")
    where = os.path.basename(module) if module else "unknown module"
    if frame.get("file_offset") is not None:
        where += f"+0x{frame['file_offset']:x}"
    head += f" ({where})"
    if frame.get("inlined"):
        head += " [inlined]"
    return head


def is_system_frame(frame: dict[str, Any]) -> bool:
    """libc, the loader or the vDSO: not the VMM's own code."""
    module = frame.get("module") or ""
    return os.path.basename(module).startswith(SYSTEM_MODULES)
