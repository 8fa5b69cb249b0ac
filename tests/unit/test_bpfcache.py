"""tracer.bpfcache without the kernel: relocation of map fds, the file's round trip and what
makes a file unusable, and what the key covers."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from tracer import bpfcache
from tracer.bpfcache import Attachment, CacheError, CompiledProbes, MapSpec, ProgramSpec


def insn(code: int, regs: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, regs, off, imm)


def ld_map_fd(dst: int, fd: int) -> bytes:
    # ld_imm64 dst, map fd: src_reg BPF_PSEUDO_MAP_FD, then the second half with imm 0
    return insn(0x18, (bpfcache.BPF_PSEUDO_MAP_FD << 4) | dst, 0, fd) + insn(0, 0, 0, 0)


def test_relocate_rewrites_only_map_fds_of_ld_imm64() -> None:
    plain_imm64 = insn(0x18, 1, 0, 7) + insn(0, 0, 0, 0)  # a constant, not a map
    mov_imm = insn(0xb7, 2, 0, 7)  # r2 = 7: same immediate, other opcode
    prog = ld_map_fd(1, 7) + plain_imm64 + mov_imm + ld_map_fd(3, 9) + insn(0x95)
    out = bpfcache.relocate(prog, {7: 40, 9: 41})
    assert len(out) == len(prog)
    assert struct.unpack_from("<i", out, 4)[0] == 40
    assert struct.unpack_from("<i", out, 16 + 4)[0] == 7
    assert struct.unpack_from("<i", out, 32 + 4)[0] == 7
    assert struct.unpack_from("<i", out, 40 + 4)[0] == 41
    assert out[56:] == insn(0x95)


def test_relocate_refuses_an_fd_that_is_no_cached_map() -> None:
    with pytest.raises(CacheError, match="map fd 8"):
        bpfcache.relocate(ld_map_fd(1, 8), {7: 40})


def sample() -> CompiledProbes:
    return CompiledProbes(
        maps=(MapSpec("vcpus", 2, 4, 448, 4096, 0, '"unsigned int"', '["vcpu_state", []]', 5),),
        programs=(ProgramSpec("tracepoint__syscalls__sys_exit_ioctl", 5,
                              ld_map_fd(1, 5) + insn(0x95)),),
        attachments=(Attachment("tracepoint", "syscalls:sys_exit_ioctl",
                                "tracepoint__syscalls__sys_exit_ioctl"),),
        license="GPL", kern_version=0)


def test_save_then_load_round_trips_root_only(tmp_path: Path) -> None:
    path = bpfcache.cache_path(tmp_path / "cache", "ab" * 32)
    bpfcache.save(path, sample())
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700
    assert bpfcache.load(path) == sample()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_no_file_is_no_cache(tmp_path: Path) -> None:
    assert bpfcache.load(tmp_path / "none.json") is None


@pytest.mark.parametrize(("change", "needle"), [
    (lambda d: d.update(format=0), "not format"),
    (lambda d: d["maps"][0].pop("max_entries"), "max_entries"),
    (lambda d: d["maps"][0].update(key_size="4"), "key_size"),
    (lambda d: d["programs"][0].update(insns="AAAA"), "inconsistent"),
    (lambda d: d["programs"][0].update(insns="not base64!"), "base64"),
    (lambda d: d["attachments"][0].update(program="nope"), "inconsistent"),
    (lambda d: d["attachments"][0].update(kind="kprobe"), "inconsistent"),
    (lambda d: d.update(license=None), "license"),
])
def test_a_malformed_file_is_refused(tmp_path: Path, change: object, needle: str) -> None:
    path = tmp_path / "p.json"
    bpfcache.save(path, sample())
    doc = json.loads(path.read_text())
    change(doc)  # type: ignore[operator]
    path.write_text(json.dumps(doc))
    with pytest.raises(CacheError, match=needle):
        bpfcache.load(path)


def test_a_file_others_may_write_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    bpfcache.save(path, sample())
    os.chmod(path, 0o666)
    with pytest.raises(CacheError, match="mode 0600"):
        bpfcache.load(path)


def test_not_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    bpfcache.save(path, sample())
    path.write_bytes(b"\xff{")
    with pytest.raises(CacheError):
        bpfcache.load(path)


def test_the_key_covers_source_flags_bcc_and_formats() -> None:
    base = bpfcache.cache_key("src", ["-DA=1"], "0.26.0", {"syscalls:sys_exit_ioctl": "f"})
    assert base == bpfcache.cache_key("src", ["-DA=1"], "0.26.0",
                                      {"syscalls:sys_exit_ioctl": "f"})
    for other in (bpfcache.cache_key("src2", ["-DA=1"], "0.26.0", {"syscalls:sys_exit_ioctl": "f"}),
                  bpfcache.cache_key("src", ["-DA=2"], "0.26.0", {"syscalls:sys_exit_ioctl": "f"}),
                  bpfcache.cache_key("src", ["-DA=1"], "0.27.0", {"syscalls:sys_exit_ioctl": "f"}),
                  bpfcache.cache_key("src", ["-DA=1"], "0.26.0", {"syscalls:sys_exit_ioctl": "g"})):
        assert other != base
