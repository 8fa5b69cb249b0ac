"""CFI unwinding of a captured user stack (x86-64): the registers the task saved at the syscall
and a copy of the top of its stack (tracer.events.UserCapture), unwound with each module's
``.eh_frame`` (found through ``.eh_frame_hdr``'s sorted table; ``.debug_frame`` where
``.eh_frame`` does not cover a pc), as a debugger does without
frame pointers.

pyelftools reads the ELF file and decodes a CIE/FDE into its rule table; only the FDE of each
frame's address is parsed (QEMU's 22,000 FDEs would take ~4 s to decode all). The loop that
applies the rules to the copied bytes is ours, and it never guesses: a frame is kept only when
its return address lies in an executable mapping of the process and follows a call instruction
there; otherwise the stack ends with the reason. A return address the CFI marks undefined is
the thread's start (glibc's ``_start`` and ``clone3``/``clone`` do so): the stack is complete.
"""

from __future__ import annotations

import bisect
import io
import os
import struct
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Final

from elftools.common.exceptions import ELFError
from elftools.dwarf.callframe import FDE, CallFrameInfo, CFARule, RegisterRule
from elftools.dwarf.structs import DWARFStructs
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection

# DWARF register numbers on x86-64 (System V psABI, figure 3.36).
DWARF_REGS: Final = {0: "rax", 1: "rdx", 2: "rcx", 3: "rbx", 4: "rsi", 5: "rdi", 6: "rbp",
                     7: "rsp", 8: "r8", 9: "r9", 10: "r10", 11: "r11", 12: "r12", 13: "r13",
                     14: "r14", 15: "r15", 16: "rip"}
RA_REG: Final = 16
CALLEE_SAVED: Final = ("rbx", "rbp", "r12", "r13", "r14", "r15")
MAX_FRAMES: Final = 128
MAX_DECODED_FDES: Final = 4096  # per module (LRU)
DW_EH_PE_DATAREL_SDATA4: Final = 0x3B  # .eh_frame_hdr table encoding (GNU ld, lld, gold)


class UnwindError(ValueError):
    pass


@dataclass
class Segment:
    vaddr: int
    offset: int
    filesz: int
    executable: bool


@dataclass
class Rules:
    """The unwind row of one address: the CFA as register+offset, each register's rule."""

    cfa_reg: str | None  # None: a CFA expression (PLT stubs), not followed
    cfa_offset: int
    regs: dict[str, RegisterRule]
    function_start: int


