"""Just enough of ELF64 (little-endian) to symbolize a user stack: the loadable segments, the
function symbols of .symtab and .dynsym, and the GNU build-id. No DWARF: frames are named
function+offset, which is what a sanitizer prints without debug info too."""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass
from typing import BinaryIO, Final

ELF_MAGIC: Final = b"\x7fELF"
PT_LOAD: Final = 1
PT_NOTE: Final = 4
SHT_SYMTAB: Final = 2
SHT_NOTE: Final = 7
SHT_DYNSYM: Final = 11
STT_FUNC: Final = 2
STT_GNU_IFUNC: Final = 10
NT_GNU_BUILD_ID: Final = 3
MAX_SYMBOLS: Final = 2_000_000  # a corrupt count must not make us allocate forever


class ElfError(ValueError):
    """Not an ELF64 little-endian file we can read, or a truncated/corrupt one."""


@dataclass(frozen=True)
class Segment:
    vaddr: int
    offset: int
    size: int  # the larger of filesz and memsz: a separate debug file keeps only the latter


@dataclass
class ElfSymbols:
    """Function symbols sorted by address, and how file offsets map to addresses."""

    build_id: str | None
    segments: list[Segment]
    starts: list[int]
    ends: list[int]
    names: list[str]

    def vaddr_of(self, file_offset: int) -> int | None:
        for seg in self.segments:
            if seg.offset <= file_offset < seg.offset + max(seg.size, 1):
                return file_offset - seg.offset + seg.vaddr
        return None

    def lookup(self, vaddr: int) -> tuple[str, int] | None:
        """(name, offset into it) of the function containing ``vaddr``."""
        i = bisect.bisect_right(self.starts, vaddr) - 1
        while i >= 0:
            if self.starts[i] <= vaddr < self.ends[i]:
                return self.names[i], vaddr - self.starts[i]
            if self.ends[i] == self.starts[i] and self.starts[i] <= vaddr:  # size 0: nearest
                return self.names[i], vaddr - self.starts[i]
            if vaddr - self.starts[i] > 1 << 20:
                return None
            i -= 1
        return None


def _read(f: BinaryIO, offset: int, size: int) -> bytes:
    # Offsets and sizes come from the file itself: check them against its length first, or a
    # corrupt 2**62 raises OverflowError from seek, or makes read() allocate that much.
    if offset < 0 or size < 0 or offset + size > f.seek(0, 2):
        raise ElfError(f"truncated at offset {offset:#x} (wanted {size} bytes)")
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise ElfError(f"truncated at offset {offset:#x} (wanted {size} bytes)")
    return data


def _notes(data: bytes) -> str | None:
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        pos += 12
        name = data[pos:pos + namesz]
        pos += (namesz + 3) & ~3
        desc = data[pos:pos + descsz]
        pos += (descsz + 3) & ~3
        if ntype == NT_GNU_BUILD_ID and name.rstrip(b"\0") == b"GNU":
            return desc.hex()
    return None


def read_symbols(f: BinaryIO) -> ElfSymbols:
    header = _read(f, 0, 64)
    if header[:4] != ELF_MAGIC:
        raise ElfError("not an ELF file")
    if header[4] != 2 or header[5] != 1:
        raise ElfError("not a 64-bit little-endian ELF file")
    (phoff, shoff) = struct.unpack_from("<QQ", header, 32)
    (phentsize, phnum, shentsize, shnum) = struct.unpack_from("<HHHH", header, 54)
    segments: list[Segment] = []
    build_id = None
    for i in range(phnum if phentsize >= 56 else 0):
        ptype, _flags, offset, vaddr, _paddr, filesz, memsz = struct.unpack_from(
            "<IIQQQQQ", _read(f, phoff + i * phentsize, 56))
        if ptype == PT_LOAD:
            segments.append(Segment(vaddr, offset, max(filesz, memsz)))
        elif ptype == PT_NOTE and build_id is None and filesz < 1 << 16:
            build_id = _notes(_read(f, offset, filesz))
    sections = []
    for i in range(shnum if shentsize >= 64 else 0):
        sections.append(struct.unpack_from("<IIQQQQIIQQ", _read(f, shoff + i * shentsize, 64)))
    found: dict[int, tuple[int, str]] = {}
    for kind in (SHT_SYMTAB, SHT_DYNSYM):  # .symtab first: it names static functions too
        for _name, stype, _fl, _addr, off, size, link, _info, _align, entsize in sections:
            if stype != kind or entsize < 24 or link >= len(sections):
                continue
            count = size // entsize
            if count > MAX_SYMBOLS:
                raise ElfError(f"{count} symbols: corrupt symbol table")
            strtab = sections[link]
            strings = _read(f, strtab[4], strtab[5])
            table = _read(f, off, count * entsize)
            for j in range(count):
                st_name, st_info, _other, shndx, value, ssize = struct.unpack_from(
                    "<IBBHQQ", table, j * entsize)
                if (st_info & 0xF) not in (STT_FUNC, STT_GNU_IFUNC) or shndx == 0 or not value:
                    continue
                end = strings.find(b"\0", st_name)
                name = strings[st_name:end if end >= 0 else None].decode("utf-8", "replace")
                if value not in found or found[value][0] < ssize:
                    found[value] = (ssize, name)
    if build_id is None:
        for _name, stype, _fl, _addr, off, size, *_rest in sections:
            if stype == SHT_NOTE and size < 1 << 16:
                build_id = _notes(_read(f, off, size))
                if build_id:
                    break
    starts = sorted(found)
    return ElfSymbols(build_id, segments, starts, [s + found[s][0] for s in starts],
                      [found[s][1] for s in starts])
