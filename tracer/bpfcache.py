"""A cache of the compiled probes, so a start does not pay for bcc's compile again.

bcc compiles ``bpf/completion.c`` with clang and LLVM at every start: about a second here, where
loading the result takes a few milliseconds. What the compile yields is plain data: each
program's instructions, each map's kernel attributes and bcc's description of its key and value
types. The first start saves that (:func:`save`); later starts with the same inputs create the
maps, point the instructions at them (:func:`relocate`) and load the programs with the
``bpf(2)`` syscall themselves (:func:`create_map`, :func:`load_program`).

The key covers everything the instructions depend on: the source as compiled, the flags, bcc's
version, the kernel (release and build), and the tracepoint formats the programs read their
arguments at. The only values a compile bakes in that differ per process are map fds (in
``ld_imm64`` with ``BPF_PSEUDO_MAP_FD``): relocated. No kernel address is baked in (the programs
use no kernel symbol). A file that is not the cache's own (owner, mode, shape) is never used.

No bcc import here: :mod:`tracer.probes` feeds it and builds bcc's table objects from it.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import json
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

FORMAT: Final = 1
# <linux/bpf.h>: commands, ld_imm64 and its map-fd source register.
BPF_MAP_CREATE: Final = 0
BPF_PROG_LOAD: Final = 5
BPF_LD_IMM64: Final = 0x18
BPF_PSEUDO_MAP_FD: Final = 1
OBJ_NAME_LEN: Final = 16
INSN_BYTES: Final = 8
SYS_BPF: Final = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351,
                  "riscv64": 280}
LOG_BYTES: Final = 1 << 20


class CacheError(ValueError):
    """A cache file that cannot be used (it is then ignored, and replaced after a compile)."""


@dataclass(frozen=True)
class MapSpec:
    name: str
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    key_desc: str  # bcc's JSON type description ("" for queues)
    leaf_desc: str
    compiled_fd: int  # the fd the instructions name it by


@dataclass(frozen=True)
class ProgramSpec:
    name: str
    prog_type: int
    insns: bytes


@dataclass(frozen=True)
class Attachment:
    kind: str  # "tracepoint" (category:event) or "raw_tracepoint" (name)
    target: str
    program: str


@dataclass(frozen=True)
class CompiledProbes:
    maps: tuple[MapSpec, ...]
    programs: tuple[ProgramSpec, ...]
    attachments: tuple[Attachment, ...]
    license: str
    kern_version: int


def cache_key(source: str, cflags: Iterable[str], bcc_version: str,
              tracepoint_formats: Mapping[str, str]) -> str:
    """What the compiled instructions depend on, hashed."""
    h = hashlib.sha256()
    uname = os.uname()
    for part in (f"format {FORMAT}", bcc_version, uname.release, uname.version, uname.machine,
                 source, *cflags, *(f"{k}\n{v}" for k, v in sorted(tracepoint_formats.items()))):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def cache_path(directory: Path, key: str) -> Path:
    return directory / f"probes-{key[:32]}.json"


# ---- the file ----------------------------------------------------------------------------------

def save(path: Path, compiled: CompiledProbes) -> None:
    """Write atomically, root-only (mode 0600 in a 0700 directory)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    doc = {
        "format": FORMAT, "license": compiled.license, "kern_version": compiled.kern_version,
        "maps": [vars(m) for m in compiled.maps],
        "programs": [{"name": p.name, "prog_type": p.prog_type,
                      "insns": base64.b64encode(p.insns).decode()} for p in compiled.programs],
        "attachments": [vars(a) for a in compiled.attachments],
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(doc, out)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _field(obj: Mapping[str, Any], name: str, kind: type) -> Any:
    value = obj.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CacheError(f"field {name!r}: expected {kind.__name__}")
    return value


def load(path: Path) -> CompiledProbes | None:
    """The cached probes at ``path``; None when there is none. CacheError when the file is not
    one this code wrote for root (owner, mode) or does not parse."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise CacheError(f"{path} is not owned by uid {os.geteuid()} with mode 0600")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheError(f"{path}: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CacheError(f"{path}: not format {FORMAT}")
    try:
        maps = tuple(MapSpec(**{f: _field(m, f, int if f not in ("name", "key_desc",
                                                                   "leaf_desc") else str)
                                for f in MapSpec.__dataclass_fields__})
                     for m in _field(doc, "maps", list))
        programs = tuple(ProgramSpec(_field(p, "name", str), _field(p, "prog_type", int),
                                     base64.b64decode(_field(p, "insns", str), validate=True))
                         for p in _field(doc, "programs", list))
        attachments = tuple(Attachment(_field(a, "kind", str), _field(a, "target", str),
                                       _field(a, "program", str))
                            for a in _field(doc, "attachments", list))
        compiled = CompiledProbes(maps, programs, attachments, _field(doc, "license", str),
                                  _field(doc, "kern_version", int))
    except (AttributeError, TypeError, ValueError) as err:
        raise CacheError(f"{path}: {err}") from None
    names = {p.name for p in compiled.programs}
    if (any(len(p.insns) % INSN_BYTES or not p.insns for p in compiled.programs)
            or any(a.program not in names for a in compiled.attachments)
            or any(a.kind not in ("tracepoint", "raw_tracepoint") for a in compiled.attachments)):
        raise CacheError(f"{path}: inconsistent programs or attachments")
    return compiled


# ---- relocation --------------------------------------------------------------------------------

def relocate(insns: bytes, fds: Mapping[int, int]) -> bytes:
    """The instructions with every map fd (``ld_imm64`` with ``BPF_PSEUDO_MAP_FD``) replaced
    by ``fds[old]``. CacheError for an fd that is not a map of the cache."""
    out = bytearray(insns)
    i = 0
    while i < len(out):
        code, regs = out[i], out[i + 1]
        if code == BPF_LD_IMM64:
            if (regs >> 4) == BPF_PSEUDO_MAP_FD:
                (old,) = struct.unpack_from("<i", out, i + 4)
                if old not in fds:
                    raise CacheError(f"instruction {i // INSN_BYTES} names map fd {old}, "
                                     "not one of the cached maps")
                struct.pack_into("<i", out, i + 4, fds[old])
            i += 2 * INSN_BYTES  # ld_imm64 takes two slots
        else:
            i += INSN_BYTES
    return bytes(out)


# ---- bpf(2) ------------------------------------------------------------------------------------

class _MapCreateAttr(ctypes.Structure):
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("inner_map_fd", ctypes.c_uint32),
                ("numa_node", ctypes.c_uint32), ("map_name", ctypes.c_char * OBJ_NAME_LEN)]


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
                ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
                ("prog_flags", ctypes.c_uint32), ("prog_name", ctypes.c_char * OBJ_NAME_LEN)]


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    nr = SYS_BPF.get(os.uname().machine)
    if nr is None:
        raise OSError(0, f"no bpf(2) number known for {os.uname().machine}")
    libc = ctypes.CDLL(None, use_errno=True)
    ret = int(libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), ctypes.byref(attr),
                           ctypes.c_uint(ctypes.sizeof(attr))))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _obj_name(name: str) -> bytes:
    # bcc's naming: the first 15 bytes (the kernel allows letters, digits, '_' and '.')
    return name.encode()[:OBJ_NAME_LEN - 1]


def create_map(spec: MapSpec) -> int:
    attr = _MapCreateAttr(map_type=spec.map_type, key_size=spec.key_size,
                          value_size=spec.value_size, max_entries=spec.max_entries,
                          map_flags=spec.flags, map_name=_obj_name(spec.name))
    return _bpf(BPF_MAP_CREATE, attr)


def load_program(prog: ProgramSpec, insns: bytes, license: str, kern_version: int) -> int:
    """Load one program; OSError with the verifier's last lines when it is refused."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())
    attr = _ProgLoadAttr(prog_type=prog.prog_type, insn_cnt=len(insns) // INSN_BYTES,
                         insns=ctypes.addressof(code), license=ctypes.addressof(lic),
                         kern_version=kern_version, prog_name=_obj_name(prog.name))
    try:
        return _bpf(BPF_PROG_LOAD, attr)
    except OSError as first:
        log = ctypes.create_string_buffer(LOG_BYTES)
        attr.log_level, attr.log_size, attr.log_buf = 1, LOG_BYTES, ctypes.addressof(log)
        try:
            return _bpf(BPF_PROG_LOAD, attr)  # loaded this time: the first failure was transient
        except OSError:
            tail = log.value.decode("utf-8", "replace").strip().splitlines()[-3:]
            raise OSError(first.errno, f"{prog.name}: {first.strerror}: "
                          f"{' / '.join(tail)}") from None