@dataclass
class ModuleCFI:
    """One ELF file's loadable segments and call frame information, parsed once."""

    path: str
    build_id: str | None
    segments: list[Segment]
    _file: BinaryIO
    entry: int = 0  # e_entry
    fixed: bool = False  # ET_EXEC: loaded at its link addresses
    _cfi: CallFrameInfo | None = None
    _eh_frame: tuple[int, int] | None = None  # file offset and size, read at the first use
    _eh_frame_vaddr: int = 0
    _table_pcs: array[int] = field(default_factory=lambda: array("q"))
    _table_fdes: array[int] = field(default_factory=lambda: array("q"))
    _all_fdes: list[FDE] | None = None
    # .debug_frame (a build with -fno-asynchronous-unwind-tables -g has no .eh_frame for its
    # own code): every FDE parsed once, at the first pc .eh_frame does not cover
    _debug_frame: tuple[int, int] | None = None
    _debug_fdes: list[FDE] | None = None
    _debug_starts: list[int] = field(default_factory=list)
    _fdes: dict[int, FDE] = field(default_factory=dict)  # by start, bounded like _decoded
    # FDE start -> (row addresses, rows)
    _decoded: OrderedDict[int, tuple[list[int], list[Rules]]] = field(
        default_factory=OrderedDict)

    @classmethod
    def open(cls, path: str) -> ModuleCFI:
        try:
            f = open(path, "rb")  # noqa: SIM115 -- kept open while the module is cached
        except OSError as err:
            raise UnwindError(f"{path}: {err.strerror}") from err
        try:
            return cls._parse(path, f)
        except (ELFError, OSError, ValueError, struct.error, AssertionError) as err:
            f.close()
            raise UnwindError(f"{path}: {err}") from err

    @classmethod
    def _parse(cls, path: str, f: BinaryIO) -> ModuleCFI:
        elf = ELFFile(f)
        if elf.get_machine_arch() != "x64":
            raise UnwindError(f"{path}: not an x86-64 ELF file")
        segments = [Segment(s["p_vaddr"], s["p_offset"], s["p_filesz"], bool(s["p_flags"] & 1))
                    for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        build_id = None
        for sec in elf.iter_sections("SHT_NOTE"):
            if not isinstance(sec, NoteSection):
                continue
            for note in sec.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID":
                    build_id = str(note["n_desc"])
        mod = cls(path, build_id, segments, f, elf.header["e_entry"],
                  elf.header["e_type"] == "ET_EXEC")
        eh = elf.get_section_by_name(".eh_frame")
        if eh is not None and eh["sh_type"] != "SHT_NOBITS":
            # Read when a stack first needs it: a process remembered at its first vCPU costs
            # only its headers and the .eh_frame_hdr table.
            mod._eh_frame = (eh["sh_offset"], eh["sh_size"])
            mod._eh_frame_vaddr = eh["sh_addr"]
            hdr = elf.get_section_by_name(".eh_frame_hdr")
            if hdr is not None:
                mod._read_hdr(hdr.data(), hdr["sh_addr"])
        dbg = elf.get_section_by_name(".debug_frame")
        if dbg is not None and dbg["sh_type"] != "SHT_NOBITS" and dbg["sh_size"]:
            mod._debug_frame = (dbg["sh_offset"], dbg["sh_size"])
        return mod

    def _read_hdr(self, data: bytes, vaddr: int) -> None:
        """The binary search table (initial location -> FDE address) of .eh_frame_hdr."""
        if len(data) < 12 or data[0] != 1 or data[3] != DW_EH_PE_DATAREL_SDATA4:
            return  # another encoding: every FDE is parsed once instead (_all)
        # eh_frame_ptr (encoding data[1], 4 bytes for the sdata4/udata4 forms), then fde_count
        if data[1] & 0x0F not in (0x03, 0x0B) or data[2] & 0x0F not in (0x03, 0x0B):
            return
        (count,) = struct.unpack_from("<I", data, 8)
        if 12 + 8 * count > len(data):
            return
        pairs = struct.unpack_from(f"<{2 * count}i", data, 12)
        self._table_pcs = array("q", (vaddr + p for p in pairs[0::2]))
        self._table_fdes = array("q", (vaddr + p for p in pairs[1::2]))

    def close(self) -> None:
        self._file.close()

    @property
    def path_for_symbols(self) -> str:
        """A name of the opened file that another process (llvm-symbolizer) can open while
        this module is kept, whatever became of its path (deleted, another mount namespace)."""
        return f"/proc/{os.getpid()}/fd/{self._file.fileno()}"

    @property
    def identity(self) -> str:
        """The key of what is known about this file's contents."""
        return self.build_id or f"{self.path}@{id(self)}"

    # ---- addresses -----------------------------------------------------------------------------
    def vaddr_of(self, file_offset: int) -> int | None:
        for s in self.segments:
            if s.offset <= file_offset < s.offset + s.filesz:
                return file_offset - s.offset + s.vaddr
        return None

    def code_before(self, vaddr: int, size: int) -> bytes:
        """The ``size`` bytes of the file that end at ``vaddr`` (in an executable segment)."""
        for s in self.segments:
            if s.executable and s.vaddr + size <= vaddr <= s.vaddr + s.filesz:
                self._file.seek(s.offset + vaddr - size - s.vaddr)
                return self._file.read(size)
        return b""

    # ---- rules ---------------------------------------------------------------------------------
    def _read_cfi(self, where: tuple[int, int], vaddr: int, eh_frame: bool) -> CallFrameInfo:
        """pyelftools' reader of one CFI section (file offset and size), read whole."""
        offset, size = where
        self._file.seek(offset)
        data = self._file.read(size)
        if len(data) != size:
            raise UnwindError(f"{self.path}: {'.eh_frame' if eh_frame else '.debug_frame'} "
                              "truncated")
        structs = DWARFStructs(little_endian=True, dwarf_format=32, address_size=8)
        return CallFrameInfo(io.BytesIO(data), size, vaddr, structs, for_eh_frame=eh_frame)

    def _call_frame_info(self) -> CallFrameInfo | None:
        if self._cfi is None and self._eh_frame is not None:
            self._cfi = self._read_cfi(self._eh_frame, self._eh_frame_vaddr, eh_frame=True)
        return self._cfi

    def _fde_for(self, vaddr: int) -> FDE | None:
        cfi = self._call_frame_info()
        if cfi is None:
            return None
        if self._table_pcs:
            i = bisect.bisect_right(self._table_pcs, vaddr) - 1
            if i < 0:
                return None
            fde_at = self._table_fdes[i] - self._eh_frame_vaddr
            start = self._table_pcs[i]
            known = self._fdes.get(start)
            if known is not None:  # parsed before
                return known
            entry = cfi._parse_entry_at(fde_at)
            if not isinstance(entry, FDE):
                return None
            self._fdes[start] = entry
            if len(self._fdes) > MAX_DECODED_FDES:
                self._fdes.pop(next(iter(self._fdes)))
            return entry
        if self._all_fdes is None:
            self._all_fdes = sorted((e for e in cfi.get_entries() if isinstance(e, FDE)),
                                    key=lambda e: e.header.initial_location)
        starts = [e.header.initial_location for e in self._all_fdes]
        i = bisect.bisect_right(starts, vaddr) - 1
        return self._all_fdes[i] if i >= 0 else None

    def _debug_frame_fde_for(self, vaddr: int) -> FDE | None:
        if self._debug_frame is None:
            return None
        if self._debug_fdes is None:
            cfi = self._read_cfi(self._debug_frame, 0, eh_frame=False)
            self._debug_fdes = sorted((e for e in cfi.get_entries() if isinstance(e, FDE)),
                                      key=lambda e: e.header.initial_location)
            self._debug_starts = [e.header.initial_location for e in self._debug_fdes]
        i = bisect.bisect_right(self._debug_starts, vaddr) - 1
        return self._debug_fdes[i] if i >= 0 else None

    def rules_at(self, vaddr: int) -> Rules | None:
        """The unwind row covering ``vaddr``, None where no FDE covers it: .eh_frame's, else
        .debug_frame's."""
        fde = self._fde_for(vaddr)
        if fde is None or not _covers(fde, vaddr):
            fde = self._debug_frame_fde_for(vaddr)
        if fde is None or not _covers(fde, vaddr):
            return None
        start = fde.header.initial_location
        rows = self._decoded.get(start)
        if rows is None:
            table = fde.get_decoded().table
            rows = ([line["pc"] for line in table], [_rules(line, start) for line in table])
            self._decoded[start] = rows
            while len(self._decoded) > MAX_DECODED_FDES:
                self._decoded.popitem(last=False)
        else:
            self._decoded.move_to_end(start)
        i = bisect.bisect_right(rows[0], vaddr) - 1
        return rows[1][i] if i >= 0 else None


def _covers(fde: FDE, vaddr: int) -> bool:
    start: int = fde.header.initial_location
    size: int = fde.header.address_range
    return start <= vaddr < start + size


def _rules(line: dict[Any, Any], start: int) -> Rules:
    cfa: CFARule = line["cfa"]
    regs = {DWARF_REGS[k]: v for k, v in line.items() if isinstance(k, int) and k in DWARF_REGS}
    if cfa.expr is not None or cfa.reg not in DWARF_REGS:
        return Rules(None, 0, regs, start)
    return Rules(DWARF_REGS[cfa.reg], cfa.offset or 0, regs, start)


def _arg(rule: RegisterRule) -> int:
    """A rule's number (offset or register); an expression's is not a number."""
    return rule.arg if isinstance(rule.arg, int) else 0


# ---- call instructions --------------------------------------------------------------------------

def follows_call(code: bytes) -> bool:
    """Whether ``code`` (the bytes just before a return address) ends with a call: E8 rel32, or
    FF /2 (call r/m64) in any of its ModRM/SIB/displacement lengths (a REX prefix before it
    changes no length)."""
    if len(code) >= 5 and code[-5] == 0xE8:
        return True
    for length in (2, 3, 4, 6, 7):
        if len(code) < length or code[-length] != 0xFF:
            continue
        modrm = code[-length + 1]
        if (modrm >> 3) & 7 != 2:
            continue
        if _ff_length(modrm, code[-length + 2] if length > 2 else None) == length:
            return True
    return False


def _ff_length(modrm: int, sib: int | None) -> int:
    """Length of FF /2 with this ModRM (and SIB byte, when there is one)."""
    mod, rm = modrm >> 6, modrm & 7
    if mod == 3:
        return 2
    size = 2
    if rm == 4:  # SIB
        size += 1
        if mod == 0 and sib is not None and sib & 7 == 5:
            return size + 4
    elif mod == 0 and rm == 5:  # RIP-relative disp32
        return size + 4
    return size + {0: 0, 1: 1, 2: 4}[mod]


# ---- where modules are loaded, without /proc -----------------------------------------------

AT_NULL: Final = 0
AT_PHENT: Final = 4
AT_PHNUM: Final = 5
AT_BASE: Final = 7
AT_ENTRY: Final = 9
ELF64_PHDR_SIZE: Final = 56


def auxv_in(stack: bytes) -> dict[int, int]:
    """The ELF auxiliary vector, when the copy reaches the top of the main thread's stack (it
    lies above argv and envp there): found by (AT_PHENT, 56), (AT_PHNUM, n) and read as
    (type, value) pairs on to AT_NULL, which must come within 64 pairs; the pairs before it
    are read back while their types are auxv types."""
    words = [int.from_bytes(stack[i:i + 8], "little") for i in range(0, len(stack) - 7, 8)]
    for i in range(len(words) - 3):
        if (words[i], words[i + 1], words[i + 2]) != (AT_PHENT, ELF64_PHDR_SIZE, AT_PHNUM):
            continue
        out: dict[int, int] = {}
        j = i
        while j + 1 < len(words) and words[j] != AT_NULL and j - i < 128:
            out[words[j]] = words[j + 1]
            j += 2
        if j + 1 >= len(words) or words[j] != AT_NULL or AT_ENTRY not in out:
            continue
        j = i - 2
        while j >= 0 and 0 < words[j] < 64 and words[j] not in out:
            out[words[j]] = words[j + 1]
            j -= 2
        return out
    return {}


def mappings_of(mod: ModuleCFI, bias: int, path: str) -> list[Mapping]:
    """``mod``'s executable segments as mappings, loaded ``bias`` above its link addresses."""
    return [Mapping(bias + s.vaddr, bias + s.vaddr + s.filesz, s.offset, path, 0)
            for s in mod.segments if s.executable]


# ---- the unwinder --------------------------------------------------------------------------------

@dataclass(frozen=True)
class RawFrame:
    address: int  # the pc (frame 0) or the return address (callers)
    module: str  # path
    file_offset: int
    build_id: str | None


@dataclass
class Unwound:
    frames: list[RawFrame]
    complete: bool
    why_incomplete: str | None
    bytes_used: int = 0  # how far up the stack copy the walk read


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    offset: int
    path: str
    inode: int


def unwind(regs: dict[str, int], stack: bytes, mappings: Sequence[Mapping],
           module: Callable[[Mapping], ModuleCFI | None], outermost: Callable[[RawFrame], bool]
           = lambda _f: False) -> Unwound:
    """Unwind ``stack`` (bytes from ``regs['rsp']`` up) with each module's CFI.

    ``mappings``: the process's executable file mappings; ``module(m)``: the parsed file of
    one (None when unreadable); ``outermost(frame)``: the frame is a thread's start by name (a
    walk that stops there for any reason is complete)."""
    used = [0]
    result = _unwind(regs, stack, mappings, module, used)
    result.bytes_used = used[0]
    if not result.complete and result.frames and outermost(result.frames[-1]):
        return Unwound(result.frames, True, None, used[0])
    return result


def _unwind(regs: dict[str, int], stack: bytes, mappings: Sequence[Mapping],
            module: Callable[[Mapping], ModuleCFI | None], used: list[int]) -> Unwound:
    sp0 = regs["rsp"]
    cur = {r: regs.get(r) for r in (*CALLEE_SAVED, "rsp")}
    pc = regs["rip"]
    frames: list[RawFrame] = []

    def read(addr: int) -> int | None:
        off = addr - sp0
        if off >= 0 and off + 8 <= len(stack):
            used[0] = max(used[0], off + 8)
            return int.from_bytes(stack[off:off + 8], "little")
        return None

    def where(addr: int) -> tuple[Mapping, ModuleCFI] | str:
        m = next((m for m in mappings if m.start <= addr < m.end), None)
        if m is None:
            return f"{addr:#x} is in no executable mapping of the process"
        mod = module(m)
        if mod is None:
            return f"{os.path.basename(m.path)} could not be read"
        return m, mod

    while len(frames) < MAX_FRAMES:
        found = where(pc)
        if isinstance(found, str):
            return Unwound(frames, False, found)
        m, mod = found
        file_offset = pc - m.start + m.offset
        vaddr = mod.vaddr_of(file_offset)
        caller = bool(frames)
        if vaddr is None:
            return Unwound(frames, False, f"{pc:#x} is outside {m.path}'s loadable segments")
        if caller and not follows_call(mod.code_before(vaddr, 7)):
            return Unwound(frames, False,
                           f"{pc:#x} ({os.path.basename(m.path)}+{file_offset:#x}) does not "
                           "follow a call instruction")
        frame = RawFrame(pc, m.path, file_offset, mod.build_id)
        frames.append(frame)
        # A return address belongs to the call before it: look up the call's row.
        try:
            rules = mod.rules_at(vaddr - 1 if caller else vaddr)
        except Exception as err:  # a corrupt .eh_frame: pyelftools raises many kinds
            return Unwound(frames, False, f"unreadable call frame information in "
                                          f"{os.path.basename(m.path)}: {err}")
        if rules is None:
            return Unwound(frames, False,
                           f"no call frame information for {os.path.basename(m.path)}"
                           f"+{file_offset:#x}")
        ra_rule = rules.regs.get("rip")
        if ra_rule is not None and ra_rule.type == RegisterRule.UNDEFINED:
            return Unwound(frames, True, None)  # the CFI's own mark of a thread's start
        if rules.cfa_reg is None:
            return Unwound(frames, False, f"a CFA expression at {os.path.basename(m.path)}"
                                          f"+{file_offset:#x} (not followed)")
        base = cur.get(rules.cfa_reg)
        if base is None:
            return Unwound(frames, False, f"{rules.cfa_reg} is unknown in the caller of "
                                          f"{os.path.basename(m.path)}+{file_offset:#x}")
        cfa = base + rules.cfa_offset
        new: dict[str, int | None] = {"rsp": cfa}
        for reg in CALLEE_SAVED:
            rule = rules.regs.get(reg)
            if rule is None or rule.type == RegisterRule.SAME_VALUE:
                new[reg] = cur.get(reg)
            elif rule.type == RegisterRule.OFFSET:
                new[reg] = read(cfa + _arg(rule))
            elif rule.type == RegisterRule.VAL_OFFSET:
                new[reg] = cfa + _arg(rule)
            elif rule.type == RegisterRule.REGISTER and _arg(rule) in DWARF_REGS:
                new[reg] = cur.get(DWARF_REGS[_arg(rule)])
            else:
                new[reg] = None  # undefined, or an expression: unknown from here on
        if ra_rule is None or ra_rule.type != RegisterRule.OFFSET:
            return Unwound(frames, False, "the return address rule is "
                                          f"{ra_rule.type if ra_rule else 'missing'}")
        ra = read(cfa + _arg(ra_rule))
        if ra is None:
            return Unwound(frames, False, f"the stack copy ({len(stack)} bytes) ends before the "
                                          "next return address")
        if ra == 0:
            return Unwound(frames, True, None)  # a zeroed return address: the thread's start
        if cfa <= (cur.get("rsp") or 0):
            return Unwound(frames, False, "the stack pointer did not move up")
        cur = new
        pc = ra
    return Unwound(frames, False, f"more than {MAX_FRAMES} frames")
